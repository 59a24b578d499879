//! A site that can only dial out, in network namespaces made by the test: node b's
//! namespace drops every inbound new connection (nftables), so node a can never dial
//! it. b dials a (`[[peer]] reverse = true`), and a's callers reach b's HTTP, gRPC and
//! TCP services over the link b opened. Cutting the link moves a's traffic to node c
//! within `peer_ping_timeout` plus one second; restoring it brings the traffic back.
//!
//! Needs root (namespaces, veth, nftables); FEDPORT_SKIP_NETNS=1 skips it loudly.

use crate::support::netns::{link, Netns};
use crate::support::{wait_until, Fedport, Pki};
use std::process::Command;
use std::time::{Duration, Instant};

const PING_TIMEOUT: Duration = Duration::from_millis(500);

fn node(pki: &Pki, name: &str, region: &str, rest: &str) -> String {
    node_with(pki, name, region, "", rest)
}

/// [`node`] with more lines for its `internal` listener.
fn node_with(pki: &Pki, name: &str, region: &str, listener: &str, rest: &str) -> String {
    let cert = pki.node_cert(name);
    format!(
        r#"[node]
name = "{name}"
region = "{region}"
workers = 2
peer_ping_interval = "200ms"
peer_ping_timeout = "{}ms"

[tls]
cert = "{}"
key = "{}"
ca = "{}"

[admin]
bind = "127.0.0.1:9901"

[[listener]]
name = "internal"
bind = "0.0.0.0:7443"
{listener}

[[allow]]
from = "*"
to = "*"

{rest}
"#,
        PING_TIMEOUT.as_millis(),
        cert.cert.display(),
        cert.key.display(),
        pki.ca.display()
    )
}

/// One GET of `/where` through a's internal port, from a's namespace: the status and
/// which site's file answered.
fn where_from_a(na: &Netns, pki: &Pki) -> (u16, String) {
    let mut args: Vec<String> = [
        "curl",
        "-s",
        "--http2",
        "-H",
        "fed-service: web",
        "-H",
        "fed-timeout: 300",
        "--max-time",
        "2",
        "-w",
        "\n%{http_code}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(pki.curl_client());
    args.push("https://localhost:7443/where".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = na.output(&a);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.trim().to_owned())
}

/// The nftables table that cuts b's link to a both ways, added or deleted.
fn cut(nb: &Netns, ifb: &str, on: bool) {
    if on {
        let rules = format!(
            "table inet fpcut {{\n chain in {{\n type filter hook input priority -10;\n iifname \"{ifb}\" drop\n }}\n \
             chain out {{\n type filter hook output priority -10;\n oifname \"{ifb}\" drop\n }}\n}}\n"
        );
        let f = std::env::temp_dir().join(format!("fpcut-{}.nft", std::process::id()));
        std::fs::write(&f, rules).unwrap();
        nb.exec(&["nft", "-f", f.to_str().unwrap()]).unwrap();
    } else {
        nb.exec(&["nft", "delete", "table", "inet", "fpcut"])
            .unwrap();
    }
}

#[test]
fn a_site_that_only_dials_out_is_reached_over_the_link_it_opened() {
    let tag = std::process::id() % 10_000;
    let o = 100 + (std::process::id() / 3) % 100;
    let (ab, ba) = (format!("rab{tag}"), format!("rba{tag}"));
    let made = (|| {
        let a = Netns::new(format!("rva{tag}"))?;
        let b = Netns::new(format!("rvb{tag}"))?;
        let c = Netns::new(format!("rvc{tag}"))?;
        link(&a, &b, &ab, &ba, &format!("10.{o}.1"))?;
        link(
            &a,
            &c,
            &format!("rac{tag}"),
            &format!("rca{tag}"),
            &format!("10.{o}.2"),
        )?;
        // b admits nothing new from outside: only what it dialled comes back in
        let nat = format!(
            "table inet fpnat {{\n chain in {{\n type filter hook input priority 0;\n iifname \"{ba}\" ct state new drop\n }}\n}}\n"
        );
        let f = std::env::temp_dir().join(format!("fpnat-{tag}.nft"));
        std::fs::write(&f, nat).map_err(|e| e.to_string())?;
        b.exec(&["nft", "-f", f.to_str().unwrap()])?;
        Ok::<_, String>((a, b, c))
    })();
    let (na, nb, nc) = match made {
        Ok(n) => n,
        Err(e) if std::env::var_os("FEDPORT_SKIP_NETNS").is_some() => {
            eprintln!(
                "\n!!!!! NETWORK NAMESPACES UNAVAILABLE — reverse-link test SKIPPED: {e} !!!!!\n"
            );
            return;
        }
        Err(e) => panic!(
            "\n!!!!! cannot make network namespaces, veth or nftables rules: {e}\n\
             this test needs root; set FEDPORT_SKIP_NETNS=1 to skip it on such a machine !!!!!\n"
        ),
    };
    let pki = Pki::new();
    let dir = pki.path();
    // b and c each serve a file naming the site; b also a gRPC service and Redis
    let mut procs = Vec::new();
    for (ns, site) in [(&nb, "b"), (&nc, "c")] {
        let root = dir.join(format!("www-{site}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("where"), site).unwrap();
        procs.push(ns.spawn(&[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            root.to_str().unwrap(),
        ]));
    }
    let grpc = nb.spawn(&[
        "python3",
        crate::support::py("grpc_upstream.py").to_str().unwrap(),
    ]);
    let grpc_port = {
        use std::io::BufRead;
        let mut line = String::new();
        let mut g = grpc;
        std::io::BufReader::new(g.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        procs.push(g);
        line.trim().parse::<u16>().unwrap()
    };
    procs.push(nb.spawn(&[
        "redis-server",
        "--port",
        "6379",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]));
    let web = |ep: &str| {
        format!("[[service]]\nname = \"web\"\nprotocol = \"http\"\nendpoints = [{ep}]\n")
    };
    let mut a = Fedport::start_in(
        Some(&na.0),
        &node(
            &pki,
            "a",
            "eu-1",
            &format!(
                "{}[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = []\n\
                 [[service]]\nname = \"cache\"\nprotocol = \"tcp\"\nendpoints = []\n\
                 [[listener]]\nname = \"cache\"\nrole = \"local\"\nbind = \"127.0.0.1:6380\"\nservice = \"cache\"\n\
                 [[peer]]\nname = \"b\"\nregion = \"eu-1\"\nidentity = \"spiffe://fed.test/node/b\"\n\
                 reverse = true\nservices = [\"web\", \"echo\", \"cache\"]\n\
                 [[peer]]\nname = \"c\"\nregion = \"us-1\"\naddress = \"10.{o}.2.2:7443\"\n\
                 identity = \"spiffe://fed.test/node/c\"\nservices = [\"web\"]\n",
                web("")
            ),
        ),
    );
    // b's listener closes connections idle for 2 s: a's probes keep the link from idling
    let b_config = node_with(
        &pki,
        "b",
        "eu-1",
        "idle_timeout = \"2s\"",
        &format!(
            "{}[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"h2c://127.0.0.1:{grpc_port}\"]\n\
             [[service]]\nname = \"cache\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:6379\"]\n\
             [[peer]]\nname = \"a\"\nregion = \"eu-1\"\naddress = \"10.{o}.1.1:7443\"\n\
             identity = \"spiffe://fed.test/node/a\"\nreverse = true\nservices = []\n",
            web("\"http://127.0.0.1:8080\"")
        ),
    );
    let mut b = Fedport::start_in(Some(&nb.0), &b_config);
    let _c = Fedport::start_in(
        Some(&nc.0),
        &node(
            &pki,
            "c",
            "us-1",
            &format!(
                "{}[[peer]]\nname = \"a\"\nregion = \"eu-1\"\naddress = \"10.{o}.2.1:7443\"\n\
                 identity = \"spiffe://fed.test/node/a\"\nservices = []\n",
                web("\"http://127.0.0.1:8080\"")
            ),
        ),
    );

    // a cannot dial b at all
    let dialled = na.output(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--connect-timeout",
        "1",
        "-k",
        &format!("https://10.{o}.1.2:7443/"),
    ]);
    assert_eq!(
        dialled.trim(),
        "000",
        "b's namespace admits no inbound connection"
    );

    // b dials a; a's readyz and metrics say so
    wait_until("b's reverse link up at a", Duration::from_secs(15), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
            && a.metric(r#"fedport_peer_up{peer="c"}"#) == 1.0
    });
    let ready: serde_json::Value = serde_json::from_str(&a.admin_get("/readyz?verbose")).unwrap();
    let pb = ready["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["peer"] == "b").cloned())
        .unwrap_or_else(|| panic!("{ready}"));
    assert_eq!(pb["reverse"]["this_node"], "accepts", "{pb}");
    assert!(pb["reverse"]["links"].as_u64().unwrap() >= 1, "{pb}");
    assert!(pb["rtt_ms"].as_f64().unwrap() > 0.0, "{pb}");
    let ready_b: serde_json::Value = serde_json::from_str(&b.admin_get("/readyz?verbose")).unwrap();
    assert!(
        ready_b.to_string().contains(r#""this_node":"dials""#),
        "{ready_b}"
    );

    // a's callers reach b's HTTP, gRPC and TCP services over b's link
    assert_eq!(where_from_a(&na, &pki), (200, "b".into()));
    let case = serde_json::json!([{
        "proto": "h2", "method": "POST", "path": "/test.Echo/Say", "authority": "localhost",
        "headers": [["content-type", "application/grpc"], ["te", "trailers"], ["fed-service", "echo"]],
        "body_hex": "00000000040a026869",
    }]);
    let cases = dir.join("say.json");
    std::fs::write(&cases, case.to_string()).unwrap();
    let say = na.output(&[
        "python3",
        crate::support::py("raw_request.py").to_str().unwrap(),
        cases.to_str().unwrap(),
        "--port",
        "7443",
        "--ca",
        pki.ca.to_str().unwrap(),
        "--cert",
        pki.client.cert.to_str().unwrap(),
        "--key",
        pki.client.key.to_str().unwrap(),
    ]);
    let say: serde_json::Value =
        serde_json::from_str(say.trim()).unwrap_or_else(|e| panic!("{e}: {say}"));
    assert_eq!(say["headers"]["grpc-status"], "0", "{say}");
    assert!(say["body"].as_str().unwrap().contains("hi"), "{say}");
    assert_eq!(
        na.output(&["redis-cli", "-p", "6380", "SET", "k", "over the link"])
            .trim(),
        "OK"
    );
    assert_eq!(
        nb.output(&["redis-cli", "-p", "6379", "GET", "k"]).trim(),
        "over the link",
        "b's own Redis has what a's caller set"
    );

    // b's firewall opens nothing to a: the link is b's own outbound connection
    let cfg_path = dir.join("b.toml");
    std::fs::write(&cfg_path, &b_config).unwrap();
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
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.contains("7443"), "{rules}");
    assert!(!rules.contains(&format!("10.{o}.1.1")), "{rules}");

    // b's listener idles connections out after 2 s, but not the links a probes: quiet
    // for 3 s, and the links are still the ones that carried the calls above
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        b.metric(r#"fedport_rejections_total{listener="internal",reason="idle_timeout"}"#),
        0.0,
        "a's probes keep b's links from idling"
    );
    assert_eq!(a.metric(r#"fedport_peer_up{peer="b"}"#), 1.0);

    // the link is cut: a's traffic moves to c within peer_ping_timeout + 1 s
    cut(&nb, &ba, true);
    let cut_at = Instant::now();
    let moved = loop {
        let (code, site) = where_from_a(&na, &pki);
        if code == 200 && site == "c" {
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(10),
            "traffic never moved to c"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("traffic moved to c {} ms after the cut", moved.as_millis());
    assert!(
        moved <= PING_TIMEOUT + Duration::from_secs(1),
        "moved after {moved:?}"
    );
    // (traffic may move before the probe says so: a request finding no live link is
    // sent on to c unsent)
    wait_until(
        "a says b is down",
        PING_TIMEOUT + Duration::from_secs(1),
        || a.metric(r#"fedport_peer_up{peer="b"}"#) == 0.0,
    );

    // restored: b dials again, and the traffic comes back to b
    cut(&nb, &ba, false);
    wait_until("traffic back at b", Duration::from_secs(30), || {
        where_from_a(&na, &pki) == (200, "b".into())
    });

    // a reload that changes neither b's entry nor the trust material keeps b's links
    a.signal("HUP");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!a.log_text().contains("the reverse link is let go"));
    assert_eq!(where_from_a(&na, &pki), (200, "b".into()));
    // one that changes the trust material (the CA file, here rewritten with a second
    // copy of its certificate) lets them go: b dials again, is verified afresh, and is
    // reached again
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    std::fs::write(&pki.ca, format!("{ca}{ca}")).unwrap();
    a.signal("HUP");
    wait_until("the links let go", Duration::from_secs(10), || {
        a.log_text().contains("the reverse link is let go")
    });
    wait_until(
        "b reached again after the reload",
        Duration::from_secs(20),
        || where_from_a(&na, &pki) == (200, "b".into()),
    );

    // an upgrade of either end moves the link to the new process: the old one lets it
    // go a moment after the handover (rather than keep it for upgrade_drain_timeout,
    // 60 s, while the new one has none), exits 0, and b is reached again
    let ready_pid = |fp: &Fedport| -> u32 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fp.ready_file()).unwrap()).unwrap();
        v["pid"].as_u64().unwrap() as u32
    };
    let mut news = Vec::new();
    for (fp, who) in [
        (&mut a, "a, which takes b's links"),
        (&mut b, "b, which dials them"),
    ] {
        let old = fp.pid();
        fp.signal("USR2");
        assert_eq!(
            fp.wait_exit(Duration::from_secs(20)),
            Some(0),
            "the old process of {who} let its links go and exited"
        );
        let new = ready_pid(fp);
        assert_ne!(new, old);
        news.push(new);
        wait_until(
            &format!("b reached again after upgrading {who}"),
            Duration::from_secs(20),
            || where_from_a(&na, &pki) == (200, "b".into()),
        );
    }
    for pid in news {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    drop(procs);
}
