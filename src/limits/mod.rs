//! Overload protection per node: token-bucket rate limits (governor) and concurrency
//! limits, for each service and for each caller identity a `[[limit]]` matches. A
//! request over a rate is refused early with 429 / RESOURCE_EXHAUSTED; one over a
//! concurrency limit with 503 / UNAVAILABLE — there is no queue, so memory stays
//! bounded whatever the offered load. Shared by all workers, with no lock on the request
//! path: a caller's own bucket and count are resolved once per connection
//! ([`Limiter::caller`], as grants are), and each request then costs atomic operations.
//! A reload builds a new one that keeps the running one's in-flight counts and token
//! buckets where a limit is unchanged, so that a reload neither doubles what is let in
//! nor refills buckets.

pub mod nofile;
pub mod resets;

use crate::config::{Config, Limits};
use crate::grammar::Pattern;
use governor::{DefaultDirectRateLimiter, Quota};
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
    /// Each identity's own bucket, made when its first connection is.
    rate: Option<(Quota, Arc<PerIdentity<DefaultDirectRateLimiter>>)>,
    /// Each identity's requests in flight.
    concurrency: Option<(usize, Arc<PerIdentity<AtomicUsize>>)>,
}

/// Something of each identity's; locked only when a connection resolves its caller.
type PerIdentity<T> = Mutex<HashMap<String, Arc<T>>>;

fn of_identity<T>(map: &PerIdentity<T>, identity: &str, new: impl FnOnce() -> T) -> Arc<T> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    m.entry(identity.to_owned())
        .or_insert_with(|| Arc::new(new()))
        .clone()
}

/// One caller identity's limits, resolved once per connection: the `[[limit]]` rule it
/// matches, that rule's bucket and in-flight count for this identity.
#[derive(Default)]
pub struct Caller {
    identity: String,
    rate: Option<Arc<DefaultDirectRateLimiter>>,
    concurrency: Option<(usize, Arc<AtomicUsize>)>,
}

pub struct Limiter {
    services: Vec<ServiceLimit>,
    identities: Vec<IdentityRule>,
}

/// Holds a request's place under its concurrency limits (the caller's, the service's)
/// until dropped.
#[derive(Debug, Default)]
pub struct Admit([Option<Arc<AtomicUsize>>; 2]);

impl Drop for Admit {
    fn drop(&mut self) {
        for c in self.0.iter().flatten() {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Arc<AtomicUsize>> {
    if count.fetch_add(1, Ordering::Relaxed) >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    Some(count.clone())
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
                        _ => quota(&l.limits).map(|q| (q, Arc::default())),
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

    /// The limits of `identity`'s requests: the first `[[limit]]` rule it matches, with
    /// its bucket and count for this identity (shared by all its connections).
    pub fn caller(&self, identity: &str) -> Caller {
        let Some(rule) = self.identities.iter().find(|r| r.pattern.matches(identity)) else {
            return Caller::default();
        };
        Caller {
            identity: identity.to_owned(),
            rate: rule
                .rate
                .as_ref()
                .map(|(q, per)| of_identity(per, identity, || governor::RateLimiter::direct(*q))),
            concurrency: rule
                .concurrency
                .as_ref()
                .map(|(max, per)| (*max, of_identity(per, identity, AtomicUsize::default))),
        }
    }

    /// Admits a request of `caller` to `service`, or says which limit it is over.
    pub fn admit(&self, service: usize, caller: &Caller, name: &str) -> Result<Admit, Over> {
        let mut admit = Admit::default();
        let who = || format!("identity {}", caller.identity);
        if caller.rate.as_ref().is_some_and(|rl| rl.check().is_err()) {
            return Err(Over::Rate(who()));
        }
        if let Some((max, count)) = &caller.concurrency {
            admit.0[0] = Some(take(count, *max).ok_or_else(|| Over::Concurrency(who()))?);
        }
        if let Some(s) = self.services.get(service) {
            if s.rate.as_ref().is_some_and(|rl| rl.check().is_err()) {
                return Err(Over::Rate(format!("service {name}")));
            }
            if let Some((max, count)) = &s.concurrency {
                let place = take(count, *max)
                    .ok_or_else(|| Over::Concurrency(format!("service {name}")))?;
                admit.0[1] = Some(place);
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
            .map(|_| {
                old.admit(0, &old.caller("spiffe://t/client/x"), "s")
                    .unwrap()
            })
            .collect();
        assert!(old
            .admit(0, &old.caller("spiffe://t/client/x"), "s")
            .is_err());
        let new = Limiter::new(&config(2), Some(&old));
        assert!(
            new.admit(0, &new.caller("spiffe://t/client/x"), "s")
                .is_err(),
            "two still in flight from before the reload"
        );
        drop(held);
        assert!(new
            .admit(0, &new.caller("spiffe://t/client/x"), "s")
            .is_ok());
    }

    #[test]
    fn a_limit_may_name_a_peer() {
        let l = Limiter::new(&config(10), None);
        let _one = l.admit(0, &l.caller("spiffe://t/node/b"), "s").unwrap();
        assert_eq!(
            l.admit(0, &l.caller("spiffe://t/node/b"), "s").err(),
            Some(Over::Concurrency("identity spiffe://t/node/b".into()))
        );
        assert!(l.admit(0, &l.caller("spiffe://t/node/c"), "s").is_ok());
    }
}
