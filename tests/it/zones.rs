//! Zone-aware routing: traffic stays in the node's zone while its endpoints there are
//! healthy, spills to the other zones once fewer than `zone_spill_below` of them are,
//! and `locality_weights` split it by zone (80/20 within ±2% over 10,000 requests).

use crate::support::upstream::{self, Proto, Upstream};
use crate::support::{wait_until, Fedport, Pki};
use std::process::Stdio;
use std::time::Duration;

fn zoned(ups: &[(&Upstream, &str)]) -> String {
    ups.iter()
        .map(|(u, z)| format!("{{ url = \"{}\", zone = \"{z}\" }}", u.url(Proto::H2c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn bench(fp: &Fedport, pki: &Pki, n: u64) -> serde_json::Value {
    let out = crate::support::bench_up(fp, pki, n, (4, 8))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn traffic_stays_in_the_zone_while_it_is_healthy_then_spills() {
    let pki = Pki::new();
    let (a1, a2, b) = (
        upstream::start(Proto::H2c),
        upstream::start(Proto::H2c),
        upstream::start(Proto::H2c),
    );
    let fp = Fedport::start(
        &crate::support::node_config(
            &pki,
            &format!(
                "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [{}]\n",
                zoned(&[(&a1, "a"), (&a2, "a"), (&b, "b")])
            ),
        )
        .replace("[node]\n", "[node]\nzone = \"a\"\n"),
    );
    let v = bench(&fp, &pki, 600);
    assert_eq!(v["outcomes"]["200"], 600, "{v}");
    assert_eq!(b.hits(), 0, "zone b is not used while zone a is healthy");
    assert!(
        a1.hits() > 100 && a2.hits() > 100,
        "{} {}",
        a1.hits(),
        a2.hits()
    );
    // half of zone a's endpoints gone (under the 70% it needs): once the stopped one is
    // ejected, traffic spills over both zones
    a1.stop();
    let gone = a1.url(Proto::H2c);
    wait_until("a1 ejected", Duration::from_secs(10), || {
        bench(&fp, &pki, 50);
        let v: serde_json::Value =
            serde_json::from_str(&fp.admin_get("/readyz?verbose")).unwrap_or_default();
        v["services"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["endpoint"] == gone.as_str() && e["available"] == false)
    });
    let before = b.hits();
    let v = bench(&fp, &pki, 600);
    assert_eq!(v["outcomes"]["200"], 600, "{v}");
    let spilled = b.hits() - before;
    assert!(
        spilled > 100,
        "zone b takes a share once zone a is short: {spilled}"
    );
}

#[test]
fn locality_weights_split_the_traffic_by_zone() {
    let pki = Pki::new();
    let (a, b) = (upstream::start(Proto::H2c), upstream::start(Proto::H2c));
    let fp = Fedport::start(&crate::support::node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [{}]\nlocality_weights = {{ a = 80, b = 20 }}\n",
            zoned(&[(&a, "a"), (&b, "b")])
        ),
    ));
    let v = bench(&fp, &pki, 10_000);
    assert_eq!(v["outcomes"]["200"], 10_000, "{v}");
    let (ha, hb) = (a.hits() as f64, b.hits() as f64);
    let share = ha / (ha + hb);
    eprintln!("zone a took {:.2}% of 10,000", share * 100.0);
    assert!((share - 0.8).abs() <= 0.02, "80/20 within ±2%: {share}");
}

#[test]
fn check_refuses_weights_and_thresholds_that_mean_nothing() {
    let pki = Pki::new();
    let path = pki.path().join("zones.toml");
    let svc = |extra: &str| {
        crate::support::node_config(
            &pki,
            &format!(
                "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [{{ url = \"http://127.0.0.1:1\", zone = \"a\" }}]\n{extra}\n"
            ),
        )
    };
    for (extra, want) in [
        (
            "locality_weights = { a = -1 }",
            "locality weight -1 of zone \"a\"",
        ),
        ("locality_weights = { a = 0 }", "every locality weight is 0"),
        (
            "zone_spill_below = 2.0",
            "zone_spill_below is a share from 0 to 1",
        ),
    ] {
        std::fs::write(&path, svc(extra)).unwrap();
        let (code, err) = crate::support::check(&path);
        assert_eq!(code, Some(1), "{extra}: {err}");
        assert!(err.contains(want), "{extra}: {err}");
    }
    std::fs::write(&path, svc("locality_weights = { a = 80, c = 20 }")).unwrap();
    let (code, err) = crate::support::check(&path);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("no endpoint of service \"up\" is in zone \"c\""),
        "{err}"
    );
}
