//! Traffic-spike detection on a real node under real load (bounded in time and count):
//! a minute of steady traffic with normal jitter, then a 10× burst on one service and
//! the requests of another failing. Each is one event within 5 s — one WARN line
//! at its start, not one per request — and the steady service has none.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, Fedport, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Poisson arrivals at `rate` per second on one HTTP/2 connection, to `path` of
/// `service`, until `stop`; at most `max` requests.
async fn load(
    mut s: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
    service: &'static str,
    rate: Arc<std::sync::atomic::AtomicU64>,
    path: Arc<std::sync::Mutex<&'static str>>,
    stop: Arc<AtomicBool>,
    max: u64,
) {
    let mut rng = fastrand::Rng::new();
    let mut next = Instant::now();
    for _ in 0..max {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let r = rate.load(Ordering::Relaxed) as f64;
        next += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / r);
        tokio::time::sleep_until(next.into()).await;
        let p = *path.lock().unwrap();
        let req = http::Request::get(format!("https://localhost:{port}{p}"))
            .header("fed-service", service)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut s2 = s.clone();
        tokio::spawn(async move {
            if let Ok(r) = s2.send_request(req).await {
                let _ = r.into_body().collect().await;
            }
        });
        let _ = &mut s;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_and_an_error_spike_are_events_and_steady_traffic_is_not() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let services: String = ["steady", "burst", "errors"]
        .iter()
        .map(|n| {
            format!(
                "[[service]]\nname = \"{n}\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
                up.url(Proto::H2c)
            )
        })
        .collect();
    let fp = Fedport::start(&node_config(&pki, &services));
    let port = fp.port("internal");
    let stop = Arc::new(AtomicBool::new(false));
    let mut rates = Vec::new();
    let mut paths = Vec::new();
    let mut tasks = Vec::new();
    for service in ["steady", "burst", "errors"] {
        let s = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
        let rate = Arc::new(std::sync::atomic::AtomicU64::new(20));
        let path = Arc::new(std::sync::Mutex::new("/ok"));
        rates.push(rate.clone());
        paths.push(path.clone());
        tasks.push(tokio::spawn(load(
            s,
            port,
            service,
            rate,
            path,
            stop.clone(),
            20_000,
        )));
    }
    let events = |service: &str, kind: &str| {
        fp.metric(&format!(
            r#"fedport_traffic_spike_events_total{{service="{service}",peer="",kind="{kind}"}}"#
        ))
    };
    // a minute of steady traffic: the baselines learn it (warm-up is 30 s)
    tokio::time::sleep(Duration::from_secs(60)).await;
    let quiet: f64 = ["steady", "burst", "errors"]
        .iter()
        .flat_map(|s| [events(s, "rate"), events(s, "error_rate")])
        .sum();
    assert_eq!(quiet, 0.0, "a minute of steady traffic is no event");

    // 10× on one service; another's requests failing
    rates[1].store(200, Ordering::Relaxed);
    *paths[2].lock().unwrap() = "/status/503";
    let t = Instant::now();
    let (mut burst_at, mut errors_at) = (None, None);
    while t.elapsed() < Duration::from_secs(10) && (burst_at.is_none() || errors_at.is_none()) {
        if burst_at.is_none() && events("burst", "rate") >= 1.0 {
            burst_at = Some(t.elapsed());
        }
        if errors_at.is_none() && events("errors", "error_rate") >= 1.0 {
            errors_at = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("burst detected after {burst_at:?}, error spike after {errors_at:?}");
    let burst_at = burst_at.expect("the burst is an event");
    let errors_at = errors_at.expect("the error spike is an event");
    assert!(burst_at <= Duration::from_secs(5), "{burst_at:?}");
    assert!(errors_at <= Duration::from_secs(5), "{errors_at:?}");
    assert_eq!(
        fp.metric(r#"fedport_traffic_spike{service="burst",peer="",kind="rate"}"#),
        1.0
    );
    // back to normal: the events end
    rates[1].store(20, Ordering::Relaxed);
    *paths[2].lock().unwrap() = "/ok";
    tokio::task::block_in_place(|| {
        crate::support::wait_until("the burst ends", Duration::from_secs(15), || {
            fp.metric(r#"fedport_traffic_spike{service="burst",peer="",kind="rate"}"#) == 0.0
        })
    });
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(events("steady", "rate"), 0.0);
    assert_eq!(events("steady", "error_rate"), 0.0);
    assert_eq!(events("burst", "rate"), 1.0, "one event, however long");
    // one line when it starts and one when it ends, never one per request
    let log = fp.log_text();
    let started = log.matches("traffic spike started").count();
    let ended = log.matches("traffic spike ended").count();
    assert!((2..=3).contains(&started), "{started} starts:\n{log}");
    assert!(ended >= 1, "{log}");
}
