//! Traffic-spike detection: per service and per calling peer, requests and errors are
//! counted (atomics on the request path), and once a second the control thread folds
//! each count into a moving baseline — an exponentially weighted mean and variance —
//! and flags a departure beyond `sensitivity` deviations that lasts `sustain`
//! seconds: `fedport_traffic_spike{service,peer,kind}` goes to 1, an event is counted,
//! and one WARN line is logged when it starts and one when it ends — never a line per
//! request. The baseline does not learn from a spike in progress.

use crate::config::{Config, Spikes};
use crate::telemetry::{Metrics, SpikeLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Request and error counts, written on the request path.
#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
}

/// What the workers count for the detector.
#[derive(Debug)]
pub struct Traffic {
    services: Vec<Counts>,
    peers: Vec<Counts>,
}

impl Traffic {
    pub fn new(config: &Config) -> Arc<Self> {
        Arc::new(Self {
            services: config.services.iter().map(|_| Counts::default()).collect(),
            peers: config.peers.iter().map(|_| Counts::default()).collect(),
        })
    }

    /// One request of `service` (from `peer`, if a peer node sent it) has ended.
    pub fn record(&self, service: usize, peer: Option<usize>, error: bool) {
        let add = |c: &Counts| {
            c.requests.fetch_add(1, Ordering::Relaxed);
            if error {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        };
        if let Some(c) = self.services.get(service) {
            add(c);
        }
        if let Some(c) = peer.and_then(|p| self.peers.get(p)) {
            add(c);
        }
    }
}

/// A moving mean and variance (exponentially weighted).
#[derive(Debug, Default, Clone, Copy)]
struct Baseline {
    mean: f64,
    var: f64,
    seen: u64,
}

impl Baseline {
    fn learn(&mut self, x: f64, alpha: f64) {
        if self.seen == 0 {
            self.mean = x;
        } else {
            let d = x - self.mean;
            self.mean += alpha * d;
            self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        }
        self.seen += 1;
    }

    /// The level past which `x` departs: mean plus `k` deviations, the deviation
    /// floored at `floor` (a perfectly steady baseline must not make every wobble a spike).
    fn threshold(&self, k: f64, floor: f64) -> f64 {
        self.mean + k * self.var.sqrt().max(floor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Rate,
    ErrorRate,
}

#[derive(Debug)]
struct Watch {
    kind: Kind,
    baseline: Baseline,
    above: u32,
    below: u32,
    active: bool,
    peak: f64,
    gauge: Gauge,
    events: Counter,
}

impl Watch {
    fn new(kind: Kind, labels: SpikeLabels, m: &Metrics) -> Self {
        Self {
            kind,
            baseline: Baseline::default(),
            above: 0,
            below: 0,
            active: false,
            peak: 0.0,
            gauge: m.spike.get_or_create(&labels).clone(),
            events: m.spike_events.get_or_create(&labels).clone(),
        }
    }
}

/// One watched series (a service, or a calling peer) and its two watches.
#[derive(Debug)]
struct Series {
    what: &'static str,
    name: String,
    last: (u64, u64),
    rate: Watch,
    errors: Watch,
}

/// The detector, ticked once a second by the control thread.
#[derive(Debug)]
pub struct Detector {
    cfg: Spikes,
    traffic: Arc<Traffic>,
    series: Vec<Series>,
    ticks: u64,
}

impl Detector {
    pub fn new(config: &Config, traffic: Arc<Traffic>, m: &Metrics) -> Self {
        let mut series = Vec::new();
        let mut add = |what: &'static str, name: &str, service: &str, peer: &str| {
            let labels = |kind: &str| SpikeLabels {
                service: service.to_owned(),
                peer: peer.to_owned(),
                kind: kind.to_owned(),
            };
            series.push(Series {
                what,
                name: name.to_owned(),
                last: (0, 0),
                rate: Watch::new(Kind::Rate, labels("rate"), m),
                errors: Watch::new(Kind::ErrorRate, labels("error_rate"), m),
            });
        };
        for s in &config.services {
            add("service", &s.name, &s.name, "");
        }
        for p in &config.peers {
            add("peer", &p.name, "", &p.name);
        }
        Self {
            cfg: config.spikes.clone(),
            traffic,
            series,
            ticks: 0,
        }
    }

    /// Takes over what the running generation's detector has learnt: each series
    /// still in the config keeps its baselines, its events in progress and the
    /// warm-up already served (a reload, a rotation or a registry change would
    /// otherwise blind detection for a warm-up each time); an event in progress on a
    /// series the config no longer has ends, so that its gauge does not stay at 1.
    pub fn inherit(&mut self, old: &mut Detector) {
        self.ticks = self.ticks.max(old.ticks);
        for o in &mut old.series {
            match self
                .series
                .iter_mut()
                .find(|n| n.what == o.what && n.name == o.name)
            {
                Some(n) => {
                    std::mem::swap(&mut n.rate, &mut o.rate);
                    std::mem::swap(&mut n.errors, &mut o.errors);
                }
                None => {
                    for w in [&mut o.rate, &mut o.errors] {
                        if w.active {
                            w.active = false;
                            w.gauge.set(0);
                            tracing::warn!(
                                target: "fedport::spike",
                                what = o.what, name = %o.name,
                                "traffic spike ended: no longer in the configuration"
                            );
                        }
                    }
                }
            }
        }
    }

    /// One second has passed: read the counts and judge them.
    pub fn tick(&mut self) {
        self.ticks += 1;
        let warm = self.ticks > self.cfg.warmup.as_secs();
        let alpha = 2.0 / (self.cfg.window.as_secs_f64().max(1.0) + 1.0);
        let counts = self.traffic.services.iter().chain(&self.traffic.peers);
        for (s, c) in self.series.iter_mut().zip(counts) {
            let now = (
                c.requests.load(Ordering::Relaxed),
                c.errors.load(Ordering::Relaxed),
            );
            let (r, e) = (
                now.0.saturating_sub(s.last.0) as f64,
                now.1.saturating_sub(s.last.1) as f64,
            );
            s.last = now;
            judge(&self.cfg, warm, alpha, s.what, &s.name, &mut s.rate, r, r);
            // the error ratio means something only with enough requests behind it; an
            // error spike whose traffic has dwindled below that is over, not frozen
            let ratio = if r > 0.0 && r >= self.cfg.min_rate {
                Some(e / r)
            } else {
                s.errors.active.then_some(0.0)
            };
            if let Some(x) = ratio {
                judge(&self.cfg, warm, alpha, s.what, &s.name, &mut s.errors, x, r);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn judge(
    cfg: &Spikes,
    warm: bool,
    alpha: f64,
    what: &str,
    name: &str,
    w: &mut Watch,
    x: f64,
    rate: f64,
) {
    let (floor, minimum) = match w.kind {
        Kind::Rate => ((0.1 * w.baseline.mean).max(1.0), cfg.min_rate),
        Kind::ErrorRate => (0.02, cfg.min_error_ratio),
    };
    let limit = w.baseline.threshold(cfg.sensitivity, floor);
    let kind = match w.kind {
        Kind::Rate => "rate",
        Kind::ErrorRate => "error_rate",
    };
    let sustain = cfg.sustain.as_secs().max(1) as u32;
    if !w.active {
        if warm && x >= minimum && x > limit && rate >= cfg.min_rate {
            w.above += 1;
            w.peak = w.peak.max(x);
            if w.above >= sustain {
                w.active = true;
                w.below = 0;
                w.gauge.set(1);
                w.events.inc();
                tracing::warn!(
                    target: "fedport::spike",
                    what, name, kind,
                    baseline = w.baseline.mean,
                    threshold = limit,
                    now = x,
                    "traffic spike started"
                );
            }
        } else {
            w.above = 0;
            w.peak = 0.0;
            w.baseline.learn(x, alpha);
        }
        return;
    }
    w.peak = w.peak.max(x);
    if x <= limit {
        w.below += 1;
        if w.below >= sustain {
            w.active = false;
            w.above = 0;
            w.gauge.set(0);
            tracing::warn!(
                target: "fedport::spike",
                what, name, kind,
                baseline = w.baseline.mean,
                peak = w.peak,
                "traffic spike ended"
            );
            w.peak = 0.0;
        }
    } else {
        w.below = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[node]
name = "a"
region = "r"
[[service]]
name = "s"
protocol = "http"
endpoints = ["http://127.0.0.1:1"]
[spikes]
warmup = "10s"
"#;

    fn detector(min_rate: f64) -> (Detector, Arc<Traffic>, Arc<Metrics>) {
        let (mut cfg, _) = crate::config::compile(std::path::Path::new("t.toml"), CFG)
            .unwrap_or_else(|r| panic!("{r:?}"));
        cfg.spikes.min_rate = min_rate;
        let m = Metrics::new("a", "h");
        let t = Traffic::new(&cfg);
        (Detector::new(&cfg, t.clone(), &m), t, m)
    }

    fn second(d: &mut Detector, t: &Traffic, requests: u64, errors: u64) {
        for i in 0..requests {
            t.record(0, None, i < errors);
        }
        d.tick();
    }

    /// 40 s of 20 req/s without errors, then 4 s with half of them failing.
    fn steady_then_errors(d: &mut Detector, t: &Traffic) {
        for _ in 0..40 {
            second(d, t, 20, 0);
        }
        for _ in 0..4 {
            second(d, t, 20, 10);
        }
    }

    #[test]
    fn a_sustained_burst_is_one_event_and_it_ends() {
        let (mut d, t, m) = detector(10.0);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..60 {
            second(&mut d, &t, 18 + rng.u64(0..5), 0);
        }
        assert_eq!(d.series[0].rate.events.get(), 0, "steady: no event");
        for s in 0..5 {
            second(&mut d, &t, 200, 0);
            assert_eq!(
                d.series[0].rate.gauge.get(),
                i64::from(s >= 2),
                "second {s}"
            );
        }
        for _ in 0..5 {
            second(&mut d, &t, 20, 0);
        }
        assert_eq!(d.series[0].rate.gauge.get(), 0, "it ended");
        assert_eq!(
            d.series[0].rate.events.get(),
            1,
            "one event, not one per second"
        );
        assert!(m.encode().contains("fedport_traffic_spike_events_total"));
    }

    #[test]
    fn error_rate_spikes_and_quiet_services_do_not() {
        let (mut d, t, _) = detector(10.0);
        steady_then_errors(&mut d, &t);
        assert_eq!(d.series[0].errors.events.get(), 1);
        assert_eq!(d.series[0].rate.events.get(), 0);
        // below the minimum rate nothing is judged
        let (mut d, t, _) = detector(10.0);
        for _ in 0..40 {
            second(&mut d, &t, 1, 0);
        }
        for _ in 0..5 {
            second(&mut d, &t, 8, 0);
        }
        assert_eq!(d.series[0].rate.events.get(), 0);
    }

    #[test]
    fn an_idle_second_with_no_minimum_rate_does_not_poison_the_baseline() {
        let (mut d, t, _) = detector(0.0);
        second(&mut d, &t, 0, 0);
        assert!(!d.series[0].errors.baseline.mean.is_nan());
        steady_then_errors(&mut d, &t);
        assert_eq!(d.series[0].errors.events.get(), 1);
    }

    #[test]
    fn an_error_spike_whose_traffic_stops_ends() {
        let (mut d, t, _) = detector(10.0);
        steady_then_errors(&mut d, &t);
        assert_eq!(d.series[0].errors.gauge.get(), 1);
        for _ in 0..5 {
            second(&mut d, &t, 0, 0);
        }
        assert_eq!(d.series[0].errors.gauge.get(), 0, "callers gave up: over");
    }

    #[test]
    fn a_new_generation_takes_over_baselines_and_events() {
        let (mut d, t, m) = detector(10.0);
        for _ in 0..40 {
            second(&mut d, &t, 20, 0);
        }
        for _ in 0..3 {
            second(&mut d, &t, 200, 0);
        }
        assert_eq!(d.series[0].rate.gauge.get(), 1);
        // the same config again (a reload): the event goes on and ends as it should
        let (mut cfg, _) = crate::config::compile(std::path::Path::new("t.toml"), CFG)
            .unwrap_or_else(|r| panic!("{r:?}"));
        cfg.spikes.min_rate = 10.0;
        let t2 = Traffic::new(&cfg);
        let mut d2 = Detector::new(&cfg, t2.clone(), &m);
        d2.inherit(&mut d);
        assert_eq!(d2.series[0].rate.gauge.get(), 1, "still in progress");
        for _ in 0..5 {
            second(&mut d2, &t2, 20, 0);
        }
        assert_eq!(d2.series[0].rate.gauge.get(), 0, "and over");
        // warm-up is not served again: a burst is an event at once
        for _ in 0..3 {
            second(&mut d2, &t2, 200, 0);
        }
        assert_eq!(d2.series[0].rate.events.get(), 2);
        // a service removed while its event runs: the event ends
        let empty = crate::config::compile(
            std::path::Path::new("t.toml"),
            "[node]\nname = \"a\"\nregion = \"r\"\n",
        )
        .unwrap_or_else(|r| panic!("{r:?}"))
        .0;
        let mut d3 = Detector::new(&empty, Traffic::new(&empty), &m);
        d3.inherit(&mut d2);
        assert_eq!(d2.series[0].rate.gauge.get(), 0);
    }
}
