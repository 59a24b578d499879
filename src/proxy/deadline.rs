//! Deadlines across hops: the caller's `grpc-timeout` (gRPC) or `fed-timeout`
//! (HTTP, milliseconds) bounds the call within the service's own timeout, and each
//! forward carries on only what is left of it, so that work whose caller has given
//! up is never started.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const FED_TIMEOUT: HeaderName = HeaderName::from_static("fed-timeout");

/// The time the caller allows, if it said: `grpc-timeout` (1–8 digits and a unit of
/// H, M, S, m, u or n) for gRPC, `fed-timeout` (milliseconds) for anything.
pub fn asked(h: &HeaderMap, grpc: bool) -> Result<Option<Duration>, &'static str> {
    if grpc {
        if let Some(v) = h.get(GRPC_TIMEOUT) {
            return parse_grpc(v.as_bytes())
                .map(Some)
                .ok_or("grpc-timeout is not 1 to 8 digits and a unit (H, M, S, m, u, n)");
        }
    }
    match h.get(FED_TIMEOUT) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or("fed-timeout is not a number of milliseconds"),
        None => Ok(None),
    }
}

fn parse_grpc(v: &[u8]) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Writes what is left of the deadline into the request for the next hop.
pub fn pass_on(h: &mut HeaderMap, grpc: bool, left: Duration) {
    let ms = left.as_millis() as u64;
    if grpc {
        let v = if ms == 0 {
            format!("{}u", left.as_micros().max(1))
        } else {
            format!("{}m", ms.min(99_999_999))
        };
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(GRPC_TIMEOUT, v);
        }
    }
    h.insert(FED_TIMEOUT, HeaderValue::from(ms.max(1)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_by_unit() {
        assert_eq!(parse_grpc(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc(b"5000u"), Some(Duration::from_millis(5)));
        assert_eq!(parse_grpc(b"123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc(b"m"), None);
        assert_eq!(parse_grpc(b"10x"), None);
        assert_eq!(parse_grpc(b""), None);
    }

    #[test]
    fn what_is_left_is_passed_on() {
        let mut h = HeaderMap::new();
        pass_on(&mut h, true, Duration::from_millis(93));
        assert_eq!(h[GRPC_TIMEOUT], "93m");
        assert_eq!(h[FED_TIMEOUT], "93");
        pass_on(&mut h, true, Duration::from_micros(400));
        assert_eq!(h[GRPC_TIMEOUT], "400u");
        assert_eq!(asked(&h, true), Ok(Some(Duration::from_micros(400))));
        let mut http = HeaderMap::new();
        http.insert(FED_TIMEOUT, HeaderValue::from_static("250"));
        assert_eq!(asked(&http, false), Ok(Some(Duration::from_millis(250))));
    }
}
