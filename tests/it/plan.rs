//! `fedport plan` and `fedport describe` as a reviewer runs them: fixture pairs under
//! tests/fixtures/plan (a grant, a revoke, a port move, an allowlist narrowed with a
//! timeout cut, a text-only change, and changes that grant without touching a rule: a
//! CRL dropped, a gRPC service added, a peer's identity swapped, an allowlist removed)
//! give their expected effect and exit code.

use crate::support::Pki;
use std::path::Path;
use std::process::Command;

fn fedport(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(crate::support::bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plans_state_the_effect_of_each_change() {
    let pki = Pki::new();
    let dir = pki.path().display().to_string();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan");
    let mut seen = 0;
    // the CRL the "hidden" case drops
    std::fs::write(pki.path().join("crl.pem"), pki.authority.crl(&[7]).unwrap()).unwrap();
    for case in [
        "grant",
        "revoke",
        "port_move",
        "allowlist",
        "same",
        "hidden",
    ] {
        let place = |name: &str| {
            let text = std::fs::read_to_string(root.join(case).join(name))
                .unwrap()
                .replace("{DIR}", &dir);
            let p = pki.path().join(format!("{case}-{name}"));
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let (old, new) = (place("old.toml"), place("new.toml"));
        let (code, out, err) = fedport(&["plan", &old, &new]);
        let out = out.replace(&dir, "{DIR}");
        let expected = std::fs::read_to_string(root.join(case).join("expected.txt"))
            .unwrap_or_else(|_| panic!("{case}: no expected.txt; got (exit {code}):\n{out}{err}"));
        assert_eq!(out, expected, "{case}");
        assert_eq!(code, if case == "same" { 0 } else { 2 }, "{case}: {err}");
        // the same, for review bots
        let (code_json, json, _) = fedport(&["plan", "--json", &old, &new]);
        assert_eq!(code_json, code);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["count"].as_u64().unwrap() as usize,
            expected.lines().count().saturating_sub(1),
            "{case}: {json}"
        );
        seen += 1;
    }
    assert_eq!(seen, 6);
}

#[test]
fn describe_is_the_port_manifest() {
    let pki = Pki::new();
    let dir = pki.path().display().to_string();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan/port_move/new.toml");
    let cfg = pki.path().join("describe.toml");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(root)
            .unwrap()
            .replace("{DIR}", &dir),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let (code, md, err) = fedport(&["describe", &cfg]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "# Port manifest: node eu-west-a (region eu-west)",
        "| internal | 127.0.0.1:8443 | HTTP/2 (h2) and HTTP/1.1 over TLS | mutual TLS 1.3, client certificate required | 10.0.0.0/8, 192.168.10.0/24 |",
        "| orders-port | 127.0.0.1:7444 |",
        "| orders |",
        "| admin | 127.0.0.1:9901 |",
        // what each rule matches, not only how it is written
        "| spiffe://fed.test/node/* (SPIFFE IDs; * one segment) | orders | GET /v1/orders (and every path below it) |",
        "| orders | http | http://127.0.0.1:8080 | - | - | any | - | 2000 ms |",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in:\n{md}");
    }
    let (code, json, _) = fedport(&["describe", "--json", &cfg]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ports"][1]["service"], "orders");
    assert_eq!(
        v["access"][0]["from"],
        "spiffe://fed.test/node/* (SPIFFE IDs; * one segment)"
    );
    assert!(
        md.contains(
            "| orders | GET / (every path), HEAD / (every path), OPTIONS / (every path) | orders |"
        ),
        "{md}"
    );
    assert_eq!(v["admin"]["bind"], "127.0.0.1:9901");
}

/// `plan OLD NEW --replay FILE`: traffic recorded by a running node (its JSON access
/// log) is decided under both configurations. Removing one of alice's methods and
/// granting carol one shows exactly those two, with their counts; everything else
/// recorded is decided the same way.
#[test]
fn a_replay_shows_exactly_who_loses_and_gains_what() {
    use crate::support::upstream::{self, Proto};
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let service = format!(
        "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
        up.url(Proto::H2c)
    );
    let rules = |alice: &str, carol: bool| {
        format!(
            "[[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"orders\"\nmethods = [{alice}]\n\
             [[allow]]\nfrom = \"spiffe://fed.test/client/bob\"\nto = \"orders\"\n{}",
            if carol {
                "[[allow]]\nfrom = \"spiffe://fed.test/client/carol\"\nto = \"orders\"\nmethods = [\"GET /v1/items\"]\n"
            } else {
                ""
            }
        )
    };
    let cfg = |alice: &str, carol: bool| {
        crate::support::node_config_with_rules(&pki, &service, &rules(alice, carol))
            .replace("[node]\n", "[node]\naccess_log = true\n")
    };
    let old = cfg(r#""GET /v1/items", "POST /v1/orders""#, false);
    let fp = crate::support::Fedport::start_with(None, &old, &["--log-format", "json"]);
    let port = fp.port("internal");
    let (bob, carol) = (pki.client_cert("bob"), pki.client_cert("carol"));
    let call = |who: &fedport::identity::pki::IssuedFiles, method: &str, path: &str| {
        let url = format!("https://localhost:{port}{path}");
        let more = ["-X", method, "-H", "fed-service: orders", &url];
        crate::support::curl_tls(&pki.ca, &who.cert, &who.key, &more).0
    };
    for _ in 0..3 {
        assert_eq!(call(&pki.client, "GET", "/v1/items/7"), 200);
    }
    for _ in 0..2 {
        assert_eq!(call(&pki.client, "POST", "/v1/orders"), 200);
    }
    for _ in 0..4 {
        assert_eq!(call(&bob, "POST", "/v1/orders"), 200);
    }
    assert_eq!(call(&carol, "GET", "/v1/items"), 403);
    crate::support::wait_until(
        "every access line",
        std::time::Duration::from_secs(5),
        || fp.log_text().matches("\"fedport::access\"").count() == 10,
    );
    let dir = pki.path();
    let log = dir.join("access.json");
    std::fs::write(&log, fp.log_text()).unwrap();
    let (o, n) = (dir.join("old.toml"), dir.join("new.toml"));
    std::fs::write(&o, &old).unwrap();
    std::fs::write(&n, cfg(r#""GET /v1/items""#, true)).unwrap();
    let args = |json: bool| {
        let mut a = vec![
            "plan".to_owned(),
            o.display().to_string(),
            n.display().to_string(),
        ];
        a.extend(["--replay".to_owned(), log.display().to_string()]);
        if json {
            a.push("--json".to_owned());
        }
        a
    };
    let a = args(true);
    let (code, out, err) = fedport(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["replay"];
    assert_eq!(r["requests"], 10, "{r}");
    assert_eq!(r["skipped"], 0, "{r}");
    let shifts = r["shifts"].as_array().unwrap();
    assert_eq!(shifts.len(), 2, "exactly the two affected: {r}");
    let lose = shifts.iter().find(|s| s["kind"] == "lose").unwrap();
    assert_eq!(lose["identity"], "spiffe://fed.test/client/alice", "{r}");
    assert_eq!(lose["service"], "orders");
    assert_eq!(lose["method"], "POST /v1/orders");
    assert_eq!(lose["requests"], 2);
    assert_eq!(
        (lose["old"].as_str(), lose["new"].as_str()),
        (Some("allowed"), Some("denied"))
    );
    assert!(lose["first_seen"].as_str().unwrap() <= lose["last_seen"].as_str().unwrap());
    assert!(
        lose["first_seen"].as_str().unwrap().starts_with("20"),
        "{lose}"
    );
    let gain = shifts.iter().find(|s| s["kind"] == "gain").unwrap();
    assert_eq!(gain["identity"], "spiffe://fed.test/client/carol", "{r}");
    assert_eq!(gain["method"], "GET /v1/items");
    assert_eq!(gain["requests"], 1);
    let a = args(false);
    let (code, out, _) = fedport(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 2);
    assert!(
        out.contains("- spiffe://fed.test/client/alice loses orders POST /v1/orders: 2 request(s), allowed → denied"),
        "{out}"
    );
    // the same configuration: nothing changes, exit 0
    let (code, out, _) = fedport(&[
        "plan",
        &o.display().to_string(),
        &o.display().to_string(),
        "--replay",
        &log.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("every one is decided the same way"), "{out}");
    // a log with no access line (a text log, say) is no evidence of no change
    let text = dir.join("text.log");
    std::fs::write(
        &text,
        "2026-12-02T12:00:00Z INFO fedport::access: access listener=internal\n",
    )
    .unwrap();
    let (code, _, err) = fedport(&[
        "plan",
        &o.display().to_string(),
        &n.display().to_string(),
        "--replay",
        &text.display().to_string(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no access line"), "{err}");
}
