//! `fedport firewall` for real: network namespaces made by the test — a node, a peer,
//! a stranger and a monitor, each joined to the node by a veth pair. fedport runs in
//! the node's namespace; the generated nftables rules are applied there with `nft -f`.
//! Before, everyone reaches every port; after, the peer reaches the internal port, the
//! stranger nothing, and only the monitor the admin port. Re-applying replaces the
//! rules, and nothing outside fedport's own table is touched.
//!
//! Needs root; FEDPORT_SKIP_NETNS=1 skips it loudly on a machine without.

use crate::support::netns::{link, Netns};
use crate::support::{Fedport, Pki};
use std::process::Command;

#[test]
fn generated_rules_open_each_port_to_its_sources_only() {
    let tag = std::process::id() % 10_000;
    let o = 100 + (std::process::id() / 7) % 100;
    let made = (|| {
        let node = Netns::new(format!("fwn{tag}"))?;
        let peer = Netns::new(format!("fwp{tag}"))?;
        let stranger = Netns::new(format!("fws{tag}"))?;
        let monitor = Netns::new(format!("fwm{tag}"))?;
        link(
            &node,
            &peer,
            &format!("np{tag}"),
            &format!("pn{tag}"),
            &format!("10.{o}.1"),
        )?;
        link(
            &node,
            &stranger,
            &format!("ns{tag}"),
            &format!("sn{tag}"),
            &format!("10.{o}.2"),
        )?;
        link(
            &node,
            &monitor,
            &format!("nm{tag}"),
            &format!("mn{tag}"),
            &format!("10.{o}.3"),
        )?;
        // something of the host's own, which the fedport rules must leave alone
        node.exec(&["nft", "add", "table", "inet", "host_own"])?;
        Ok::<_, String>((node, peer, stranger, monitor))
    })();
    let (node, peer, stranger, monitor) = match made {
        Ok(n) => n,
        Err(e) if std::env::var_os("FEDPORT_SKIP_NETNS").is_some() => {
            eprintln!(
                "\n!!!!! NETWORK NAMESPACES UNAVAILABLE — firewall test SKIPPED: {e} !!!!!\n"
            );
            return;
        }
        Err(e) => panic!(
            "\n!!!!! cannot make network namespaces or veth pairs: {e}\n\
             this test needs root; set FEDPORT_SKIP_NETNS=1 to skip it on such a machine !!!!!\n"
        ),
    };
    let pki = Pki::new();
    let cert = pki.node_cert("node");
    let config = format!(
        r#"[node]
name = "node"
region = "r"
workers = 1

[tls]
cert = "{}"
key = "{}"
ca = "{}"

[admin]
bind = "0.0.0.0:9901"
allow = ["10.{o}.3.0/30"]

[[listener]]
name = "internal"
bind = "0.0.0.0:7443"

[[service]]
name = "orders"
protocol = "http"
endpoints = ["http://127.0.0.1:1"]

[[peer]]
name = "peer"
region = "r"
address = "10.{o}.1.2:7443"
identity = "spiffe://fed.test/node/peer"

[[allow]]
from = "*"
to = "*"
"#,
        cert.cert.display(),
        cert.key.display(),
        pki.ca.display()
    );
    let fp = Fedport::start_in(Some(&node.0), &config);
    let cfg_path = pki.path().join("fw.toml");
    std::fs::write(&cfg_path, &config).unwrap();
    let rules = Command::new(crate::support::bin())
        .args(["firewall"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stderr)
    );
    let rules_file = pki.path().join("fedport.nft");
    std::fs::write(&rules_file, &rules.stdout).unwrap();

    // reach the internal port (a TLS handshake and an HTTP answer) and the admin port
    let internal = |from: &Netns, addr: &str| {
        let mut args = vec![
            "curl".to_owned(),
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--connect-timeout".into(),
            "2".into(),
            "-k".into(),
        ];
        args.extend(pki.curl_client());
        args.push(format!("https://{addr}:7443/"));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        from.output(&a) == "404"
    };
    let admin = |from: &Netns, addr: &str| {
        from.output(&[
            "curl",
            "-s",
            "--connect-timeout",
            "2",
            &format!("http://{addr}:9901/healthz"),
        ]) == "ok\n"
    };
    let (p, s, m) = (
        format!("10.{o}.1.1"),
        format!("10.{o}.2.1"),
        format!("10.{o}.3.1"),
    );
    // before: the stranger reaches the internal port (fedport's own checks aside)
    assert!(internal(&peer, &p), "peer before");
    assert!(internal(&stranger, &s), "stranger before");
    assert!(admin(&monitor, &m), "monitor before");

    for round in 0..2 {
        // applying twice: the second replaces the first
        node.exec(&["nft", "-f", rules_file.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&rules.stdout)));
        assert!(
            internal(&peer, &p),
            "round {round}: the peer reaches the internal port"
        );
        assert!(
            !internal(&stranger, &s),
            "round {round}: the stranger does not"
        );
        assert!(
            admin(&monitor, &m),
            "round {round}: the monitor reaches the admin port"
        );
        assert!(
            !admin(&stranger, &s),
            "round {round}: the stranger does not"
        );
        assert!(!admin(&peer, &p), "round {round}: nor does the peer");
        assert!(
            node.output(&["curl", "-s", "http://127.0.0.1:9901/healthz"]) == "ok\n",
            "loopback still reaches the admin port"
        );
    }
    let tables = node.output(&["nft", "list", "tables"]);
    assert!(tables.contains("table inet host_own"), "{tables}");
    assert_eq!(tables.matches("table inet fedport").count(), 1, "{tables}");
    drop(fp);
}
