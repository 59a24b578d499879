//! Membership through a real three-member etcd cluster on loopback: two nodes whose
//! files know nothing of each other find each other and route a call; a killed node
//! leaves the other's table within the lease TTL; with quorum lost, routing goes on
//! with the last membership seen (and the node stays ready); once quorum is back, a
//! node that started meanwhile is found; a node shut down with SIGTERM leaves at once.

use crate::federation::{get, http_service, node_config};
use crate::support::etcd::Etcd;
use crate::support::upstream::{self, Proto};
use crate::support::{free_port, wait_until, Fedport, Pki};
use std::time::{Duration, Instant};

fn registry(etcd: &Etcd) -> String {
    format!(
        "[registry.etcd]\nendpoints = {}\nttl = \"2s\"\n",
        etcd.endpoints_toml()
    )
}

fn served_by(v: &serde_json::Value) -> (&str, &str) {
    (
        v["headers"]["fed-origin"][0].as_str().unwrap_or(""),
        v["headers"]["fed-hops"][0].as_str().unwrap_or(""),
    )
}

#[test]
fn nodes_find_each_other_through_etcd_and_ride_out_its_outage() {
    let pki = Pki::new();
    let mut etcd = Etcd::cluster(3);
    let orders = upstream::start(Proto::H2c);
    let stock = upstream::start(Proto::H2c);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    // a hosts nothing and names no peer: orders and stock come from whoever registers
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}{}",
            http_service("orders", &[], ""),
            http_service("stock", &[], ""),
            registry(&etcd)
        ),
    ));
    let b_config = node_config(
        &pki,
        "b",
        "us-1",
        pb,
        &format!(
            "{}{}",
            http_service("orders", &[orders.url(Proto::H2c)], ""),
            registry(&etcd)
        ),
    );
    let b = Fedport::start(&b_config);
    let t0 = Instant::now();
    wait_until("a routes orders to b", Duration::from_secs(15), || {
        get(&pki, pa, "orders", &[]).0 == 200
    });
    eprintln!("a found b through etcd {:?} after b started", t0.elapsed());
    let (_, v) = get(&pki, pa, "orders", &[]);
    assert_eq!(served_by(&v), ("a", "1"), "{v}");
    assert_eq!(a.metric("fedport_registry_members "), 1.0);
    assert_eq!(a.metric("fedport_registry_up "), 1.0);
    // stock is hosted by nobody yet
    assert_eq!(get(&pki, pa, "stock", &[]).0, 503);

    // b dies without a word: its lease runs out and a stops routing to it
    drop(b);
    let killed = Instant::now();
    wait_until("b leaves a's table", Duration::from_secs(10), || {
        a.metric("fedport_registry_members ") == 0.0
    });
    let gone = killed.elapsed();
    eprintln!("b left a's table {gone:?} after it was killed (lease ttl 2 s)");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    assert_eq!(get(&pki, pa, "orders", &[]).0, 503);

    // b comes back; then quorum is lost: a keeps routing with what it saw, stays ready
    let _b = Fedport::start(&b_config);
    wait_until("a routes to b again", Duration::from_secs(15), || {
        get(&pki, pa, "orders", &[]).0 == 200
    });
    etcd.stop(1);
    etcd.stop(2);
    wait_until("a notices the outage", Duration::from_secs(15), || {
        a.metric("fedport_registry_up ") == 0.0
    });
    for _ in 0..20 {
        assert_eq!(get(&pki, pa, "orders", &[]).0, 200, "routing goes on");
    }
    assert_eq!(
        a.metric("fedport_ready "),
        1.0,
        "an etcd outage alone does not make a node unready"
    );
    let detail: serde_json::Value = serde_json::from_str(&a.admin_get("/readyz?verbose")).unwrap();
    assert_eq!(detail["registry"]["etcd"], "down", "{detail}");
    assert_eq!(detail["registry"]["members"], 1, "{detail}");

    // c starts during the outage; once quorum is back it registers and a finds it
    let _c = Fedport::start(&node_config(
        &pki,
        "c",
        "us-1",
        pc,
        &format!(
            "{}{}",
            http_service("stock", &[stock.url(Proto::H2c)], ""),
            registry(&etcd)
        ),
    ));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        get(&pki, pa, "stock", &[]).0,
        503,
        "nothing new without quorum"
    );
    etcd.start(1);
    etcd.start(2);
    let back = Instant::now();
    wait_until("a routes stock to c", Duration::from_secs(20), || {
        get(&pki, pa, "stock", &[]).0 == 200
    });
    eprintln!("after quorum came back, a found c in {:?}", back.elapsed());
    wait_until("a's registry is up", Duration::from_secs(10), || {
        a.metric("fedport_registry_up ") == 1.0
    });
    // b's registration lapsed in the outage too: it registers again on its own backoff
    // (up to 2 s, jittered), which may come after a's session and c's registration
    wait_until("b registered again", Duration::from_secs(10), || {
        a.metric("fedport_registry_members ") == 2.0
    });
    // the gauge is the registry's view; the node applies a change after a 100 ms
    // settle (a burst of registrations is applied once), so routing follows shortly
    let seen = Instant::now();
    wait_until("a routes orders to b again", Duration::from_secs(5), || {
        get(&pki, pa, "orders", &[]).0 == 200
    });
    eprintln!(
        "a routed orders to b {:?} after it saw b again",
        seen.elapsed()
    );
    assert!(a.metric("fedport_registry_errors_total ") >= 1.0);
}

/// A node whose key is deleted by hand registers again; a value that is no member is
/// ignored; a node shut down with SIGTERM revokes its lease on the way out, and the
/// others drop it at once, not when its 30 s lease would have run out.
#[test]
fn a_node_that_shuts_down_leaves_the_registry_at_once() {
    let pki = Pki::new();
    let etcd = Etcd::cluster(1);
    let orders = upstream::start(Proto::H2c);
    let (pa, pb) = (free_port(), free_port());
    let long_lease = format!(
        "[registry.etcd]\nendpoints = {}\nttl = \"30s\"\n",
        etcd.endpoints_toml()
    );
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!("{}{long_lease}", http_service("orders", &[], "")),
    ));
    let mut b = Fedport::start(&node_config(
        &pki,
        "b",
        "us-1",
        pb,
        &format!(
            "{}{long_lease}",
            http_service("orders", &[orders.url(Proto::H2c)], "")
        ),
    ));
    wait_until("a routes orders to b", Duration::from_secs(15), || {
        get(&pki, pa, "orders", &[]).0 == 200
    });
    assert_eq!(a.metric("fedport_registry_members "), 1.0);

    // a value that is no member is ignored; b's key deleted by hand, b registers again
    let (rt, mut client) = etcd_client(&etcd);
    rt.block_on(client.put("/fedport/nodes/junk", "not a member", None))
        .unwrap();
    // nor is one that would rewrite rules: `from = "local"` must not become every caller
    let hijack = r#"{"name":"local","region":"eu-1","address":"127.0.0.1:9","identity":"*","services":["orders"]}"#;
    rt.block_on(client.put("/fedport/nodes/local", hijack, None))
        .unwrap();
    // nor one that would make a client a peer (whose fed-* headers are believed): only
    // node identities may register (here spiffe://fed.test/node/*, from a's own)
    let client_as_peer = r#"{"name":"mallory","region":"eu-1","address":"127.0.0.1:9","identity":"spiffe://fed.test/client/alice","services":["orders"]}"#;
    rt.block_on(client.put("/fedport/nodes/mallory", client_as_peer, None))
        .unwrap();
    rt.block_on(client.delete("/fedport/nodes/b", None))
        .unwrap();
    wait_until("b registers again", Duration::from_secs(10), || {
        b.log_text().contains("registering again")
            && rt
                .block_on(client.get("/fedport/nodes/b", None))
                .is_ok_and(|r| r.count() == 1)
    });
    wait_until(
        "a routes orders to b again",
        Duration::from_secs(10),
        || get(&pki, pa, "orders", &[]).0 == 200,
    );
    assert_eq!(a.metric("fedport_registry_members "), 1.0);
    // a's watch logs the values it ignores; nothing above waited for a to see them
    wait_until(
        "a ignored the values that are no member",
        Duration::from_secs(5),
        || {
            let log = a.log_text();
            log.contains("not a member") && log.contains("reserved for the local listener")
        },
    );
    wait_until("the client's entry ignored", Duration::from_secs(5), || {
        a.log_text().contains("not a node's")
    });
    assert!(
        !a.admin_get("/config").contains("mallory"),
        "no peer is made of it"
    );
    rt.block_on(client.delete("/fedport/nodes/mallory", None))
        .unwrap();

    b.signal("TERM");
    let t = Instant::now();
    wait_until("b leaves a's table", Duration::from_secs(10), || {
        a.metric("fedport_registry_members ") == 0.0
    });
    let gone = t.elapsed();
    eprintln!("b left a's table {gone:?} after SIGTERM (lease ttl 30 s)");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    // the table's change is applied after a 100 ms settle; b drains meanwhile
    wait_until(
        "a stops routing orders to b",
        Duration::from_secs(2),
        || get(&pki, pa, "orders", &[]).0 == 503,
    );
    let status = b.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(b.log_text().contains("deregistered"), "{}", b.log_text());
}

/// A bounded simulation: 1,000 synthetic members × 10 services registered straight
/// into etcd; a real node converges on the full table, then on one change. Prints the
/// times and the node's memory for the table (docs/scaling.md quotes them). A member
/// that hosts none of the node's services is known but not probed.
#[test]
fn a_node_converges_on_a_thousand_members() {
    let pki = Pki::new();
    let etcd = Etcd::cluster(1);
    let services: String = (0..10)
        .map(|i| http_service(&format!("svc{i}"), &[], ""))
        .collect();
    let port = free_port();
    let hub = Fedport::start(&node_config(
        &pki,
        "hub",
        "r0",
        port,
        &format!("{services}{}", registry(&etcd)),
    ));
    let peers = || -> usize {
        serde_json::from_str::<serde_json::Value>(&hub.admin_get("/readyz?verbose"))
            .ok()
            .and_then(|d| d["peers"].as_array().map(|a| a.len()))
            .unwrap_or(0)
    };
    wait_until("the hub registers", Duration::from_secs(10), || {
        hub.metric("fedport_registry_up ") == 1.0
    });
    let rss_before = rss_kib(hub.pid());
    let (rt, mut client) = etcd_client(&etcd);
    let member = |i: usize| {
        let svcs: Vec<String> = (0..10).map(|s| format!("\"svc{s}\"")).collect();
        format!(
            r#"{{"name":"n{i}","region":"r{}","address":"127.0.0.1:9","identity":"spiffe://fed.test/node/n{i}","services":[{}]}}"#,
            i % 10,
            svcs.join(",")
        )
    };
    let t0 = Instant::now();
    rt.block_on(async {
        for i in 0..1000 {
            client
                .put(format!("/fedport/nodes/n{i}"), member(i), None)
                .await
                .unwrap();
        }
    });
    let written = t0.elapsed();
    wait_until("the hub knows 1,000 peers", Duration::from_secs(60), || {
        peers() == 1000
    });
    let full = t0.elapsed();
    let rss_after = rss_kib(hub.pid());
    let t1 = Instant::now();
    rt.block_on(client.put("/fedport/nodes/n1000", member(1000), None))
        .unwrap();
    wait_until("the hub knows 1,001 peers", Duration::from_secs(30), || {
        peers() == 1001
    });
    let one = t1.elapsed();
    let t2 = Instant::now();
    rt.block_on(client.delete("/fedport/nodes/n7", None))
        .unwrap();
    wait_until("n7 leaves", Duration::from_secs(30), || peers() == 1000);
    let removed = t2.elapsed();

    // a member hosting none of the hub's services is known but costs no probe
    let idle = r#"{"name":"idle","region":"r1","address":"127.0.0.1:9","identity":"spiffe://fed.test/node/idle","services":["elsewhere"]}"#;
    rt.block_on(client.put("/fedport/nodes/idle", idle, None))
        .unwrap();
    wait_until("the hub knows idle", Duration::from_secs(30), || {
        peers() == 1001
    });
    let detail: serde_json::Value =
        serde_json::from_str(&hub.admin_get("/readyz?verbose")).unwrap();
    let entry = |name: &str| {
        detail["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(entry("idle")["probed"], false, "{}", entry("idle"));
    assert!(entry("idle")["up"].is_null());
    assert_eq!(entry("n0")["probed"], true, "{}", entry("n0"));
    let metrics = hub.admin_get("/metrics");
    assert!(metrics.contains(r#"fedport_peer_up{peer="n0"}"#));
    for series in ["fedport_peer_up{", "fedport_peer_rtt_seconds{"] {
        assert!(
            !metrics.contains(&format!(r#"{series}peer="idle"}}"#)),
            "no {series} series for idle"
        );
    }
    eprintln!(
        "1,000 members × 10 services: written in {written:.2?}, full table applied {full:.2?} after the first write; \
         one more member applied in {one:.2?}, one removal in {removed:.2?}; \
         node RSS {rss_before} KiB with no members, {rss_after} KiB with 1,000"
    );
    let log = hub.log_text();
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("registry: membership applied"))
        .collect();
    eprintln!("{} membership applications; the last:", applied.len());
    for l in applied.iter().rev().take(3) {
        eprintln!("  {l}");
    }
}

/// A client of the test's etcd (its first member), with a runtime to drive it.
fn etcd_client(etcd: &Etcd) -> (tokio::runtime::Runtime, etcd_client::Client) {
    let endpoints = etcd.endpoints_toml();
    let first = endpoints
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next()
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(etcd_client::Client::connect([first], None))
        .unwrap();
    (rt, client)
}

fn rss_kib(pid: u32) -> u64 {
    crate::support::status_kib(pid, "VmRSS")
}

/// etcd over TLS with client certificates: nodes that present theirs register and find
/// each other; one that does not is refused and reports the registry down.
#[test]
fn the_registry_speaks_tls_with_client_certificates() {
    let pki = Pki::new();
    let server = pki.node_cert("etcd");
    let etcd = Etcd::with_tls(pki.ca.clone(), server.cert.clone(), server.key.clone());
    let orders = upstream::start(Proto::H2c);
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let with_tls = |name: &str| {
        let c = pki.node_cert(&format!("{name}-etcd"));
        format!(
            "{}ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            registry(&etcd),
            pki.ca.display(),
            c.cert.display(),
            c.key.display()
        )
    };
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!("{}{}", http_service("orders", &[], ""), with_tls("a")),
    ));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            http_service("orders", &[orders.url(Proto::H2c)], ""),
            with_tls("b")
        ),
    ));
    wait_until(
        "a routes orders to b over a TLS registry",
        Duration::from_secs(15),
        || get(&pki, pa, "orders", &[]).0 == 200,
    );
    assert_eq!(a.metric("fedport_registry_up "), 1.0);
    // only the CA, no client certificate: etcd refuses the handshake
    let c = Fedport::start(&node_config(
        &pki,
        "c",
        "eu-1",
        pc,
        &format!(
            "{}{}ca = \"{}\"\n",
            http_service("orders", &[orders.url(Proto::H2c)], ""),
            registry(&etcd),
            pki.ca.display()
        ),
    ));
    // each attempt is bounded by a 3 s timeout: wait for the first to be counted
    wait_until(
        "c's refused attempt counted",
        Duration::from_secs(15),
        || c.metric("fedport_registry_errors_total ") >= 1.0,
    );
    assert_eq!(c.metric("fedport_registry_up "), 0.0);
    assert_eq!(
        a.metric("fedport_registry_members "),
        1.0,
        "c never registered"
    );
}
