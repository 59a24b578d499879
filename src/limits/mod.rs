//! Overload protection per node: token-bucket rate limits (governor) and concurrency
//! limits, for each service and for each caller identity a `[[limit]]` matches. A
//! request over a rate is refused early with 429 / RESOURCE_EXHAUSTED; one over a
//! concurrency limit with 503 / UNAVAILABLE — there is no queue, so memory stays
//! bounded whatever the offered load. Shared by all workers. A reload builds a new
//! one that keeps the running one's in-flight counts and token buckets where a limit
//! is unchanged, so that a reload neither doubles what is let in nor refills buckets.

pub mod nofile;
pub mod resets;

use crate::config::{Config, Limits};
use crate::grammar::Pattern;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Over {
    /// Over a rate: who (`service orders`, `identity spiffe://…`).
    Rate(String),
    /// Over a concurrency limit.
    Concurrency(String),
}

/// Whether two limits have the same token bucket, so the running one may go on.
fn same_bucket(a: &Limits, b: &Limits) -> bool {
    (a.rate, a.burst) == (b.rate, b.burst)
}

fn quota(l: &Limits) -> Option<Quota> {
    let rate = NonZeroU32::new(l.rate?)?;
    let burst = l.burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

struct ServiceLimit {
    name: String,
    limits: Limits,
    rate: Option<Arc<DefaultDirectRateLimiter>>,
    concurrency: Option<(usize, Arc<AtomicUsize>)>,
}

struct IdentityRule {
    /// The pattern as written, peer names resolved.
    from: String,
    limits: Limits,
    pattern: Pattern,
    rate: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    concurrency: Option<(usize, Arc<PerIdentity>)>,
}

/// In-flight counts by identity.
type PerIdentity = Mutex<HashMap<String, Arc<AtomicUsize>>>;

pub struct Limiter {
    services: Vec<ServiceLimit>,
    identities: Vec<IdentityRule>,
}

/// Holds a request's place under its concurrency limits until dropped.
#[derive(Debug, Default)]
pub struct Admit(Vec<Arc<AtomicUsize>>);

impl Drop for Admit {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn take(count: &Arc<AtomicUsize>, max: usize, admit: &mut Admit) -> bool {
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    admit.0.push(count.clone());
    true
}

impl Limiter {
    /// The limits of `cfg`; where `previous` (the running generation's) has the same
    /// limit for the same service or caller pattern, its buckets and counts go on.
    /// `from` may name a peer, which stands for its identity (as in `[[allow]]`).
    pub fn new(cfg: &Config, previous: Option<&Limiter>) -> Arc<Self> {
        let old_service =
            |name: &str| previous.and_then(|p| p.services.iter().find(|s| s.name == name));
        let old_rule =
            |from: &str| previous.and_then(|p| p.identities.iter().find(|r| r.from == from));
        let services = cfg
            .services
            .iter()
            .map(|s| {
                let old = old_service(&s.name);
                ServiceLimit {
                    name: s.name.clone(),
                    limits: s.limits.clone(),
                    rate: match old {
                        Some(o) if same_bucket(&o.limits, &s.limits) => o.rate.clone(),
                        _ => quota(&s.limits).map(|q| Arc::new(governor::RateLimiter::direct(q))),
                    },
                    // requests in flight stay counted, whatever the new maximum
                    concurrency: s.limits.concurrency.map(|c| {
                        let count = old
                            .and_then(|o| o.concurrency.as_ref())
                            .map(|(_, n)| n.clone())
                            .unwrap_or_default();
                        (c, count)
                    }),
                }
            })
            .collect();
        let identities = cfg
            .limits
            .iter()
            .map(|l| {
                let from = cfg
                    .peers
                    .iter()
                    .find(|p| p.name == l.from)
                    .map_or(l.from.clone(), |p| p.identity.clone());
                let old = old_rule(&from);
                IdentityRule {
                    pattern: Pattern::new(&from),
                    rate: match old {
                        Some(o) if same_bucket(&o.limits, &l.limits) => o.rate.clone(),
                        _ => quota(&l.limits).map(|q| Arc::new(governor::RateLimiter::keyed(q))),
                    },
                    concurrency: l.limits.concurrency.map(|c| {
                        let counts = old
                            .and_then(|o| o.concurrency.as_ref())
                            .map(|(_, m)| m.clone())
                            .unwrap_or_default();
                        (c, counts)
                    }),
                    from,
                    limits: l.limits.clone(),
                }
            })
            .collect();
        Arc::new(Self {
            services,
            identities,
        })
    }

    /// Whether there is nothing to limit (the request path skips the rest).
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
            && self
                .services
                .iter()
                .all(|s| s.rate.is_none() && s.concurrency.is_none())
    }

    /// Admits a request of `identity` to `service`, or says which limit it is over.
    pub fn admit(&self, service: usize, identity: &str, name: &str) -> Result<Admit, Over> {
        let mut admit = Admit::default();
        if let Some(rule) = self.identities.iter().find(|r| r.pattern.matches(identity)) {
            if let Some(rl) = &rule.rate {
                if rl.check_key(&identity.to_owned()).is_err() {
                    return Err(Over::Rate(format!("identity {identity}")));
                }
            }
            if let Some((max, counts)) = &rule.concurrency {
                let count = counts
                    .lock()
                    .map(|mut m| m.entry(identity.to_owned()).or_default().clone())
                    .unwrap_or_default();
                if !take(&count, *max, &mut admit) {
                    return Err(Over::Concurrency(format!("identity {identity}")));
                }
            }
        }
        if let Some(s) = self.services.get(service) {
            if let Some(rl) = &s.rate {
                if rl.check().is_err() {
                    return Err(Over::Rate(format!("service {name}")));
                }
            }
            if let Some((max, count)) = &s.concurrency {
                if !take(count, *max, &mut admit) {
                    return Err(Over::Concurrency(format!("service {name}")));
                }
            }
        }
        Ok(admit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(concurrency: u32) -> Config {
        let text = format!(
            r#"
[node]
name = "a"
region = "r"
[[service]]
name = "s"
protocol = "http"
endpoints = ["http://127.0.0.1:1"]
limits = {{ concurrency = {concurrency} }}
[[peer]]
name = "b"
region = "r"
address = "127.0.0.1:2"
identity = "spiffe://t/node/b"
services = ["s"]
[[limit]]
from = "b"
concurrency = 1
"#
        );
        crate::config::compile(std::path::Path::new("t.toml"), &text)
            .unwrap_or_else(|r| panic!("{r:?}"))
            .0
    }

    #[test]
    fn a_reload_keeps_what_is_in_flight_counted() {
        let old = Limiter::new(&config(2), None);
        let held: Vec<Admit> = (0..2)
            .map(|_| old.admit(0, "spiffe://t/client/x", "s").unwrap())
            .collect();
        assert!(old.admit(0, "spiffe://t/client/x", "s").is_err());
        let new = Limiter::new(&config(2), Some(&old));
        assert!(
            new.admit(0, "spiffe://t/client/x", "s").is_err(),
            "two still in flight from before the reload"
        );
        drop(held);
        assert!(new.admit(0, "spiffe://t/client/x", "s").is_ok());
    }

    #[test]
    fn a_limit_may_name_a_peer() {
        let l = Limiter::new(&config(10), None);
        let _one = l.admit(0, "spiffe://t/node/b", "s").unwrap();
        assert_eq!(
            l.admit(0, "spiffe://t/node/b", "s").err(),
            Some(Over::Concurrency("identity spiffe://t/node/b".into()))
        );
        assert!(l.admit(0, "spiffe://t/node/c", "s").is_ok());
    }
}
