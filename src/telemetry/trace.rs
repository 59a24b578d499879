//! W3C trace context across hops: a valid `traceparent` keeps its trace id and flags
//! and gets a new parent id (this hop's span); a request without one (or with a
//! malformed one) starts a trace here, sampled by `[tracing] sample`. `tracestate`
//! passes untouched. Sampled hops become spans (`telemetry::otlp`).

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// This hop of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub trace_id: String,
    /// This hop's span: the parent id the next hop sees.
    pub span_id: String,
    /// The caller's span, if the trace came with the request.
    pub parent_id: Option<String>,
    pub sampled: bool,
}

/// Rewrites `traceparent` for the next hop. A trace started here is sampled with
/// probability `sample`.
pub fn next_hop(h: &mut HeaderMap, sample: f64) -> Hop {
    let parsed = h
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse);
    // `00-` trace id `-` span id `-` flags, written in place (the formatting machinery
    // was 3% of a request's instructions)
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let (parent_id, sampled) = match parsed {
        Some((t, p, f)) => {
            v[3..35].copy_from_slice(t.as_bytes());
            v[53..55].copy_from_slice(f.as_bytes());
            let sampled = u8::from_str_radix(&f, 16).is_ok_and(|f| f & 1 == 1);
            (Some(p), sampled)
        }
        None => {
            let sampled = sample >= 1.0 || (sample > 0.0 && fastrand::f64() < sample);
            hex_u64(&mut v[3..19], fastrand::u64(1..));
            hex_u64(&mut v[19..35], fastrand::u64(..));
            v[54] = if sampled { b'1' } else { b'0' };
            (None, sampled)
        }
    };
    hex_u64(&mut v[36..52], fastrand::u64(1..));
    if let Ok(value) = HeaderValue::from_bytes(&v) {
        h.insert(TRACEPARENT, value);
    }
    let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&v[r]).into_owned();
    Hop {
        trace_id: text(3..35),
        span_id: text(36..52),
        parent_id,
        sampled,
    }
}

/// `n` as 16 lower-case hex digits into `out`.
pub fn hex_u64(out: &mut [u8], n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().take(16).enumerate() {
        *o = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// `version-traceid-parentid-flags`, version 00, ids lower-case hex and not all zero.
fn parse(v: &str) -> Option<(String, String, String)> {
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
    .then(|| (trace.to_owned(), parent.to_owned(), flags.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_goes_on_with_a_new_parent() {
        let mut h = HeaderMap::new();
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(given));
        let hop = next_hop(&mut h, 0.0);
        assert_eq!(hop.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hop.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(hop.sampled, "the caller's flags decide");
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
            let hop = next_hop(&mut h, 0.0);
            assert_eq!(hop.trace_id.len(), 32, "{bad}");
            assert!(!hop.sampled && hop.parent_id.is_none());
            assert!(parse(h[&TRACEPARENT].to_str().unwrap()).is_some(), "{bad}");
        }
    }
}
