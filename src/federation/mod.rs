//! The federation's live state, shared by every worker: which local endpoints may be
//! used (active health checks, passive outlier ejection), which peers are up and how
//! far away they are (HTTP/2 PING round-trip times), in what order a service's peers
//! are tried, and the retry budget. The control thread ([`control`]) keeps it current.

pub mod control;

use crate::config::{Config, Outlier};
use crate::telemetry::{EndpointLabels, Metrics, PeerLabels};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One local endpoint's health, shared by the workers.
#[derive(Debug)]
pub struct EndpointHealth {
    /// False once active checks failed `unhealthy_threshold` times in a row.
    active_ok: AtomicBool,
    /// Consecutive failed requests (passive).
    failures: AtomicU32,
    /// Ejections in a row without a success between them: each doubles the next.
    ejections: AtomicU32,
    /// Until when (ms since the fleet's epoch) the endpoint is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// One peer node as this node sees it.
#[derive(Debug)]
pub struct PeerState {
    up: AtomicBool,
    /// Moving average of PING round trips, in microseconds; 0 until measured.
    rtt_us: AtomicU64,
    up_gauge: prometheus_client::metrics::gauge::Gauge,
    rtt_gauge: prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>,
}

impl PeerState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub(crate) fn set_up(&self, up: bool) -> bool {
        self.up_gauge.set(up as i64);
        self.up.swap(up, Ordering::Relaxed) != up
    }

    /// Folds one PING round trip into the moving average (weight 1/4 for the new one).
    pub(crate) fn sample_rtt(&self, rtt: Duration) {
        let us = rtt.as_micros().max(1) as u64;
        let old = self.rtt_us.load(Ordering::Relaxed);
        let avg = if old == 0 { us } else { (old * 3 + us) / 4 };
        self.rtt_us.store(avg.max(1), Ordering::Relaxed);
        self.rtt_gauge.set(avg as f64 / 1e6);
    }
}

/// Everything the workers share about where requests may go.
pub struct Fleet {
    epoch: Instant,
    /// By service index, then endpoint index.
    pub endpoints: Vec<Vec<Arc<EndpointHealth>>>,
    /// By peer index.
    pub peers: Vec<Arc<PeerState>>,
    /// By service index: the peers that offer it.
    offered: Vec<Vec<usize>>,
    outliers: Vec<Outlier>,
    /// By service index: held while an ejection is decided, so that workers failing
    /// endpoints at once cannot together pass `max_ejected_percent`.
    ejecting: Vec<std::sync::Mutex<()>>,
    names: Vec<(String, Vec<String>)>,
    /// By peer index: what a peer's state belongs to (name, address, identity, probed,
    /// reverse).
    peer_keys: Vec<(String, String, String, bool, bool)>,
    /// The reverse links peers opened to this node (kept across reloads).
    pub links: Arc<crate::upstream::reverse::Links>,
    metrics: Arc<Metrics>,
}

impl Fleet {
    /// The state for `config`. What `previous` (the running generation's) knows of an
    /// endpoint (same service and URL) or a peer (same name, address and identity) is
    /// kept: a reload, a certificate rotation or a registry change must not put an
    /// endpoint that failed its checks or was ejected back into rotation, nor forget
    /// which peers are down and how far away the others are.
    pub fn new(config: &Config, metrics: Arc<Metrics>, previous: Option<&Fleet>) -> Arc<Self> {
        let mut known: std::collections::HashMap<(&str, &str), &Arc<EndpointHealth>> =
            Default::default();
        let mut known_peers: std::collections::HashMap<_, &Arc<PeerState>> = Default::default();
        if let Some(p) = previous {
            for ((service, urls), healths) in p.names.iter().zip(&p.endpoints) {
                for (url, h) in urls.iter().zip(healths) {
                    known.insert((service.as_str(), url.as_str()), h);
                }
            }
            for (key, st) in p.peer_keys.iter().zip(&p.peers) {
                known_peers.insert(key.clone(), st);
            }
        }
        let endpoints = config
            .services
            .iter()
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| {
                        if let Some(h) = known.get(&(s.name.as_str(), e.url.as_str())) {
                            // checks no longer configured cannot keep it out
                            if s.health.is_none() {
                                h.active_ok.store(true, Ordering::Relaxed);
                            }
                            return Arc::clone(h);
                        }
                        let gauge = metrics
                            .endpoint_healthy
                            .get_or_create(&EndpointLabels {
                                service: s.name.clone(),
                                endpoint: e.url.clone(),
                            })
                            .clone();
                        gauge.set(1);
                        Arc::new(EndpointHealth {
                            active_ok: AtomicBool::new(true),
                            failures: AtomicU32::new(0),
                            ejections: AtomicU32::new(0),
                            ejected_until: AtomicU64::new(0),
                            gauge,
                        })
                    })
                    .collect()
            })
            .collect();
        let peer_keys: Vec<(String, String, String, bool, bool)> = config
            .peers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.address.clone(),
                    p.identity.clone(),
                    !p.services.is_empty(),
                    p.reverse,
                )
            })
            .collect();
        let peers = config
            .peers
            .iter()
            .zip(&peer_keys)
            .map(|(p, key)| {
                if let Some(st) = known_peers.get(key) {
                    return Arc::clone(st);
                }
                let label = PeerLabels {
                    peer: p.name.clone(),
                };
                // a peer offering none of this node's services is not probed (see
                // control.rs): it gets no series, rather than one that says nothing
                let (up_gauge, rtt_gauge) = if p.services.is_empty() {
                    Default::default()
                } else {
                    (
                        metrics.peer_up.get_or_create(&label).clone(),
                        metrics.peer_rtt.get_or_create(&label).clone(),
                    )
                };
                // optimistic until the first PING says otherwise: a request to a peer
                // that cannot be reached fails over before anything is sent; a peer
                // that dials this node is down until its first link is up
                let up = !p.accepts_reverse();
                up_gauge.set(up as i64);
                Arc::new(PeerState {
                    up: AtomicBool::new(up),
                    rtt_us: AtomicU64::new(0),
                    up_gauge,
                    rtt_gauge,
                })
            })
            .collect();
        let offered = config
            .services
            .iter()
            .map(|s| {
                config
                    .peers
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.services.contains(&s.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Arc::new(Self {
            // ejection deadlines are kept as times since the epoch: it is kept too
            epoch: previous.map_or_else(Instant::now, |p| p.epoch),
            links: previous.map(|p| p.links.clone()).unwrap_or_default(),
            peer_keys,
            endpoints,
            peers,
            offered,
            outliers: config.services.iter().map(|s| s.outlier.clone()).collect(),
            ejecting: config.services.iter().map(|_| Default::default()).collect(),
            names: config
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        s.endpoints.iter().map(|e| e.url.clone()).collect(),
                    )
                })
                .collect(),
            metrics,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a local endpoint may take requests now.
    pub fn available(&self, service: usize, endpoint: usize) -> bool {
        let h = &self.endpoints[service][endpoint];
        // the clock is read only for an endpoint that was ever ejected
        let until = h.ejected_until.load(Ordering::Relaxed);
        h.active_ok.load(Ordering::Relaxed) && (until == 0 || until <= self.now_ms())
    }

    /// Whether the service has peers at all (healthy or not).
    pub fn has_peers(&self, service: usize) -> bool {
        !self.offered[service].is_empty()
    }

    /// The peers to try for a service, best first: the service's `failover` order, then
    /// the node's own region, then other regions by measured round-trip time. Peers
    /// that are down are left out unless all are, and the nodes in `exclude` (where
    /// the request came from) always are.
    pub fn peer_order(
        &self,
        config: &Config,
        service: usize,
        exclude: &[Option<&str>],
    ) -> Vec<usize> {
        let svc = &config.services[service];
        let allowed = |i: &usize| !exclude.contains(&Some(config.peers[*i].name.as_str()));
        let mut order: Vec<usize> = self.offered[service]
            .iter()
            .copied()
            .filter(|i| allowed(i) && self.peers[*i].is_up())
            .collect();
        if order.is_empty() {
            // every peer looks down: try them anyway rather than refuse (a request that
            // cannot reach one fails over before anything is sent)
            order = self.offered[service]
                .iter()
                .copied()
                .filter(allowed)
                .collect();
        }
        order.sort_by_key(|&i| {
            let p = &config.peers[i];
            let listed = svc
                .failover
                .iter()
                .position(|f| *f == p.name || *f == p.region)
                .unwrap_or(usize::MAX);
            let remote = p.region != config.node.region;
            // the node's zone first within its region
            let other_zone = config.node.zone.is_none() || p.zone != config.node.zone;
            let rtt = self.peers[i].rtt().unwrap_or(Duration::MAX);
            (listed, remote, other_zone, rtt)
        });
        order
    }

    /// Records how a request to a local endpoint went (passive health): after
    /// `consecutive_failures` failures in a row the endpoint is ejected, for longer
    /// each time in a row, unless that would eject more than `max_ejected_percent` of
    /// the service's endpoints (at least one may always be ejected).
    pub fn record(&self, service: usize, endpoint: usize, ok: bool) {
        let h = &self.endpoints[service][endpoint];
        if ok {
            if h.failures.load(Ordering::Relaxed) != 0 {
                h.failures.store(0, Ordering::Relaxed);
            }
            if h.ejections.load(Ordering::Relaxed) != 0
                && h.ejected_until.load(Ordering::Relaxed) <= self.now_ms()
            {
                h.ejections.store(0, Ordering::Relaxed);
            }
            return;
        }
        let o = &self.outliers[service];
        let failures = h.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < o.consecutive_failures {
            return;
        }
        let _deciding = self.ejecting[service]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = self.now_ms();
        let all = &self.endpoints[service];
        let ejected = all
            .iter()
            .filter(|e| e.ejected_until.load(Ordering::Relaxed) > now)
            .count();
        let allowed = if o.max_ejected_percent == 0 {
            0
        } else {
            (all.len() * o.max_ejected_percent as usize / 100).max(1)
        };
        if ejected >= allowed || h.ejected_until.load(Ordering::Relaxed) > now {
            return;
        }
        let n = h.ejections.fetch_add(1, Ordering::Relaxed).min(5);
        let time = (o.ejection * (1 << n)).min(Duration::from_secs(300));
        h.ejected_until
            .store(now + time.as_millis() as u64, Ordering::Relaxed);
        h.failures.store(0, Ordering::Relaxed);
        h.gauge.set(0);
        let (svc, eps) = &self.names[service];
        self.metrics
            .ejections
            .get_or_create(&EndpointLabels {
                service: svc.clone(),
                endpoint: eps[endpoint].clone(),
            })
            .inc();
        tracing::warn!(
            service = %svc,
            endpoint = %eps[endpoint],
            failures,
            ejected_for_ms = time.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
    }

    /// Sets an endpoint's active health; a passing check also ends an ejection.
    pub(crate) fn set_active(&self, service: usize, endpoint: usize, ok: bool) {
        let h = &self.endpoints[service][endpoint];
        h.active_ok.store(ok, Ordering::Relaxed);
        if ok {
            h.ejected_until.store(0, Ordering::Relaxed);
            h.ejections.store(0, Ordering::Relaxed);
            h.failures.store(0, Ordering::Relaxed);
        }
        h.gauge.set(ok as i64);
    }

    /// What `/readyz?verbose` shows: every local endpoint's health and every peer's
    /// state and round-trip time (`up` is null for a peer that is not probed).
    pub fn detail(&self, config: &Config) -> serde_json::Value {
        let now = self.now_ms();
        let services: Vec<serde_json::Value> = config
            .services
            .iter()
            .enumerate()
            .map(|(s, svc)| {
                let endpoints: Vec<serde_json::Value> = svc
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(e, ep)| {
                        let h = &self.endpoints[s][e];
                        let until = h.ejected_until.load(Ordering::Relaxed);
                        serde_json::json!({
                            "endpoint": ep.url,
                            "available": self.available(s, e),
                            "health_checks_pass": h.active_ok.load(Ordering::Relaxed),
                            "ejected_for_ms": until.saturating_sub(now),
                            "consecutive_failures": h.failures.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                let peers: Vec<&str> = self.offered[s]
                    .iter()
                    .map(|&i| config.peers[i].name.as_str())
                    .collect();
                serde_json::json!({ "service": svc.name, "endpoints": endpoints, "peers": peers })
            })
            .collect();
        let peers: Vec<serde_json::Value> = config
            .peers
            .iter()
            .zip(&self.peers)
            .map(|(p, st)| {
                let probed = !p.services.is_empty();
                // a reverse link: which side dials, and the links open
                let reverse = if p.dials_reverse() {
                    serde_json::json!({ "this_node": "dials" })
                } else if p.accepts_reverse() {
                    serde_json::json!({ "this_node": "accepts", "links": self.links.count(&p.name) })
                } else {
                    serde_json::Value::Null
                };
                serde_json::json!({
                    "peer": p.name,
                    "region": p.region,
                    "probed": probed,
                    "up": probed.then(|| st.is_up()),
                    "rtt_ms": st.rtt().map(|r| r.as_secs_f64() * 1e3),
                    "reverse": reverse,
                })
            })
            .collect();
        serde_json::json!({ "services": services, "peers": peers })
    }

    /// The endpoint's health gauge catches up with an ejection that has run out.
    pub(crate) fn refresh_gauges(&self) {
        let now = self.now_ms();
        for eps in &self.endpoints {
            for h in eps {
                let ok = h.active_ok.load(Ordering::Relaxed)
                    && h.ejected_until.load(Ordering::Relaxed) <= now;
                h.gauge.set(ok as i64);
            }
        }
    }
}

/// Retries of requests that may have reached a service are paid from a budget that
/// each request sent adds `ratio` to, topped up by `min_per_second` whatever the
/// traffic (as linkerd's and Envoy's retry budgets): retries can add at most that
/// much load, so a failing region cannot be retried into the ground.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, per_second: f64) -> Self {
        Self {
            ratio,
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Unspent budget is kept up to this, so a quiet spell cannot bank a storm.
    fn cap(&self) -> f64 {
        100.0 + self.per_second * 10.0
    }

    /// A request was sent.
    pub fn deposit(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = (s.0 + self.ratio).min(self.cap());
        }
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.per_second;
        s.0 = (s.0 + refill).min(self.cap());
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(text: &str) -> (Config, Arc<Fleet>) {
        let (cfg, _) = crate::config::compile(std::path::Path::new("t.toml"), text)
            .unwrap_or_else(|r| panic!("{r:?}"));
        let f = Fleet::new(&cfg, Metrics::new("t", "h"), None);
        (cfg, f)
    }

    const PEERS: &str = r#"
[node]
name = "a"
region = "eu"
[[service]]
name = "s"
protocol = "http"
FAILOVER
[[peer]]
name = "far"
region = "ap"
address = "127.0.0.1:1"
identity = "spiffe://t/node/far"
services = ["s"]
[[peer]]
name = "near"
region = "us"
address = "127.0.0.1:2"
identity = "spiffe://t/node/near"
services = ["s"]
[[peer]]
name = "home"
region = "eu"
address = "127.0.0.1:3"
identity = "spiffe://t/node/home"
services = ["s"]
"#;

    #[test]
    fn peers_are_ordered_by_failover_list_region_then_rtt() {
        let (cfg, f) = fleet(&PEERS.replace("FAILOVER", ""));
        let names = |order: Vec<usize>| -> Vec<&str> {
            order.iter().map(|&i| cfg.peers[i].name.as_str()).collect()
        };
        f.peers[0].sample_rtt(Duration::from_millis(120));
        f.peers[1].sample_rtt(Duration::from_millis(40));
        f.peers[2].sample_rtt(Duration::from_millis(90));
        // own region first, then by round-trip time
        assert_eq!(names(f.peer_order(&cfg, 0, &[])), ["home", "near", "far"]);
        // RTTs change: the order follows
        for _ in 0..20 {
            f.peers[0].sample_rtt(Duration::from_millis(10));
        }
        assert_eq!(names(f.peer_order(&cfg, 0, &[])), ["home", "far", "near"]);
        // a peer that is down is skipped; where the request came from, too
        f.peers[2].set_up(false);
        assert_eq!(names(f.peer_order(&cfg, 0, &[Some("far")])), ["near"]);
        // all down: tried anyway
        f.peers[0].set_up(false);
        f.peers[1].set_up(false);
        assert_eq!(names(f.peer_order(&cfg, 0, &[])).len(), 3);

        // a failover list overrides, by peer or region
        let (cfg, f) = fleet(&PEERS.replace("FAILOVER", "failover = [\"ap\", \"near\"]"));
        let names = |order: Vec<usize>| -> Vec<String> {
            order.iter().map(|&i| cfg.peers[i].name.clone()).collect()
        };
        assert_eq!(names(f.peer_order(&cfg, 0, &[])), ["far", "near", "home"]);
    }

    #[test]
    fn ejection_is_bounded_and_grows() {
        let text = PEERS.replace(
            "FAILOVER",
            "endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\", \"http://127.0.0.1:3\"]\n\
             outlier = { consecutive_failures = 2, ejection = \"1s\", max_ejected_percent = 40 }",
        );
        let (_, f) = fleet(&text);
        f.record(0, 0, false);
        assert!(f.available(0, 0), "one failure is not enough");
        f.record(0, 0, false);
        assert!(!f.available(0, 0), "two in a row eject");
        // 40% of 3 endpoints: only one may be out at a time
        f.record(0, 1, false);
        f.record(0, 1, false);
        assert!(f.available(0, 1));
        // a success resets the count
        f.record(0, 2, false);
        f.record(0, 2, true);
        f.record(0, 2, false);
        assert!(f.available(0, 2));
        // a passing active check ends an ejection
        f.set_active(0, 0, true);
        assert!(f.available(0, 0));
    }

    #[test]
    fn the_budget_allows_the_ratio_and_no_more() {
        let b = RetryBudget::new(0.2, 0.0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert!((19..=20).contains(&granted), "{granted}");
        assert!(!b.withdraw());
    }

    #[test]
    fn the_budget_refills_with_time() {
        let b = RetryBudget::new(0.0, 1000.0);
        while b.withdraw() {}
        std::thread::sleep(Duration::from_millis(20));
        assert!(b.withdraw());
    }
}
