//! Audit mode (`authorization = "audit"`): a call no rule allows is served, counted by
//! service and identity, logged once per identity, service and method with
//! `would_deny`, and marked so in the access log; `plan` shows the switch to enforce as
//! the access it takes away, and after that reload the same call is refused.

use crate::support::upstream::{self, Proto};
use crate::support::{bin, curl, node_config_with_rules, Fedport, Pki};
use std::process::Command;
use std::time::Duration;

#[test]
fn audit_serves_what_no_rule_allows_and_enforce_then_refuses_it() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    // only bob may call `up`; the test client (alice) is allowed nothing
    let cfg = |mode: &str| {
        node_config_with_rules(
            &pki,
            &format!(
                "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
                 authorization = \"{mode}\"\n",
                up.url(Proto::H2c)
            ),
            "[[allow]]\nfrom = \"spiffe://fed.test/client/bob\"\nto = \"up\"\n",
        )
        .replace(
            "drain_timeout = \"10s\"\n",
            "drain_timeout = \"10s\"\naccess_log = true\n",
        )
    };
    let audit = cfg("audit");
    assert!(audit.contains("access_log = true"));
    let fp = Fedport::start_with(None, &audit, &["--log-format", "json"]);
    let port = fp.port("internal");
    let c = pki.curl_client();
    let call = |path: &str| {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        let url = format!("https://localhost:{port}{path}");
        a.extend(["-H", "fed-service: up", &url]);
        curl(&a)
    };
    let hits = up.hits();
    for _ in 0..3 {
        let (status, body, _) = call("/orders");
        assert_eq!(status, 200, "served in audit mode: {body}");
    }
    assert_eq!(call("/other").0, 200);
    assert_eq!(up.hits(), hits + 4, "the service answered each");
    let counted = r#"fedport_authorization_audit_would_deny_total{service="up",identity="spiffe://fed.test/client/alice"}"#;
    assert_eq!(fp.metric(counted), 4.0);
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="denied"}"#),
        0.0,
        "nothing refused"
    );
    let log = fp.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let audit_lines: Vec<_> = lines
        .iter()
        .filter(|v| v["target"] == "fedport::audit")
        .collect();
    // once per identity, service and method: GET /orders and GET /other
    assert_eq!(audit_lines.len(), 2, "{log}");
    assert!(
        audit_lines
            .iter()
            .all(|v| v["fields"]["would_deny"] == true),
        "{log}"
    );
    let access: Vec<_> = lines
        .iter()
        .filter(|v| v["target"] == "fedport::access")
        .collect();
    assert_eq!(access.len(), 4, "{log}");
    assert!(
        access.iter().all(|v| v["fields"]["would_deny"] == true),
        "{log}"
    );

    // plan shows the switch as the access it takes away
    let old = pki.path().join("audit.toml");
    let new = pki.path().join("enforce.toml");
    std::fs::write(&old, &audit).unwrap();
    std::fs::write(&new, cfg("enforce")).unwrap();
    let out = Command::new(bin())
        .args(["plan", old.to_str().unwrap(), new.to_str().unwrap()])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("service up authorization audit → enforce"),
        "{plan}"
    );
    assert_eq!(out.status.code(), Some(2), "a change: {plan}");

    // the reload to enforce refuses the same call
    let before = fp.metric(r#"fedport_config_reloads_total{result="ok"}"#);
    std::fs::write(&fp.config, cfg("enforce")).unwrap();
    fp.signal("HUP");
    crate::support::wait_until("the reload", Duration::from_secs(10), || {
        fp.metric(r#"fedport_config_reloads_total{result="ok"}"#) > before
    });
    let (status, body, _) = call("/orders");
    assert_eq!(status, 403, "{body}");
    assert_eq!(up.hits(), hits + 4, "nothing more reached the service");
    assert_eq!(fp.metric(counted), 4.0);
}

/// `authorization` on `[node]` holds for services that do not say; a service's own
/// overrides it, and a value other than the two is refused by `check`.
#[test]
fn the_nodes_authorization_holds_where_a_service_does_not_say() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let text = node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"open\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\n\
             [[service]]\nname = \"strict\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\
             authorization = \"enforce\"\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"spiffe://fed.test/client/bob\"\nto = \"*\"\n",
    )
    .replace(
        "drain_timeout = \"10s\"\n",
        "drain_timeout = \"10s\"\nauthorization = \"audit\"\n",
    );
    let fp = Fedport::start(&text);
    let port = fp.port("internal");
    let c = pki.curl_client();
    let call = |service: &str| {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        let h = format!("fed-service: {service}");
        let url = format!("https://localhost:{port}/x");
        a.extend(["-H", &h, &url]);
        curl(&a).0
    };
    assert_eq!(call("open"), 200, "the node's audit");
    assert_eq!(call("strict"), 403, "the service's own enforce");

    let path = pki.path().join("bad.toml");
    std::fs::write(
        &path,
        text.replace("authorization = \"audit\"", "authorization = \"log\""),
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("neither \"enforce\" nor \"audit\""), "{err}");
    assert!(err.contains("bad.toml:"), "{err}");
}

/// Audit mode never widens access through another node: a peer judges a forwarded call
/// by the forwarding node's identity, so a call only audit admits is served by local
/// endpoints or refused as enforcement would refuse it (403), never sent on.
#[test]
fn a_call_only_audit_admits_is_not_sent_to_a_peer() {
    use crate::federation;
    let pki = Pki::new();
    let (pa, pb) = (crate::support::free_port(), crate::support::free_port());
    let far = upstream::start(Proto::H2c);
    let only_bob = "[[allow]]\nfrom = \"spiffe://fed.test/client/bob\"\nto = \"*\"\n\
                    [[allow]]\nfrom = \"spiffe://fed.test/node/*\"\nto = \"*\"\n";
    let a_cfg = federation::node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}",
            federation::http_service("far", &[], "authorization = \"audit\""),
            federation::peer("b", "eu-1", pb, &["far"]),
        ),
    )
    .replace("[[allow]]\nfrom = \"*\"\nto = \"*\"\n", only_bob);
    assert!(a_cfg.contains("client/bob") && !a_cfg.contains("from = \"*\""));
    let a = Fedport::start(&a_cfg);
    let _b = Fedport::start(&federation::node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            federation::http_service("far", &[far.url(Proto::H2c)], ""),
            federation::peer("a", "eu-1", pa, &[]),
        ),
    ));
    crate::support::wait_until("b up at a", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
    });
    let (code, v) = federation::get(&pki, pa, "far", &[]);
    assert_eq!(code, 403, "{v}");
    assert_eq!(far.hits(), 0, "nothing was sent on to b");
    // bob, whom a rule allows, is forwarded as ever
    let bob = pki.client_cert("bob");
    let (code, body, _) = crate::support::curl(&[
        "--cacert",
        pki.ca.to_str().unwrap(),
        "--cert",
        bob.cert.to_str().unwrap(),
        "--key",
        bob.key.to_str().unwrap(),
        "-H",
        "fed-service: far",
        &format!("https://localhost:{pa}/x"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(far.hits(), 1);
}
