//! Audit mode's record: calls that no rule allows, served because their service's
//! `authorization` is `"audit"`. Counted by service and a bounded identity label
//! (`fedport_authorization_audit_would_deny_total`), and logged once per identity,
//! service and method per minute with `would_deny`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Distinct identities named in the metric's labels; the rest are counted as `other`
/// (a caller minting identities must not grow the registry without bound).
const IDENTITY_LABELS: usize = 100;
/// One log line per identity, service and method this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Log keys remembered at most; past it the memory starts afresh.
const LOG_KEYS: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub service: String,
    pub identity: String,
}

#[derive(Default)]
pub struct Audit {
    pub would_deny: Family<AuditLabels, Counter>,
    named: Mutex<HashSet<String>>,
    logged: Mutex<HashMap<(String, String, String), Instant>>,
}

impl Audit {
    /// A call served that enforcement would refuse. Only audited calls come here: the
    /// locks are off the path of calls a rule allows.
    pub fn would_deny(&self, service: &str, identity: &str, method: &str) {
        let label = match self.named.lock() {
            Ok(mut n) if n.contains(identity) || n.len() < IDENTITY_LABELS => {
                n.insert(identity.to_owned());
                identity.to_owned()
            }
            _ => "other".to_owned(),
        };
        self.would_deny
            .get_or_create(&AuditLabels {
                service: service.to_owned(),
                identity: label,
            })
            .inc();
        let now = Instant::now();
        let due = match self.logged.lock() {
            Ok(mut l) => {
                if l.len() >= LOG_KEYS {
                    l.clear();
                }
                let key = (identity.to_owned(), service.to_owned(), method.to_owned());
                match l.get(&key) {
                    Some(t) if now.duration_since(*t) < LOG_EVERY => false,
                    _ => {
                        l.insert(key, now);
                        true
                    }
                }
            }
            Err(_) => false,
        };
        if due {
            tracing::warn!(
                target: "fedport::audit",
                would_deny = true,
                identity,
                service,
                method,
                "no rule allows this call; served, as the service's authorization is \"audit\""
            );
        }
    }
}
