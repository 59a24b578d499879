//! Overload protection per node: token-bucket rate limits (governor) and concurrency
//! limits, for each service and for each caller identity a `[[limit]]` matches. A
//! request over a rate is refused early with 429 / RESOURCE_EXHAUSTED; one over a
//! concurrency limit with 503 / UNAVAILABLE — there is no queue, so memory stays
//! bounded whatever the offered load. Shared by all workers; rebuilt on reload.

use crate::config::{Config, Limits};
use crate::policy::Pattern;
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

fn quota(l: &Limits) -> Option<Quota> {
    let rate = NonZeroU32::new(l.rate?)?;
    let burst = l.burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

struct ServiceLimit {
    rate: Option<DefaultDirectRateLimiter>,
    concurrency: Option<(usize, Arc<AtomicUsize>)>,
}

struct IdentityRule {
    pattern: Pattern,
    rate: Option<DefaultKeyedRateLimiter<String>>,
    concurrency: Option<(usize, PerIdentity)>,
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
    pub fn new(cfg: &Config) -> Arc<Self> {
        Arc::new(Self {
            services: cfg
                .services
                .iter()
                .map(|s| ServiceLimit {
                    rate: quota(&s.limits).map(governor::RateLimiter::direct),
                    concurrency: s.limits.concurrency.map(|c| (c, Arc::default())),
                })
                .collect(),
            identities: cfg
                .limits
                .iter()
                .map(|l| IdentityRule {
                    pattern: Pattern::new(&l.from),
                    rate: quota(&l.limits).map(governor::RateLimiter::keyed),
                    concurrency: l.limits.concurrency.map(|c| (c, Mutex::default())),
                })
                .collect(),
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
