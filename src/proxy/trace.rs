//! W3C trace context across hops: a valid `traceparent` keeps its trace id and flags
//! and gets a new parent id (this hop's span); a request without one (or with a
//! malformed one) starts a trace here. `tracestate` passes untouched.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Rewrites `traceparent` for the next hop; returns the trace id.
pub fn next_hop(h: &mut HeaderMap) -> String {
    let parsed = h
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    let (trace, flags) = match parsed {
        Some((t, f)) => (t, f),
        None => (
            format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..)),
            "00".to_owned(),
        ),
    };
    let span = format!("{:016x}", fastrand::u64(1..));
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace}-{span}-{flags}")) {
        h.insert(TRACEPARENT, v);
    }
    trace
}

/// `version-traceid-parentid-flags`, version 00, ids lower-case hex and not all zero.
fn parse(v: &str) -> Option<(String, String)> {
    let mut parts = v.trim().split('-');
    let (ver, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (ver == "00"
        && parts.next().is_none()
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2))
    .then(|| (trace.to_owned(), flags.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_goes_on_with_a_new_parent() {
        let mut h = HeaderMap::new();
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(given));
        let id = next_hop(&mut h);
        assert_eq!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
        let now = h[&TRACEPARENT].to_str().unwrap().to_owned();
        assert!(now.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(now.ends_with("-01"));
        assert_ne!(now, given, "a new parent id");
        assert!(parse(&now).is_some());
    }

    #[test]
    fn a_missing_or_broken_trace_starts_here() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let mut h = HeaderMap::new();
            if !bad.is_empty() {
                h.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            }
            let id = next_hop(&mut h);
            assert_eq!(id.len(), 32, "{bad}");
            assert!(parse(h[&TRACEPARENT].to_str().unwrap()).is_some(), "{bad}");
        }
    }
}
