//! Audit mode's record: calls that no rule allows, served because their service's
//! `authorization` is `"audit"`. Counted by service and a bounded identity label
//! (`fedport_authorization_audit_would_deny_total`), and logged with `would_deny` once
//! per identity, service and method a minute — the method in a bounded form (the
//! schema method or JSON route it matched, else the verb and the path's first two
//! segments), and never more than a few hundred lines a minute in all.

use crate::grammar::Call;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct identities named in the metric's labels; the rest are counted under
/// [`OVERFLOW`] (a caller minting identities must not grow the registry without bound).
const IDENTITY_LABELS: usize = 100;
/// The label of identities past the first hundred: no identity can be spelled so.
const OVERFLOW: &str = "(other)";
/// One log line per identity, service and method this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Log keys remembered at most (hashes, with when each was logged).
const LOG_KEYS: usize = 10_000;
/// Audit lines a minute at most, all calls together; the rest are counted as dropped.
const LINES_PER_MINUTE: u32 = 600;
/// Longest method text logged or keyed.
const METHOD_BYTES: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub service: String,
    pub identity: String,
}

#[derive(Default)]
pub struct Audit {
    pub would_deny: Family<AuditLabels, Counter>,
    named: Mutex<HashSet<String>>,
    log: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    logged: HashMap<u64, Instant>,
    window: Option<Instant>,
    lines: u32,
    dropped: u64,
}

/// A call's method as keyed and logged: bounded whatever the caller sent.
pub fn bounded(call: Call<'_>, route: Option<&str>) -> String {
    let mut m = match (route, call) {
        (Some(r), _) => r.to_owned(),
        (None, Call::Grpc(m)) => m.to_owned(),
        (None, Call::Http(verb, path)) => {
            let mut segs = path.trim_start_matches('/').splitn(3, '/');
            let head: Vec<&str> = segs.by_ref().take(2).collect();
            let more = segs.next().is_some();
            format!("{verb} /{}{}", head.join("/"), if more { "/…" } else { "" })
        }
    };
    if m.len() > METHOD_BYTES {
        let mut cut = METHOD_BYTES;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

impl Audit {
    /// A call served that enforcement would refuse, once it has passed every other
    /// check; `method` as [`bounded`] gives it. Only audited calls come here: the locks are off the path of calls a
    /// rule allows.
    pub fn would_deny(&self, service: &str, identity: &str, method: String) {
        let label = match self.named.lock() {
            Ok(mut n) if n.contains(identity) || n.len() < IDENTITY_LABELS => {
                n.insert(identity.to_owned());
                identity
            }
            _ => OVERFLOW,
        };
        self.would_deny
            .get_or_create(&AuditLabels {
                service: service.to_owned(),
                identity: label.to_owned(),
            })
            .inc();
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (identity, service, &method).hash(&mut h);
            h.finish()
        };
        let now = Instant::now();
        let (due, dropped) = match self.log.lock() {
            Ok(mut l) => l.due(key, now),
            Err(_) => (false, 0),
        };
        if dropped > 0 {
            tracing::warn!(target: "fedport::audit", dropped, "audit lines dropped in the last minute (at most {LINES_PER_MINUTE} a minute)");
        }
        if due {
            tracing::warn!(
                target: "fedport::audit",
                would_deny = true,
                identity,
                service,
                method = %method,
                "no rule allows this call; served, as the service's authorization is \"audit\""
            );
        }
    }
}

impl LogState {
    /// Whether to log this key now, and how many lines the last window dropped (to be
    /// said once).
    fn due(&mut self, key: u64, now: Instant) -> (bool, u64) {
        let mut dropped = 0;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= LOG_EVERY)
        {
            self.window = Some(now);
            self.lines = 0;
            dropped = std::mem::take(&mut self.dropped);
        }
        if let Some(t) = self.logged.get(&key) {
            if now.duration_since(*t) < LOG_EVERY {
                return (false, dropped);
            }
        }
        if self.logged.len() >= LOG_KEYS {
            self.logged
                .retain(|_, t| now.duration_since(*t) < LOG_EVERY);
        }
        if self.lines >= LINES_PER_MINUTE || self.logged.len() >= LOG_KEYS {
            self.dropped += 1;
            return (false, dropped);
        }
        self.lines += 1;
        self.logged.insert(key, now);
        (true, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_is_keyed_in_a_bounded_form() {
        assert_eq!(
            bounded(Call::Http("GET", "/orders/17/items/3"), None),
            "GET /orders/17/…"
        );
        assert_eq!(bounded(Call::Http("GET", "/orders"), None), "GET /orders");
        assert_eq!(bounded(Call::Grpc("pkg.S/M"), None), "pkg.S/M");
        assert_eq!(
            bounded(Call::Http("POST", "/v1/x/y"), Some("POST /v1/{id}")),
            "POST /v1/{id}"
        );
        let long = format!("/{}", "a".repeat(10_000));
        assert!(bounded(Call::Http("GET", &long), None).len() <= METHOD_BYTES + 4);
    }

    #[test]
    fn lines_are_capped_and_keys_bounded() {
        let mut l = LogState::default();
        let now = Instant::now();
        let logged = (0..5_000u64).filter(|k| l.due(*k, now).0).count();
        assert_eq!(logged, LINES_PER_MINUTE as usize);
        assert!(l.logged.len() <= LOG_KEYS);
        // the same key within the minute: not again
        assert!(!l.due(0, now).0);
        // the next minute says how many were dropped
        let (_, dropped) = l.due(9_999_999, now + LOG_EVERY);
        assert_eq!(dropped, 5_000 - LINES_PER_MINUTE as u64);
    }
}
