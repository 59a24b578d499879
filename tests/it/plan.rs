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
