//! Overload protection under 5× the offered load: a per-identity rate limit holds
//! within 10% while another caller is unaffected, every refused request is refused
//! before it reaches the service (429 with a reason) — nothing is accepted and then
//! dropped — and fedport's memory stays bounded. A concurrency limit refuses with 503.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config_with_rules, Fedport, Pki};
use fedport::identity::pki::LeafSpec;
use std::process::{Command, Stdio};

fn bench(url: &str, cert: &str, key: &str, ca: &str, extra: &[&str]) -> std::process::Child {
    Command::new(crate::support::bin())
        .args([
            "bench",
            url,
            "-c",
            "2",
            "-m",
            "8",
            "--json",
            "-H",
            "fed-service: orders",
        ])
        .args(["--cert", cert, "--key", key, "--ca", ca])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn done(c: std::process::Child) -> serde_json::Value {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_per_identity_rate_limit_holds_under_five_times_the_load() {
    let pki = Pki::new();
    let bob = pki
        .authority
        .issue(&LeafSpec {
            common_name: "bob".into(),
            spiffe: Some("spiffe://fed.test/client/bob".into()),
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), "bob")
        .unwrap();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             limits = {{ concurrency = 1000 }}\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"*\"\nto = \"*\"\n\
         [[limit]]\nfrom = \"spiffe://fed.test/client/alice\"\nrate = 50\nburst = 10\n",
    ));
    let url = format!("https://localhost:{}/x", fp.port("internal"));
    let ca = pki.ca.display().to_string();
    let s = |p: &std::path::Path| p.display().to_string();
    // alice offers 250/s (5× her 50/s) for 4 s; bob 40/s meanwhile
    let alice = bench(
        &url,
        &s(&pki.client.cert),
        &s(&pki.client.key),
        &ca,
        &["--rate", "250", "-d", "4"],
    );
    let bob = bench(
        &url,
        &s(&bob.cert),
        &s(&bob.key),
        &ca,
        &["--rate", "40", "-d", "4"],
    );
    let (a, b) = (done(alice), done(bob));
    let ok = a["outcomes"]["200"].as_u64().unwrap_or(0) as f64;
    let limited = a["outcomes"]["refused:rate_limited"].as_u64().unwrap_or(0);
    let secs = a["seconds"].as_f64().unwrap();
    eprintln!(
        "alice: {ok} accepted, {limited} refused in {secs:.2} s; bob: {}",
        b["outcomes"]
    );
    let expected = 50.0 * secs;
    assert!(
        ok >= 0.9 * expected && ok <= 1.1 * expected + 10.0,
        "alice's limit holds within 10%: {ok} accepted, {expected:.0} expected (+10 burst)"
    );
    assert_eq!(ok as u64 + limited, a["requests"].as_u64().unwrap(), "{a}");
    assert_eq!(b["errors"], 0, "bob is not affected: {b}");
    let bob_ok = b["outcomes"]["200"].as_u64().unwrap();
    assert_eq!(
        up.hits() as u64,
        ok as u64 + bob_ok,
        "every request the service saw was answered; none refused reached it"
    );
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="rate_limited"}"#),
        limited as f64
    );
    let rss = fp.peak_rss_kib();
    assert!(rss < 96 * 1024, "bounded memory: {rss} KiB");
}

#[test]
fn a_concurrency_limit_refuses_instead_of_queueing() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             limits = {{ concurrency = 4 }}\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"*\"\nto = \"*\"\n",
    ));
    let url = format!("https://localhost:{}/x", fp.port("internal"));
    let s = |p: &std::path::Path| p.display().to_string();
    // 16 in flight at a time against 4 allowed, each held 200 ms by the service
    let v = done(bench(
        &url,
        &s(&pki.client.cert),
        &s(&pki.client.key),
        &pki.ca.display().to_string(),
        &["-n", "64", "-H", "x-sleep-ms: 200"],
    ));
    let ok = v["outcomes"]["200"].as_u64().unwrap_or(0);
    let over = v["outcomes"]["refused:overloaded"].as_u64().unwrap_or(0);
    eprintln!("{ok} served, {over} refused as overloaded");
    assert_eq!(ok + over, 64, "{v}");
    assert!(ok >= 4 && over > 0, "{v}");
    assert!(
        up.peak.load(std::sync::atomic::Ordering::SeqCst) <= 4,
        "never more than 4 at the service"
    );
}
