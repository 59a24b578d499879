//! Hot reload under a bounded steady load: 20 reloads (SIGHUP) and file-change reloads
//! lose no request; a rule change takes effect for new requests on connections opened
//! before it; a listener added by a reload accepts and one removed stops; a broken file
//! changes nothing, is refused with `file:line:col` and counted.

use crate::support::upstream::{self, Proto};
use crate::support::{free_port, node_config_with_rules, Fedport, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(pki: &Pki, up: &str, timeout: &str, methods: &str, extra: &str) -> String {
    node_config_with_rules(
        pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{up}\"]\ntimeout = \"{timeout}\"\n{extra}"
        ),
        &format!("[[allow]]\nfrom = \"*\"\nto = \"orders\"\nmethods = [{methods}]\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_nothing_and_take_effect() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let url = up.url(Proto::H2c);
    let fp = Fedport::start(&config(&pki, &url, "15s", "\"GET /\"", ""));
    let port = fp.port("internal");
    let reloads_ok = || fp.metric(r#"fedport_config_reloads_total{result="ok"}"#);
    let write_and_hup = |text: &str| {
        let before = reloads_ok();
        std::fs::write(&fp.config, text).unwrap();
        fp.signal("HUP");
        crate::support::wait_until("the reload", Duration::from_secs(10), || {
            reloads_ok() > before
        });
    };

    // bounded steady load on connections opened before any reload
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
                let req = http::Request::get(format!("https://localhost:{port}/orders"))
                    .header("fed-service", "orders")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                let ok = match s.send_request(req).await {
                    Ok(r) => {
                        let status = r.status();
                        r.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let mut post = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
    let post_status = |s: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>| {
        let req = http::Request::post(format!("https://localhost:{port}/orders"))
            .header("fed-service", "orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let mut s = s.clone();
        async move { s.send_request(req).await.unwrap().status().as_u16() }
    };
    assert_eq!(post_status(&mut post).await, 403, "POST is not granted yet");

    // 20 reloads, alternating a harmless change
    tokio::task::block_in_place(|| {
        for i in 0..20 {
            let timeout = if i % 2 == 0 { "14s" } else { "15s" };
            write_and_hup(&config(&pki, &url, timeout, "\"GET /\"", ""));
        }
    });
    // a rule change, picked up from the file alone (no signal): new requests on the
    // connection opened before it are granted
    tokio::task::block_in_place(|| {
        let before = reloads_ok();
        std::fs::write(
            &fp.config,
            config(&pki, &url, "15s", "\"GET /\", \"POST /\"", ""),
        )
        .unwrap();
        crate::support::wait_until("the file-change reload", Duration::from_secs(10), || {
            reloads_ok() > before
        });
    });
    // the count moves once every worker has been sent the new generation; each takes
    // it up on its next turn
    let granted = Instant::now() + Duration::from_secs(5);
    loop {
        let status = post_status(&mut post).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < granted,
            "POST granted after the reload: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // a broken file: refused with its position, counted, nothing changes
    tokio::task::block_in_place(|| {
        std::fs::write(&fp.config, "[node]\nname = \"x\"\nregion = \n").unwrap();
        fp.signal("HUP");
        crate::support::wait_until("the refusal", Duration::from_secs(10), || {
            fp.metric(r#"fedport_config_reloads_total{result="error"}"#) >= 1.0
        });
    });
    let log = fp.log_text();
    assert!(log.contains("configuration refused"), "{log}");
    assert!(
        log.contains("fedport.toml:3:"),
        "file:line:col in the log:\n{log}"
    );
    assert_eq!(
        post_status(&mut post).await,
        200,
        "the running config still serves"
    );

    // a listener added by a reload accepts; removed by the next, it stops
    let extra = free_port();
    let with_extra = config(&pki, &url, "15s", "\"GET /\", \"POST /\"", "")
        + &format!("\n[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:{extra}\"\n");
    tokio::task::block_in_place(|| write_and_hup(&with_extra));
    let c = pki.curl_client();
    let extra_url = format!("https://localhost:{extra}/orders");
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend(["-H", "fed-service: orders", &extra_url]);
    assert_eq!(crate::support::curl(&a).0, 200, "the new listener serves");
    // a request in flight on it when it is removed still finishes
    let mut on_extra = crate::support::h2_connect::<Full<Bytes>>(
        &pki,
        format!("127.0.0.1:{extra}").parse().unwrap(),
    )
    .await;
    let slow = tokio::spawn(async move {
        let req = http::Request::get(format!("https://localhost:{extra}/orders"))
            .header("fed-service", "orders")
            .header("x-sleep-ms", "700")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = on_extra.send_request(req).await.unwrap();
        let status = r.status();
        r.into_body().collect().await.unwrap();
        status
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| {
        write_and_hup(&config(&pki, &url, "15s", "\"GET /\", \"POST /\"", ""))
    });
    assert_eq!(
        slow.await.unwrap(),
        200,
        "in flight on a removed listener: finished"
    );
    tokio::task::block_in_place(|| {
        crate::support::wait_until(
            "the removed listener closes",
            Duration::from_secs(5),
            || std::net::TcpStream::connect(("127.0.0.1", extra)).is_err(),
        )
    });

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (n, f) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let took: Vec<f64> = fp
        .log_text()
        .lines()
        .filter_map(|l| l.split("took_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    eprintln!(
        "{n} requests during {} reloads, {f} failed; reload took {:.1}–{:.1} ms",
        took.len(),
        took.iter().cloned().fold(f64::MAX, f64::min),
        took.iter().cloned().fold(0.0, f64::max)
    );
    // /config shows what runs: its hash, the TLS paths, never key material
    let shown: serde_json::Value = serde_json::from_str(&fp.admin_get("/config")).unwrap();
    let running = std::fs::read_to_string(&fp.config).unwrap();
    let hash = fedport::config::text_hash(&running);
    assert_eq!(shown["hash"], hash.as_str());
    assert_eq!(shown["tls"]["key"], pki.node.key.display().to_string());
    assert!(!fp.admin_get("/config").contains("PRIVATE KEY"));
    assert_eq!(shown["access"][1]["method"], "POST / (every path)");
    let metrics = fp.admin_get("/metrics");
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("fedport_config_info{"))
        .collect();
    assert_eq!(info.len(), 1, "only the running config: {info:?}");
    assert!(info[0].contains(&hash), "{info:?}");
    assert!(n > 200, "the load ran: {n}");
    assert_eq!(f, 0, "no request failed during the reloads");
    assert!(took.len() >= 23, "{took:?}");
}

/// A reload (here the same file again, as a certificate rotation or a registry change
/// also does) keeps what the node has learnt of its endpoints: an ejected endpoint
/// stays out of rotation instead of being tried afresh.
#[test]
fn a_reload_keeps_an_ejected_endpoint_out() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let dead = format!("h2c://127.0.0.1:{}", free_port());
    let fp = Fedport::start(&node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{}\", \"{dead}\"]\n\
             outlier = {{ consecutive_failures = 1, ejection = \"60s\", max_ejected_percent = 50 }}\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"*\"\nto = \"*\"\n",
    ));
    let port = fp.port("internal");
    let get = || crate::federation::get(&pki, port, "orders", &[]).0;
    let healthy = format!(r#"fedport_upstream_healthy{{service="orders",endpoint="{dead}"}}"#);
    let failed_connects = r#"fedport_upstream_connects_total{service="orders",result="error"}"#;
    crate::support::wait_until("the dead endpoint ejected", Duration::from_secs(10), || {
        assert_eq!(
            get(),
            200,
            "a refused connection goes to the other endpoint"
        );
        fp.metric(&healthy) == 0.0 && fp.metric(failed_connects) >= 1.0
    });
    let failed = fp.metric(failed_connects);

    fp.signal("HUP");
    crate::support::wait_until("the reload", Duration::from_secs(10), || {
        fp.metric(r#"fedport_config_reloads_total{result="ok"}"#) >= 1.0
    });
    for _ in 0..20 {
        assert_eq!(get(), 200);
    }
    assert_eq!(fp.metric(&healthy), 0.0, "still out after the reload");
    assert_eq!(
        fp.metric(failed_connects),
        failed,
        "nothing was sent to the ejected endpoint after the reload"
    );
}

/// A file refused for a reason that passes — here a new listener's port briefly held by
/// another process — is tried again without anyone touching it, and the refusal is
/// logged and counted once, not on every try.
#[test]
fn a_refused_file_is_tried_again_once_what_refused_it_passes() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let url = up.url(Proto::H2c);
    let fp = Fedport::start(&config(&pki, &url, "15s", "\"GET /\"", ""));
    let port = free_port();
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let with_extra = config(&pki, &url, "15s", "\"GET /\"", "")
        + &format!("\n[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:{port}\"\n");
    std::fs::write(&fp.config, with_extra).unwrap();
    let count = |result: &str| {
        fp.metric(&format!(
            r#"fedport_config_reloads_total{{result="{result}"}}"#
        ))
    };
    crate::support::wait_until("the refusal", Duration::from_secs(10), || {
        count("error") >= 1.0
    });
    // at least one more try fails the same way while the port is held
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(count("ok"), 0.0);
    drop(held);
    crate::support::wait_until("the retried reload", Duration::from_secs(10), || {
        count("ok") >= 1.0
    });
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert_eq!(count("error"), 1.0, "the same refusal counted once");
    assert_eq!(
        fp.log_text().matches("configuration refused").count(),
        1,
        "{}",
        fp.log_text()
    );
}
