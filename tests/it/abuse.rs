//! Hostile HTTP/2 clients, driven by raw frames (tests/py/h2_abuse.py: Python's
//! hyperframe and hpack): rapid reset paced and in a burst, CONTINUATION flood, an
//! oversized header block, SETTINGS, PING, PRIORITY and WINDOW_UPDATE floods, a window
//! overflow, empty frames, unasked PING acknowledgements, a header block that never
//! ends or trickles in a byte at a time, and 500 slowloris connections. Each attacker
//! gets GOAWAY and is cut and counted by reason; meanwhile a well-behaved client's
//! requests all succeed and fedport's memory stays bounded.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, Fedport, Pki};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Each attack as an identity of its own: the reset allowance is an identity's, and an
/// identity past it is cut on its next connection before anything else is looked at.
fn attack(pki: &Pki, port: u16, name: &str, extra: &[&str]) -> serde_json::Value {
    let who = pki.client_cert(&format!("attack-{}", name.replace('_', "-")));
    crate::hostile::abuse_as(pki, port, &who, name, extra)
}

/// Asserts that the attacker was sent GOAWAY with `code` and cut, and that the cut was
/// counted under `reason`.
fn cut(fp: &Fedport, v: &serde_json::Value, code: u64, reason: &str) {
    assert_eq!(v["goaway"]["code"], code, "GOAWAY code: {v}");
    assert_eq!(v["closed"], true, "the connection is closed: {v}");
    if code == 0xb && reason != "h2_enhance_your_calm" {
        assert_eq!(
            v["goaway"]["debug"], reason,
            "the reason goes with GOAWAY: {v}"
        );
    }
    let sample = format!(r#"fedport_rejections_total{{listener="internal",reason="{reason}"}}"#);
    crate::support::wait_until(&sample, Duration::from_secs(3), || {
        fp.metric(&sample) >= 1.0
    });
}

/// The reason a GOAWAY(ENHANCE_YOUR_CALM) stands for: fedport's guard names it in the
/// debug data; the codec's own (e.g. `too_many_resets`) count as `h2_enhance_your_calm`.
fn reason_of(v: &serde_json::Value) -> &str {
    match v["goaway"]["debug"].as_str() {
        Some(d) if d.starts_with("h2_") => d,
        _ => "h2_enhance_your_calm",
    }
}

#[test]
fn hostile_http2_clients_are_cut_while_others_are_served() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let cfg = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    )
    .replace(
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\n",
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\n",
    )
    .replace(
        "role = \"local\"\n",
        "role = \"local\"\nheader_timeout = \"2s\"\n",
    )
    .replace("[tls]\n", "[tls]\nhandshake_timeout = \"3s\"\n");
    assert!(cfg.contains("header_timeout = \"2s\"") && cfg.contains("handshake_timeout"));
    let fp = Fedport::start(&cfg);
    let port = fp.port("internal");

    // the well-behaved client: a new mTLS connection and a request every ~50 ms
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let good = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let mut args: Vec<String> = pki.curl_client();
        args.extend([
            "--http2".into(),
            "-H".into(),
            "fed-service: orders".into(),
            format!("https://localhost:{port}/polite"),
        ]);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let (code, body, _) = curl(&a);
                if code == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("well-behaved request failed: {code} {body}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // the control: an ordinary client on a raw connection is answered, not cut
    let v = attack(&pki, port, "polite", &["--count", "20", "--wait", "2"]);
    assert_eq!(v["responses"], 20, "{v}");
    assert!(v["goaway"].is_null() && v["closed"] == false, "{v}");

    // CVE-2023-44487, paced so that every stream reaches the service before its reset:
    // past max_streams (1024) such streams in 10 s, fedport cuts it
    let v = attack(
        &pki,
        port,
        "rapid_reset",
        &["--count", "1100", "--path", "/slow?ms=2000"],
    );
    cut(&fp, &v, 0xb, "h2_rapid_reset");
    assert!(
        v["sent"].as_u64().unwrap() < 2200,
        "cut before the end: {v}"
    );
    // in one burst the streams are reset before any work starts: the codec's own limit
    // on resets of streams not yet accepted cuts it
    let v = attack(&pki, port, "rapid_reset_burst", &["--count", "1000"]);
    let why = reason_of(&v);
    assert!(
        ["h2_rapid_reset", "h2_enhance_your_calm"].contains(&why),
        "{v}"
    );
    cut(&fp, &v, 0xb, why);
    assert!(v["sent"].as_u64().unwrap() <= 2000, "{v}");

    let v = attack(&pki, port, "continuation_flood", &["--count", "10000"]);
    cut(&fp, &v, 0xb, "h2_continuation_flood");
    assert!(v["sent"].as_u64().unwrap() < 10000, "{v}");
    // the same with no ALPN: HTTP/2 by its preface alone is guarded too
    let sample = r#"fedport_rejections_total{listener="internal",reason="h2_continuation_flood"}"#;
    let before = fp.metric(sample);
    let v = attack(
        &pki,
        port,
        "continuation_flood",
        &["--count", "10000", "--no-alpn"],
    );
    cut(&fp, &v, 0xb, "h2_continuation_flood");
    assert!(v["sent"].as_u64().unwrap() < 10000, "{v}");
    crate::support::wait_until("the second cut counted", Duration::from_secs(3), || {
        fp.metric(sample) > before
    });

    let v = attack(&pki, port, "oversized_headers", &["--count", "100"]);
    cut(&fp, &v, 0xb, "h2_oversized_headers");

    for (name, reason) in [
        ("settings_flood", "h2_settings_flood"),
        ("ping_flood", "h2_ping_flood"),
        ("ping_ack_flood", "h2_ping_flood"),
        ("window_update_flood", "h2_window_update_flood"),
        ("priority_flood", "h2_priority_flood"),
        ("empty_frames", "h2_empty_frames"),
    ] {
        let v = attack(&pki, port, name, &["--count", "100000"]);
        cut(&fp, &v, 0xb, reason);
        assert!(
            v["sent"].as_u64().unwrap() < 100000,
            "{name} is cut long before 100,000 frames: {v}"
        );
    }

    // window update past 2^31-1: the codec's FLOW_CONTROL_ERROR, counted
    let v = attack(&pki, port, "window_overflow", &[]);
    cut(&fp, &v, 0x3, "h2_flow_control_error");

    // a header block that never ends: cut after the 2 s header timeout
    let v = attack(&pki, port, "slow_headers", &["--wait", "8"]);
    cut(&fp, &v, 0xb, "slow_headers");
    let after = v["closed_after"].as_f64().unwrap();
    assert!((1.5..6.0).contains(&after), "cut after about 2 s: {v}");
    // a header block in one frame whose payload trickles in: cut the same way
    let v = attack(&pki, port, "trickled_headers", &["--wait", "8"]);
    cut(&fp, &v, 0xb, "slow_headers");
    let after = v["closed_after"].as_f64().unwrap();
    assert!((1.5..6.0).contains(&after), "cut after about 2 s: {v}");
    assert_eq!(v["responses"], 0, "{v}");

    // HTTP/1.1 request headers that never end, on the cleartext local port
    let mut s = std::net::TcpStream::connect(fp.addr("local")).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nhost: localhost\r\nfed-service: orders\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let after = t0.elapsed().as_secs_f64();
    assert!(
        (1.5..6.0).contains(&after),
        "HTTP/1.1 slow headers cut after {after:.1} s"
    );
    let sample = r#"fedport_rejections_total{listener="local",reason="slow_headers"}"#;
    crate::support::wait_until(sample, Duration::from_secs(3), || fp.metric(sample) >= 1.0);

    // 500 connections trickling a TLS handshake one byte a second for 8 s: each is cut
    // at the 3 s handshake timeout, and the well-behaved client goes on being served
    let served_before = ok.load(Ordering::Relaxed);
    let v = attack(
        &pki,
        port,
        "slowloris",
        &["--count", "500", "--seconds", "8"],
    );
    assert!(v["opened"].as_u64().unwrap() >= 500, "{v}");
    assert!(
        v["cut_by_server"].as_u64().unwrap() >= 400,
        "the server cut the slow handshakes: {v}"
    );
    let timeouts =
        fp.metric(r#"fedport_tls_handshake_failures_total{listener="internal",reason="timeout"}"#);
    assert!(timeouts >= 400.0, "slow handshakes counted: {timeouts}");
    let served = ok.load(Ordering::Relaxed) - served_before;
    assert!(served >= 20, "served during the slowloris: {served}");

    stop.store(true, Ordering::Relaxed);
    good.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("well-behaved client: {ok} served, {failed} failed");
    assert_eq!(
        failed, 0,
        "no well-behaved request failed during the attacks"
    );
    assert!(ok >= 100, "{ok}");
    let rss = fp.peak_rss_kib();
    eprintln!("fedport peak RSS {rss} KiB");
    assert!(rss < 128 * 1024, "bounded memory: peak RSS {rss} KiB");
    // the log says each kind once, not once per frame or connection
    let log = fp.log_text();
    let lines = log.matches("connection cut for abuse").count();
    assert!(
        (5..=20).contains(&lines),
        "{lines} log lines for the cuts:\n{log}"
    );
}
