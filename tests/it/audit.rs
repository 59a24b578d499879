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
