//! Several fedport nodes on loopback as a federation: calls cross regions with the
//! federation headers, traffic fails over to another region and back while a steady
//! load runs, a forwarding loop is refused at once, and a deadline holds across hops.

use crate::support::upstream::{self, Proto};
use crate::support::{free_port, Fedport, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One node's config: `[[listener]] internal` on `port`, every identity allowed
/// everything, pings fast enough for a test.
pub(crate) fn node_config(pki: &Pki, name: &str, region: &str, port: u16, rest: &str) -> String {
    let cert = pki.node_cert(name);
    format!(
        r#"[node]
name = "{name}"
region = "{region}"
workers = 2
peer_ping_interval = "200ms"
peer_ping_timeout = "500ms"

[tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "internal"
bind = "127.0.0.1:{port}"

[[allow]]
from = "*"
to = "*"

{rest}
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        ca = pki.ca.display(),
    )
}

pub(crate) fn peer(name: &str, region: &str, port: u16, services: &[&str]) -> String {
    let list: Vec<String> = services.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[peer]]\nname = \"{name}\"\nregion = \"{region}\"\naddress = \"127.0.0.1:{port}\"\n\
         identity = \"spiffe://{}/node/{name}\"\nservices = [{}]\n",
        crate::support::DOMAIN,
        list.join(", ")
    )
}

pub(crate) fn http_service(name: &str, endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\nprotocol = \"http\"\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// GET through a node with the test client's certificate: status and JSON body.
pub(crate) fn get(pki: &Pki, port: u16, service: &str, extra: &[&str]) -> (u16, serde_json::Value) {
    let c = pki.curl_client();
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    let h = format!("fed-service: {service}");
    let url = format!("https://localhost:{port}/x");
    a.extend(["-H", &h]);
    a.extend(extra);
    a.push(&url);
    let (code, body, _) = crate::support::curl(&a);
    (code, serde_json::from_str(&body).unwrap_or_default())
}

fn header<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v["headers"][name][0].as_str().unwrap_or("")
}

#[test]
fn a_call_crosses_regions_with_the_federation_headers() {
    let pki = Pki::new();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let far = upstream::start(Proto::H2c);
    let near_b = upstream::start(Proto::H2c);
    let near_c = upstream::start(Proto::H2c);
    // a (eu-1) hosts nothing; b (eu-1) hosts "near"; c (us-1) hosts "far" and "near"
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}{}{}",
            http_service("far", &[], ""),
            http_service("near", &[], ""),
            peer("b", "eu-1", pb, &["near"]),
            peer("c", "us-1", pc, &["far", "near"]),
        ),
    ));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            http_service("near", &[near_b.url(Proto::H2c)], ""),
            peer("a", "eu-1", pa, &[]),
        ),
    ));
    let _c = Fedport::start(&node_config(
        &pki,
        "c",
        "us-1",
        pc,
        &format!(
            "{}{}{}",
            http_service("far", &[far.url(Proto::H2c)], ""),
            http_service("near", &[near_c.url(Proto::H2c)], ""),
            peer("a", "eu-1", pa, &[]),
        ),
    ));

    // the nodes started one after the other: wait until a's PINGs reach both peers
    crate::support::wait_until("peers up", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
            && a.metric(r#"fedport_peer_up{peer="c"}"#) == 1.0
            && a.metric(r#"fedport_peer_rtt_seconds{peer="c"}"#) > 0.0
    });
    // a peer that is up has its connections open before any request needs them: each
    // of a's 2 workers opens its 2 (upstream_connections), and the first call across
    // the regions opens none, so it pays no handshake across the long link
    let connects = r#"fedport_upstream_connects_total{service="peer:c",result="ok"}"#;
    crate::support::wait_until(
        "a's connections to c opened ahead",
        Duration::from_secs(10),
        || a.metric(connects) >= 4.0,
    );
    let before = a.metric(connects);
    let (code, v) = get(&pki, pa, "far", &[]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        a.metric(connects),
        before,
        "the call rode a connection already open"
    );
    assert_eq!(header(&v, "fed-peer"), "spiffe://fed.test/node/a", "{v}");
    assert_eq!(header(&v, "fed-origin"), "a", "{v}");
    assert_eq!(header(&v, "fed-hops"), "1", "{v}");
    assert_eq!(
        header(&v, "fed-caller"),
        "spiffe://fed.test/client/alice",
        "{v}"
    );
    assert_eq!(far.hits(), 1);

    // the same region first, though both regions offer it
    for _ in 0..10 {
        assert_eq!(get(&pki, pa, "near", &[]).0, 200);
    }
    assert_eq!((near_b.hits(), near_c.hits()), (10, 0));
    assert_eq!(
        a.metric(r#"fedport_forwarded_total{service="far",target="c"}"#),
        1.0
    );
    assert_eq!(
        a.metric(r#"fedport_forwarded_total{service="near",target="b"}"#),
        10.0
    );

    // a caller cannot forge the federation headers
    let (_, v) = get(
        &pki,
        pa,
        "far",
        &[
            "-H",
            "fed-origin: mallory",
            "-H",
            "fed-hops: 0",
            "-H",
            "fed-caller: spiffe://fed.test/node/root",
        ],
    );
    assert_eq!(header(&v, "fed-origin"), "a", "{v}");
    assert_eq!(
        header(&v, "fed-caller"),
        "spiffe://fed.test/client/alice",
        "{v}"
    );
    assert_eq!(header(&v, "fed-hops"), "1", "{v}");

    // nor can a service forge a peer's refusal to have its request run twice: b's
    // service answers a POST 503 with `fed-refused`; b does not pass that on as its
    // own, so a does not resend the (non-idempotent) POST to c
    let (code, v) = get(
        &pki,
        pa,
        "near",
        &[
            "-X",
            "POST",
            "-d",
            "one order",
            "-H",
            "x-reply-fed-refused: no_healthy_target",
        ],
    );
    assert_eq!(code, 503, "{v}");
    assert_eq!((near_b.hits(), near_c.hits()), (11, 0));
}

/// A peer whose request may have reached its service does not end it as a refusal
/// another node may serve. b marks `POST /` idempotent and a does not: b's endpoint
/// answers 503, b retries on its second endpoint, which refuses connections; before,
/// that last failure made b answer `no_healthy_target`, and a sent the POST on to c.
#[test]
fn a_peer_that_may_have_delivered_a_call_never_says_another_node_may_serve_it() {
    let pki = Pki::new();
    let (pa, pb, pc, dead) = (free_port(), free_port(), free_port(), free_port());
    let near_b = upstream::start(Proto::H2c);
    let near_c = upstream::start(Proto::H2c);
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}{}",
            http_service("near", &[], ""),
            peer("b", "eu-1", pb, &["near"]),
            peer("c", "us-1", pc, &["near"]),
        ),
    ));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            http_service(
                "near",
                &[near_b.url(Proto::H2c), format!("h2c://127.0.0.1:{dead}")],
                "idempotent = [\"POST /\"]",
            ),
            peer("a", "eu-1", pa, &[]),
        ),
    ));
    let _c = Fedport::start(&node_config(
        &pki,
        "c",
        "us-1",
        pc,
        &format!(
            "{}{}",
            http_service("near", &[near_c.url(Proto::H2c)], ""),
            peer("a", "eu-1", pa, &[]),
        ),
    ));
    crate::support::wait_until("peers up", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
            && a.metric(r#"fedport_peer_up{peer="c"}"#) == 1.0
    });
    let c = pki.curl_client();
    let url = format!("https://localhost:{pa}/status/503");
    // four: a fifth 503 in a row would eject b's endpoint (and then nothing reached a
    // service, and c may rightly be asked)
    for i in 0..4 {
        let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
        args.extend([
            "-X",
            "POST",
            "-d",
            "one order",
            "-H",
            "fed-service: near",
            &url,
        ]);
        let (code, body, _) = crate::support::curl(&args);
        assert!(matches!(code, 502 | 503), "call {i}: {code} {body}");
    }
    assert_eq!(near_b.hits(), 4, "each POST reached b's service once");
    assert_eq!(near_c.hits(), 0, "and none was sent on to c");
}

/// Outcome of one request of the steady load.
struct Sample {
    at: Duration,
    idempotent: bool,
    status: u16,
    /// Which side answered: the local instance or the other region.
    via_peer: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_fails_over_to_the_other_region_and_back() {
    let pki = Pki::new();
    let (pa, pb) = (free_port(), free_port());
    let local = upstream::start(Proto::H2c);
    let remote = upstream::start(Proto::H2c);
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}",
            http_service(
                "orders",
                &[local.url(Proto::H2c)],
                "health = { interval = \"100ms\", timeout = \"100ms\", path = \"/status/200\", healthy_threshold = 1, unhealthy_threshold = 1 }\n\
                 outlier = { consecutive_failures = 1, ejection = \"30s\" }\n",
            ),
            peer("b", "us-1", pb, &["orders"]),
        ),
    ));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "us-1",
        pb,
        &format!(
            "{}{}",
            http_service("orders", &[remote.url(Proto::H2c)], ""),
            peer("a", "eu-1", pa, &[]),
        ),
    ));

    let addr: std::net::SocketAddr = format!("127.0.0.1:{pa}").parse().unwrap();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    // the load runs until traffic is seen back on the restarted endpoint, 3.6 s at least
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for worker in 0..8 {
        let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, addr).await;
        let samples = samples.clone();
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            // bounded: by the stop, 30 s, and at most 2,000 requests per loop
            while !stop.load(Ordering::Relaxed)
                && t0.elapsed() < Duration::from_secs(30)
                && n < 2000
            {
                n += 1;
                let idempotent = worker % 2 == 0;
                let req = http::Request::builder()
                    .method(if idempotent { "GET" } else { "POST" })
                    .uri(format!("https://localhost:{pa}/orders"))
                    .header("fed-service", "orders")
                    .header("x-sleep-ms", "20")
                    .header("x-request-id", format!("w{worker}-{n}"))
                    .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
                    .unwrap();
                let Ok(resp) = s.send_request(req).await else {
                    samples.lock().unwrap().push(Sample {
                        at: t0.elapsed(),
                        idempotent,
                        status: 0,
                        via_peer: false,
                    });
                    continue;
                };
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                let v: serde_json::Value = body
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                samples.lock().unwrap().push(Sample {
                    at: t0.elapsed(),
                    idempotent,
                    status,
                    via_peer: header(&v, "fed-peer") == "spiffe://fed.test/node/a",
                });
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stopped_at = t0.elapsed();
    tokio::task::block_in_place(|| local.stop());
    // the health checks take the endpoint out, as /readyz?verbose shows
    let available = || {
        let v: serde_json::Value =
            serde_json::from_str(&a.admin_get("/readyz?verbose")).unwrap_or_default();
        v["services"][0]["endpoints"][0]["available"].as_bool()
    };
    tokio::task::block_in_place(|| {
        crate::support::wait_until("endpoint out", Duration::from_secs(5), || {
            available() == Some(false)
        })
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| local.restart());
    let restarted_at = t0.elapsed();
    // the health checks put the endpoint back, and traffic reaches it again
    tokio::task::block_in_place(|| {
        crate::support::wait_until("endpoint back", Duration::from_secs(10), || {
            available() == Some(true)
        });
        crate::support::wait_until("traffic back", Duration::from_secs(10), || {
            samples
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.at > restarted_at && !s.via_peer && s.status == 200)
        });
    });
    // and for at least as long as it always ran
    let ran = t0.elapsed();
    if ran < Duration::from_millis(3600) {
        tokio::time::sleep(Duration::from_millis(3600) - ran).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }

    let samples = samples.lock().unwrap();
    let total = samples.len();
    let bad_idem: Vec<_> = samples
        .iter()
        .filter(|s| s.idempotent && s.status != 200)
        .map(|s| (s.at, s.status))
        .collect();
    let bad_other: Vec<_> = samples
        .iter()
        .filter(|s| !s.idempotent && s.status != 200)
        .map(|s| (s.at, s.status))
        .collect();
    let failover = samples
        .iter()
        .filter(|s| s.at > stopped_at && s.via_peer && s.status == 200)
        .map(|s| s.at - stopped_at)
        .min();
    let back = samples
        .iter()
        .filter(|s| s.at > restarted_at && !s.via_peer && s.status == 200)
        .map(|s| s.at - restarted_at)
        .min();
    eprintln!(
        "{total} requests; failover after {failover:?}, back after {back:?}; \
         idempotent errors {}, non-idempotent errors {} {:?}",
        bad_idem.len(),
        bad_other.len(),
        bad_other
    );
    assert!(total > 200, "the load ran: {total}");
    assert!(
        bad_idem.is_empty(),
        "idempotent calls all succeed: {bad_idem:?}"
    );
    // the non-idempotent calls in flight when the instance died fail as unavailable
    // (HTTP 502/503), never with anything else, and never more than were in flight
    assert!(
        bad_other.iter().all(|(_, s)| *s == 502 || *s == 503),
        "{bad_other:?}"
    );
    assert!(bad_other.len() <= 8, "{bad_other:?}");
    assert!(failover.is_some(), "traffic moved to the other region");
    assert!(back.is_some(), "traffic came back after the restart");
    // nothing non-idempotent was sent twice: each of those request ids (odd workers)
    // reached a service at most once
    let mut ids: Vec<String> = local.seen_header("x-request-id");
    ids.extend(remote.seen_header("x-request-id"));
    let mut count = std::collections::HashMap::new();
    for id in &ids {
        *count.entry(id.clone()).or_insert(0) += 1;
    }
    let twice: Vec<_> = count
        .iter()
        .filter(|(id, n)| {
            let worker = id
                .strip_prefix('w')
                .and_then(|r| r.split('-').next())
                .and_then(|w| w.parse::<u32>().ok());
            **n > 1 && worker.is_some_and(|w| w % 2 == 1)
        })
        .collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
    assert_eq!(available(), Some(true), "the endpoint is back in rotation");
    assert!(a.metric(r#"fedport_forwarded_total{service="orders",target="b"}"#) > 0.0);
}

#[test]
fn retries_stay_within_the_budget() {
    let pki = Pki::new();
    let (pa, pb) = (free_port(), free_port());
    let local = upstream::start(Proto::H2c);
    let remote = upstream::start(Proto::H2c);
    // every answer is a 503; nothing is ejected, so each GET is sent locally and may be
    // retried once at b — if the budget (20% of requests, no per-second floor) allows
    let a = Fedport::start(
        &node_config(
            &pki,
            "a",
            "eu-1",
            pa,
            &format!(
                "{}{}",
                http_service(
                    "flaky",
                    &[local.url(Proto::H2c)],
                    "outlier = { consecutive_failures = 100000 }\n"
                ),
                peer("b", "us-1", pb, &["flaky"]),
            ),
        )
        .replace(
            "workers = 2",
            "workers = 1\nretry_budget = { ratio = 0.2, min_per_second = 0 }",
        ),
    );
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "us-1",
        pb,
        &format!(
            "{}{}",
            http_service("flaky", &[remote.url(Proto::H2c)], ""),
            peer("a", "eu-1", pa, &[]),
        ),
    ));
    let c = pki.curl_client();
    let mut args: Vec<String> = c.clone();
    args.extend(["-s", "-w", "%{http_code}\n", "-H", "fed-service: flaky"].map(String::from));
    for _ in 0..100 {
        args.extend(["-o".into(), "/dev/null".into()]);
        args.push(format!("https://localhost:{pa}/status/503"));
    }
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|l| *l == "503").count(),
        100,
        "{codes}"
    );
    let retried = a.metric(r#"fedport_retries_total{service="flaky",kind="idempotent"}"#);
    let refused = a.metric(r#"fedport_retries_total{service="flaky",kind="budget_exhausted"}"#);
    eprintln!("100 failing GETs: {retried} retried, {refused} refused by the budget");
    assert!((15.0..=20.0).contains(&retried), "{retried}");
    assert_eq!(retried + refused, 100.0);
    assert_eq!(remote.hits() as f64, retried, "each retry reached b once");
    assert_eq!(local.hits(), 100);
}

#[tokio::test(flavor = "current_thread")]
async fn a_forwarding_loop_is_refused_at_once() {
    let pki = Pki::new();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let grpc = |extra: &str| {
        format!(
            "[[service]]\nname = \"ping\"\nprotocol = \"grpc\"\ngrpc_services = [\"loop.Ping\"]\n{extra}\n"
        )
    };
    // a and b each believe the other hosts the service
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!("{}{}", grpc(""), peer("b", "eu-1", pb, &["ping"])),
    ));
    let b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!("{}{}", grpc(""), peer("a", "eu-1", pa, &["ping"])),
    ));
    let pki_ref = &pki;
    let call = |port: u16| async move {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut s = crate::support::h2_connect::<Full<Bytes>>(pki_ref, addr).await;
        let req = http::Request::post(format!("https://localhost:{port}/loop.Ping/Ping"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        let msg = resp
            .headers()
            .get("grpc-message")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, msg)
    };
    let (status, msg) = call(pa).await;
    assert_eq!(status.as_deref(), Some("9"), "FAILED_PRECONDITION: {msg:?}");
    assert!(msg.unwrap_or_default().contains("transit"));
    // no storm: one request went a → b, and b refused it
    assert_eq!(
        a.metric(r#"fedport_forwarded_total{service="ping",target="b"}"#),
        1.0
    );
    assert_eq!(
        b.metric(r#"fedport_forwarded_total{service="ping",target="a"}"#),
        0.0
    );
    assert_eq!(
        b.metric(r#"fedport_rejections_total{listener="internal",reason="loop"}"#),
        1.0
    );
    drop((a, b));

    // transit nodes in a ring: a → b → c, and c may not go on past max_hops
    let ring = |me: &str, next: &str, port: u16, next_port: u16, prev: &str, prev_port: u16| {
        node_config(
            &pki,
            me,
            "eu-1",
            port,
            &format!(
                "{}{}{}",
                grpc(""),
                peer(next, "eu-1", next_port, &["ping"]),
                peer(prev, "eu-1", prev_port, &[]),
            ),
        )
        .replace("workers = 2", "workers = 2\ntransit = true")
    };
    let a = Fedport::start(&ring("a", "b", pa, pb, "c", pc));
    let b = Fedport::start(&ring("b", "c", pb, pc, "a", pa));
    let c = Fedport::start(&ring("c", "a", pc, pa, "b", pb));
    let (status, msg) = call(pa).await;
    assert_eq!(status.as_deref(), Some("9"), "{msg:?}");
    assert!(msg.unwrap_or_default().contains("max_hops"));
    let sent: f64 = [(&a, "b"), (&b, "c"), (&c, "a")]
        .iter()
        .map(|(n, to)| {
            n.metric(&format!(
                r#"fedport_forwarded_total{{service="ping",target="{to}"}}"#
            ))
        })
        .sum();
    assert_eq!(sent, 2.0, "a → b → c and no further");
}

#[tokio::test(flavor = "current_thread")]
async fn a_deadline_holds_across_two_hops() {
    let pki = Pki::new();
    let (pa, pb) = (free_port(), free_port());
    let up = upstream::start(Proto::H2c);
    let svc = |endpoints: &str| {
        format!(
            "[[service]]\nname = \"slow\"\nprotocol = \"grpc\"\ngrpc_services = [\"slow.Svc\"]\nendpoints = [{endpoints}]\ntimeout = \"5s\"\n\
             outlier = {{ consecutive_failures = 2 }}\n"
        )
    };
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!("{}{}", svc(""), peer("b", "us-1", pb, &["slow"])),
    ));
    let b = Fedport::start(&node_config(
        &pki,
        "b",
        "us-1",
        pb,
        &format!(
            "{}{}",
            svc(&format!("\"{}\"", up.url(Proto::H2c))),
            peer("a", "eu-1", pa, &[])
        ),
    ));
    let addr = format!("127.0.0.1:{pa}").parse().unwrap();
    let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, addr).await;
    // a call with the caller's deadline, to a service that takes `sleep_ms`
    let call = |deadline: &str, sleep_ms: &str| {
        http::Request::post(format!("https://localhost:{pa}/slow.Svc/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", deadline)
            .header("x-sleep-ms", sleep_ms)
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap()
    };
    let req = call("100m", "500");
    let t = Instant::now();
    let resp = s.send_request(req).await.unwrap();
    let took = t.elapsed();
    assert_eq!(
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("4"),
        "DEADLINE_EXCEEDED: {resp:?}"
    );
    eprintln!("DEADLINE_EXCEEDED after {took:?}");
    assert!(
        took < Duration::from_millis(450),
        "the caller's 100 ms, not the service's 500 ms: {took:?}"
    );
    // the far service was told what was left of the 100 ms
    let seen = up.seen_header("grpc-timeout");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let left: u64 = seen[0].trim_end_matches('m').parse().unwrap();
    assert!(left < 100 && left > 0, "reduced deadline: {}", seen[0]);
    // an already expired deadline is not started at all
    let resp = s.send_request(call("0m", "0")).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("4")
    );
    assert_eq!(up.hits(), 1);
    assert_eq!(
        a.metric(r#"fedport_forwarded_total{service="slow",target="b"}"#),
        1.0
    );
    // callers running out of their own deadlines say nothing of the endpoint: three
    // more in a row (the service ejects after two failures) leave it in rotation
    for _ in 0..3 {
        let resp = s.send_request(call("50m", "300")).await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], "4", "{resp:?}");
    }
    let ejected = format!(
        r#"fedport_upstream_ejections_total{{service="slow",endpoint="{}"}}"#,
        up.url(Proto::H2c)
    );
    assert_eq!(b.metric(&ejected), 0.0);
    // a service that answers a call 200 but never gives its status: the caller gets
    // INTERNAL in trailers, not a stream that just stops
    let resp = s.send_request(call("5S", "0")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let trailers = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap_or_default();
    assert_eq!(trailers["grpc-status"], "13", "{trailers:?}");
    assert_eq!(
        b.metric(&format!(
            r#"fedport_upstream_healthy{{service="slow",endpoint="{}"}}"#,
            up.url(Proto::H2c)
        )),
        1.0
    );
}

/// Headers with which meshes and balancers tell a service who calls and from where
/// (x-forwarded-*, forwarded, x-real-ip, x-envoy-*, l5d-*, …, in any spelling): a
/// caller's own copies never reach the service. With `forwarded_headers`, fedport sets
/// `x-forwarded-for` (the address it saw, appended to what a peer node carried) and
/// `x-forwarded-proto`; without, the service gets neither.
#[test]
fn headers_naming_the_caller_are_set_by_fedport_never_by_the_caller() {
    let pki = Pki::new();
    let (pa, pb) = (free_port(), free_port());
    let up = upstream::start(Proto::Http1);
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}",
            http_service("who", &[], "forwarded_headers = true"),
            peer("b", "eu-1", pb, &["who"])
        ),
    ));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}{}",
            http_service("who", &[up.url(Proto::Http1)], "forwarded_headers = true"),
            http_service("plain", &[up.url(Proto::Http1)], ""),
            peer("a", "eu-1", pa, &[])
        ),
    ));
    crate::support::wait_until("peer up", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
    });
    let forged = [
        "X-Forwarded-For: 6.6.6.6",
        "X_Forwarded_For: 6.6.6.6",
        "x-forwarded-proto: http",
        "Forwarded: for=6.6.6.6;proto=https",
        "X-Real-IP: 6.6.6.6",
        "x-forwarded-client-cert: URI=spiffe://fed.test/admin",
        "x-envoy-retry-on: 5xx",
        "x-envoy-upstream-rq-timeout-ms: 1",
        "l5d-dst-override: admin.svc:80",
        "x-remote-user: root",
        "X-Auth-Request-User: root",
        "x-forwarded-user: root",
        "x-ssl-client-s-dn: CN=admin",
        "x-forwarded-tls-client-cert: admin",
        "x-client-cert-spiffe: spiffe://fed.test/admin",
        "x-amzn-mtls-clientcert: admin",
        "x-arr-clientcert: admin",
        "x-original-host: admin.internal",
        "x-host: admin.internal",
        "true-client-ip: 6.6.6.6",
    ];
    let mut extra = Vec::new();
    for f in &forged {
        extra.extend(["-H", *f]);
    }
    for (port, http, want_xff) in [
        (pb, "--http1.1", "127.0.0.1"),
        (pb, "--http2", "127.0.0.1"),
        // through a: the client's address as a saw it, then a's as b saw it
        (pa, "--http2", "127.0.0.1, 127.0.0.1"),
    ] {
        let mut args = extra.clone();
        args.push(http);
        let (code, v) = get(&pki, port, "who", &args);
        assert_eq!(code, 200, "{v}");
        no_forgery(&v, &format!("{port} {http}"), |_| false);
        let headers = v["headers"].as_object().unwrap();
        assert_eq!(
            header(&v, "x-forwarded-for"),
            want_xff,
            "{port} {http}: {v}"
        );
        assert_eq!(
            header(&v, "x-forwarded-proto"),
            "https",
            "{port} {http}: {v}"
        );
        assert_eq!(
            headers
                .get("x-forwarded-for")
                .map(|v| v.as_array().unwrap().len()),
            Some(1),
            "{v}"
        );
    }
    // the default (forwarded_headers = false): the caller's copies are removed and
    // none is set in their place
    for http in ["--http1.1", "--http2"] {
        let mut args = extra.clone();
        args.push(http);
        let (code, v) = get(&pki, pb, "plain", &args);
        assert_eq!(code, 200, "{v}");
        no_forgery(&v, &format!("plain {http}"), |n| {
            n.starts_with("x-forwarded-") || n == "x-real-ip"
        });
    }
}

/// No forged value reached the service, nor a header only meshes set (`x-envoy-*`,
/// `l5d-*`, `forwarded`), nor one `also` names (`_` read as `-`).
fn no_forgery(v: &serde_json::Value, what: &str, also: fn(&str) -> bool) {
    for (name, values) in v["headers"].as_object().unwrap() {
        let n = name.replace('_', "-");
        let joined = values.to_string();
        assert!(
            !joined.contains("6.6.6.6") && !joined.contains("root") && !joined.contains("admin"),
            "{what}: {name}: {joined} reached the service"
        );
        assert!(
            !(n.starts_with("x-envoy-") || n.starts_with("l5d-") || n == "forwarded" || also(&n)),
            "{what}: {name} reached the service"
        );
    }
}

/// A peer that completes TLS and drops every connection at once (a node wedged in its
/// start, or something else on its port): it is marked down, since no PING was ever
/// answered, and dialled on a backoff, by the probe and by the connections kept warm
/// for requests, rather than as fast as it takes connections.
#[test]
fn a_peer_that_takes_connections_and_drops_them_is_dialled_on_a_backoff() {
    let pki = Pki::new();
    let z = pki.node_cert("z");
    let script = format!(
        "import socket, ssl, sys\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain({:?}, {:?})\n\
         ctx.set_alpn_protocols(['h2'])\n\
         s = socket.create_server(('127.0.0.1', 0))\n\
         print(s.getsockname()[1], flush=True)\n\
         while True:\n    c, _ = s.accept()\n    try:\n        ctx.wrap_socket(c, server_side=True).close()\n        print('tls', flush=True)\n    except Exception:\n        c.close()\n",
        z.cert.display().to_string(),
        z.key.display().to_string()
    );
    // killed however the test ends
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Server(
        std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(server.0.stdout.take().unwrap()));
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for _ in lines.map_while(Result::ok) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        free_port(),
        &format!(
            "{}{}",
            http_service("far", &[], ""),
            peer("z", "us-1", port, &["far"])
        ),
    ));
    crate::support::wait_until("z marked down", Duration::from_secs(5), || {
        a.metric(r#"fedport_peer_up{peer="z"}"#) == 0.0
    });
    let from = accepted.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(6));
    let dialled = accepted.load(Ordering::Relaxed) - from;
    drop(server);
    eprintln!("a peer that drops every connection: dialled {dialled} times in 6 s");
    // the probe's backoff doubles from 100 ms to 5 s (about 7 dials in 6 s); a loop as
    // fast as TLS goes would make hundreds
    assert!(dialled <= 15, "{dialled} connections in 6 s");
    assert!(dialled >= 1, "the probe still dials");
    assert_eq!(a.metric(r#"fedport_peer_up{peer="z"}"#), 0.0);
}
