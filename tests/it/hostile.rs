//! A member with a valid certificate that means harm: it leaves answers unread, holds
//! streams still, pins memory with messages it never finishes, asks for more upstream
//! sockets than a service should get, and resets calls once they have cost something.
//! Each is driven by raw frames (tests/py/h2_abuse.py) beside well-behaved callers
//! (curl), who must go on being served.

use crate::federation::{node_config as fed_node, peer};
use crate::support::upstream::{self, Proto};
use crate::support::{curl, curl_as, node_config, wait_until, Fedport, Pki, PyClient};
use fedport::identity::pki::IssuedFiles;
use std::process::Command;
use std::time::Duration;

/// Runs an attack of tests/py/h2_abuse.py as the test client; its JSON report.
pub(crate) fn abuse(pki: &Pki, port: u16, attack: &str, extra: &[&str]) -> serde_json::Value {
    let v = attacker(pki, port, attack, extra).json();
    eprintln!("{attack}: {v}");
    v
}

/// [`abuse`] on a thread of its own.
fn abuse_meanwhile(
    pki: &Pki,
    port: u16,
    attack: &str,
    extra: &[&str],
) -> std::thread::JoinHandle<serde_json::Value> {
    attacker(pki, port, attack, extra).spawn()
}

fn attacker(pki: &Pki, port: u16, attack: &str, extra: &[&str]) -> PyClient {
    attacker_as(pki, port, &pki.client, attack, extra)
}

fn attacker_as(pki: &Pki, port: u16, who: &IssuedFiles, attack: &str, extra: &[&str]) -> PyClient {
    let args: Vec<&str> = [attack].into_iter().chain(extra.iter().copied()).collect();
    PyClient::new(pki, "h2_abuse.py", port, who, &args)
}

/// [`abuse`] as another identity: the reset allowance is an identity's, so attacks
/// that each must meet their own guard come from identities of their own.
pub(crate) fn abuse_as(
    pki: &Pki,
    port: u16,
    who: &IssuedFiles,
    attack: &str,
    extra: &[&str],
) -> serde_json::Value {
    let v = attacker_as(pki, port, who, attack, extra).json();
    eprintln!("{attack}: {v}");
    v
}

/// One well-formed gRPC call (`test.Echo/Say`) in raw frames as `who`; the answer's
/// report from tests/py/raw_request.py.
fn say_as(pki: &Pki, port: u16, who: &IssuedFiles) -> serde_json::Value {
    let msg = [0u8, 0, 0, 0, 4, 0x0a, 0x02, b'h', b'i'];
    let case = serde_json::json!([{
        "proto": "h2", "method": "POST", "path": "/test.Echo/Say", "authority": "localhost",
        "headers": [["content-type", "application/grpc"], ["te", "trailers"]],
        "body_hex": msg.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    }]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("case.json");
    std::fs::write(&file, case.to_string()).unwrap();
    let file = file.display().to_string();
    PyClient::new(pki, "raw_request.py", port, who, &[&file]).json()
}

/// `n` calls for `/big?n=BYTES` by other callers, each on its own connection, each
/// given `secs` to complete whole; how many did.
fn others_served(pki: &Pki, port: u16, service: &str, bytes: usize, n: usize, secs: u32) -> usize {
    let c = pki.curl_client();
    let (h, url, t) = (
        format!("fed-service: {service}"),
        format!("https://localhost:{port}/big?n={bytes}"),
        secs.to_string(),
    );
    (0..n)
        .filter(|_| {
            let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
            a.extend(["--http2", "--max-time", &t, "-H", &h, &url]);
            let (code, body, _) = curl(&a);
            code == 200 && body.len() == bytes
        })
        .count()
}

fn one_worker(cfg: String) -> String {
    assert!(cfg.contains("workers = 2"));
    cfg.replace("workers = 2", "workers = 1")
}

/// One caller asks for a dozen 4 MiB answers and reads none of them. The answers share
/// the node's connections to the service (and, across a peer hop, to the peer) with
/// everyone else's; other callers' 1 MiB answers still arrive whole.
#[test]
fn answers_one_caller_leaves_unread_hold_back_no_other_caller() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    // one worker: every stream shares the same two connections to the service
    let fp = Fedport::start(&one_worker(node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"big\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    )));
    let port = fp.port("internal");
    let before = timed(|| assert_eq!(others_served(&pki, port, "big", 1 << 20, 3, 10), 3)) / 3;
    let held = [
        "--count",
        "12",
        "--service",
        "big",
        "--path",
        "/big?n=4194304",
        "--seconds",
        "8",
    ];
    let attacker = abuse_meanwhile(&pki, port, "stall", &held);
    let streams = r#"fedport_streams_active{listener="internal"}"#;
    wait_until("the dozen answers held", Duration::from_secs(5), || {
        fp.metric(streams) >= 12.0
    });
    // the service has sent what the windows allow; nobody reads it
    std::thread::sleep(Duration::from_millis(300));
    let during = timed(|| {
        assert_eq!(
            others_served(&pki, port, "big", 1 << 20, 10, 5),
            10,
            "every other caller's answer arrived whole while a dozen sat unread"
        )
    }) / 10;
    not_held_up(before, during);
    let v = attacker.join().unwrap();
    assert!(
        v["data"].as_u64().unwrap() <= 65_535,
        "the attacker read no more than its first window: {v}"
    );
    assert_eq!(
        v["server_resets"], 0,
        "still held when the others were served: {v}"
    );

    // the same through two nodes: a holds the answers b sends over its peer connection
    let (pa, pb) = (crate::support::free_port(), crate::support::free_port());
    let a = Fedport::start(&one_worker(fed_node(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "[[service]]\nname = \"big\"\nprotocol = \"http\"\nendpoints = []\n{}",
            peer("b", "eu-1", pb, &["big"])
        ),
    )));
    let _b = Fedport::start(&one_worker(fed_node(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "[[service]]\nname = \"big\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n{}",
            up.url(Proto::H2c),
            peer("a", "eu-1", pa, &[])
        ),
    )));
    wait_until("peer up", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
    });
    let before = timed(|| assert_eq!(others_served(&pki, pa, "big", 1 << 20, 3, 10), 3)) / 3;
    let attacker = abuse_meanwhile(&pki, pa, "stall", &held);
    wait_until("the dozen answers held", Duration::from_secs(5), || {
        a.metric(streams) >= 12.0
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = timed(|| {
        assert_eq!(
            others_served(&pki, pa, "big", 1 << 20, 10, 5),
            10,
            "across the peer hop too"
        )
    }) / 10;
    not_held_up(before, during);
    let v = attacker.join().unwrap();
    assert!(v["data"].as_u64().unwrap() <= 65_535, "{v}");
    assert_eq!(
        v["server_resets"], 0,
        "still held when the others were served: {v}"
    );
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = std::time::Instant::now();
    f();
    t.elapsed()
}

/// Another caller's call took about as long while the answers were held as before.
/// Not a speed test: a stalled connection holds a call until the attacker gives up
/// (seconds); the bound is generous enough for a loaded machine and far below that.
fn not_held_up(before: Duration, during: Duration) {
    assert!(
        during <= before * 4 + Duration::from_millis(500),
        "a call took {during:?} while the answers were held, {before:?} before"
    );
}

/// Answers a caller leaves unread do not hold the HTTP/1.1 sockets they came on: a
/// socket goes back to the pool once the service's answer is all read, so the cap on
/// sockets (`max_connections`) is not one caller's to take.
#[test]
fn answers_left_unread_do_not_hold_their_http1_sockets() {
    let pki = Pki::new();
    let up = upstream::start(Proto::Http1);
    let fp = Fedport::start(&one_worker(node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"legacy\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             max_connections = 4\ntimeout = \"1500ms\"\n",
            up.url(Proto::Http1)
        ),
    )));
    let port = fp.port("internal");
    assert_eq!(others_served(&pki, port, "legacy", 20_000, 2, 10), 2);
    // a dozen answers of 20 kB, of which the caller's connection window takes three
    let held = [
        "--count",
        "12",
        "--service",
        "legacy",
        "--path",
        "/big?n=20000",
        "--seconds",
        "6",
    ];
    let attacker = abuse_meanwhile(&pki, port, "stall", &held);
    let streams = r#"fedport_streams_active{listener="internal"}"#;
    wait_until("the answers held", Duration::from_secs(5), || {
        fp.metric(streams) >= 9.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        others_served(&pki, port, "legacy", 20_000, 5, 5),
        5,
        "other callers get sockets while a dozen answers sit unread"
    );
    let v = attacker.join().unwrap();
    assert_eq!(v["server_resets"], 0, "the answers were still held: {v}");
}

/// What the windows let a service send and the caller not yet read counts against the
/// caller's memory budget once the caller's window stalls the answer: a caller that
/// leaves many answers unread has those past its budget reset (`reason="memory"`), while
/// a thousand small answers read as they come are charged nothing (streaming.rs).
#[test]
fn answers_left_unread_past_the_budget_are_reset() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&one_worker(
        node_config(
            &pki,
            &format!(
                "[[service]]\nname = \"big\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
                up.url(Proto::H2c)
            ),
        )
        .replace(
            "name = \"internal\"\nbind = \"127.0.0.1:0\"\n",
            "name = \"internal\"\nbind = \"127.0.0.1:0\"\nconnection_memory_budget = \"1MiB\"\n",
        ),
    ));
    let port = fp.port("internal");
    // a dozen 4 MiB answers asked for at once and none read: a service's stream window
    // is 256 KiB, so the budget covers three (with the header lists)
    let v = abuse(
        &pki,
        port,
        "stall",
        &[
            "--count",
            "12",
            "--service",
            "big",
            "--path",
            "/big?n=4194304",
            "--seconds",
            "3",
        ],
    );
    let memory = r#"fedport_rejections_total{listener="internal",reason="memory"}"#;
    eprintln!("{v}; {} reset for memory", fp.metric(memory));
    // (a reset stream's head may not have left yet: it is dropped with the stream)
    assert!(
        v["responses"].as_u64().unwrap() >= 3,
        "the held answers began: {v}"
    );
    let resets = v["server_resets"].as_u64().unwrap();
    assert!((8..=11).contains(&resets), "past the budget, reset: {v}");
    assert_eq!(fp.metric(memory), resets as f64);
    assert!(
        fp.metric("fedport_memory_held_bytes") <= (1 << 20) as f64,
        "held within the connection's budget"
    );
    // the budget is given back when the answers go: the caller is served again
    wait_until("all given back", Duration::from_secs(5), || {
        fp.metric("fedport_memory_held_bytes") == 0.0
    });
    assert_eq!(others_served(&pki, port, "big", 1 << 20, 3, 10), 3);
}

/// A caller that sends part of its body and stops gets its deadline, and the service
/// (which waits for the rest) is not blamed: before, each such call counted as the
/// endpoint's failure, and five ejected a healthy endpoint for every caller.
#[test]
fn a_caller_that_stalls_its_body_does_not_eject_the_endpoint() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\ngrpc_services = [\"test.Echo\"]\n\
             endpoints = [\"{}\"]\ntimeout = \"1s\"\n",
            up.url(Proto::H2c)
        ),
    ));
    let port = fp.port("internal");
    let v = PyClient::new(
        &pki,
        "h2_hold.py",
        port,
        &pki.client,
        &[
            "--conns",
            "2",
            "--streams",
            "4",
            "--size",
            "100000",
            "--seconds",
            "2",
        ],
    )
    .json();
    eprintln!("{v}");
    assert_eq!(v["answered"]["4"], 8, "each call got its deadline: {v}");
    let metrics = fp.admin_get("/metrics");
    let ejections: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fedport_upstream_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ejections, 0.0, "the endpoint was not blamed");
    // and the next caller is served by it
    let r = say_as(&pki, port, &pki.client);
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["headers"]["fed-refused"].is_null(), "{r}");
}

/// Calls whose small body arrives whole just before the deadline (1.8 s of a 2 s timeout)
/// to a service that takes 1.5 s: each gets its deadline, and the endpoint, which had
/// the request for 0.2 s, is not blamed. Before, the caller's timing alone counted as
/// the endpoint's failures, and six such calls ejected a healthy endpoint.
#[test]
fn a_body_timed_to_the_deadline_does_not_eject_the_endpoint() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\n\
             endpoints = [\"{}\"]\ntimeout = \"2s\"\n",
            up.url(Proto::H2c)
        ),
    ));
    let port = fp.port("internal");
    let v = PyClient::new(
        &pki,
        "h2_late_body.py",
        port,
        &pki.client,
        &[
            "--service",
            "up",
            "--streams",
            "6",
            "--delay",
            "1.8",
            "--header",
            "x-sleep-ms:1500",
        ],
    )
    .json();
    eprintln!("{v}");
    assert_eq!(v["answered"]["504"], 6, "each call got its deadline: {v}");
    let metrics = fp.admin_get("/metrics");
    let ejections: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("fedport_upstream_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ejections, 0.0, "the endpoint was not blamed");
    let (status, body, _) = curl_as(&pki, &pki.client.cert, &pki.client.key, port);
    assert_eq!(status, 200, "the next caller is served by it: {body}");
}

/// A stream on which nothing moves for `stream_idle_timeout` is reset: answers left
/// unread (RST_STREAM CANCEL), a service that does not answer (408 / DEADLINE_EXCEEDED
/// before the answer began), an HTTP/1.1 caller that stops reading (its connection
/// closed). A service's own timeout holds for its streams.
#[test]
fn a_stream_that_moves_nothing_is_reset_at_its_idle_timeout() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let cfg = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"big\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\
             [[service]]\nname = \"patient\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\
             stream_idle_timeout = \"30s\"\ntimeout = \"30s\"\n",
            up.url(Proto::H2c)
        ),
    )
    .replace(
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\n",
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\nstream_idle_timeout = \"1s\"\n",
    );
    assert!(cfg.contains("stream_idle_timeout = \"1s\""));
    let fp = Fedport::start(&cfg);
    let port = fp.port("internal");
    let idle = r#"fedport_rejections_total{listener="internal",reason="stream_idle_timeout"}"#;

    let v = abuse(
        &pki,
        port,
        "stall",
        &[
            "--count",
            "12",
            "--service",
            "big",
            "--path",
            "/big?n=4194304",
            "--seconds",
            "4",
        ],
    );
    let resets = v["reset_log"].as_array().unwrap();
    assert_eq!(resets.len(), 12, "every held stream was reset: {v}");
    for r in resets {
        assert_eq!(r[1], 8, "RST_STREAM(CANCEL): {v}");
        let t = r[2].as_f64().unwrap();
        assert!(
            (0.9..3.5).contains(&t),
            "reset about a second after it stalled: {v}"
        );
    }
    assert!(
        v["goaway"].is_null(),
        "the connection itself is not cut: {v}"
    );
    wait_until("counted", Duration::from_secs(3), || {
        fp.metric(idle) >= 12.0
    });
    wait_until("the streams let go", Duration::from_secs(3), || {
        fp.metric(r#"fedport_streams_active{listener="internal"}"#) == 0.0
    });

    // a service's own timeout: its streams may sit still longer
    let v = abuse(
        &pki,
        port,
        "stall",
        &[
            "--count",
            "2",
            "--service",
            "patient",
            "--path",
            "/big?n=4194304",
            "--seconds",
            "3",
        ],
    );
    assert_eq!(v["server_resets"], 0, "30 s is the service's: {v}");

    // before the answer began: the caller is told, in its protocol
    let before = fp.metric(idle);
    let c = pki.curl_client();
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    let url = format!("https://localhost:{port}/slow?ms=5000");
    a.extend(["--http2", "-H", "fed-service: big", &url]);
    let (code, body, _) = curl(&a);
    assert_eq!(code, 408, "{body}");
    assert!(body.contains(r#""reason":"stream_idle_timeout""#), "{body}");
    wait_until("counted", Duration::from_secs(3), || {
        fp.metric(idle) > before
    });
    // a gRPC caller is told DEADLINE_EXCEEDED (4) in a trailers-only answer
    let mut g: Vec<&str> = c.iter().map(String::as_str).collect();
    g.extend([
        "--http2",
        "-i",
        "-H",
        "fed-service: big",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        &url,
    ]);
    let (code, head, _) = curl(&g);
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("grpc-status: 4"),
        "{head}"
    );
    assert!(head.contains("stream_idle_timeout"), "{head}");

    // HTTP/1.1: a caller that stops reading has its connection closed
    let v = abuse(
        &pki,
        port,
        "h1_stall",
        &[
            "--service",
            "big",
            "--path",
            "/big?n=33554432",
            "--seconds",
            "3",
            "--wait",
            "5",
        ],
    );
    assert_eq!(v["closed"], true, "{v}");
    assert!(
        v["bytes"].as_u64().unwrap() < 32 << 20,
        "the rest of the answer was not sent: {v}"
    );
}

/// Resets are judged by what they cost: a stream reset after fedport routed and
/// authorized it — by the caller's RST_STREAM, or by frames that make the codec reset it
/// (MadeYouReset, CVE-2025-8671: a WINDOW_UPDATE overflowing the stream's window, DATA
/// on a stream the caller ended, a stream made to depend on itself) — counts against the
/// caller's identity, on all its connections; cheap streams (404s) sent between them
/// dilute nothing. Past max_streams in 10 s the connection is cut, and the service never
/// sees more started-then-cancelled calls than the caller could have had in flight, even
/// from a new connection for each burst.
#[test]
fn resets_of_started_calls_are_bounded_by_what_could_be_in_flight() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let max_streams = 40;
    // `secret`: a service no rule lets the caller reach, for padding with denials
    let cfg = crate::support::node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n\
             [[service]]\nname = \"secret\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"*\"\nto = \"orders\"\n",
    )
    .replace(
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\n",
        &format!("name = \"internal\"\nbind = \"127.0.0.1:0\"\nmax_streams = {max_streams}\n"),
    );
    let fp = Fedport::start(&cfg);
    let port = fp.port("internal");
    let cut = r#"fedport_rejections_total{listener="internal",reason="h2_rapid_reset"}"#;
    // a caller that cancels now and then, as gRPC deadlines do, is not cut
    let v = abuse(
        &pki,
        port,
        "started_rst",
        &["--count", "20", "--path", "/slow?ms=3000", "--wait", "1"],
    );
    assert!(v["goaway"].is_null() && v["closed"] == false, "{v}");
    // padded with 404s and denials alike: neither dilutes the count
    for how in ["rst", "window_overflow", "data_after_end", "self_priority"] {
        for pad in ["0", "4"] {
            let before = (up.hits(), fp.metric(cut));
            let who = pki.client_cert(&format!("r-{how}-{pad}"));
            let v = abuse_as(
                &pki,
                port,
                &who,
                &format!("started_{how}"),
                &[
                    "--count",
                    "200",
                    "--pad",
                    pad,
                    "--pad-denied",
                    "secret",
                    "--path",
                    "/slow?ms=3000",
                    "--wait",
                    "3",
                ],
            );
            let reached = up.hits() - before.0;
            // the codec treats some of these as connection errors and closes at the first
            // (GOAWAY PROTOCOL_ERROR or STREAM_CLOSED); the rest fedport counts and cuts
            let code = v["goaway"]["code"].as_u64();
            assert!(code.is_some(), "{how} pad {pad}: GOAWAY: {v}");
            if code == Some(0xb) || how == "rst" || how == "window_overflow" {
                assert_eq!(v["goaway"]["code"], 0xb, "{how} pad {pad}: {v}");
                assert_eq!(
                    v["goaway"]["debug"], "h2_rapid_reset",
                    "{how} pad {pad}: {v}"
                );
                wait_until("the cut counted", Duration::from_secs(3), || {
                    fp.metric(cut) > before.1
                });
            }
            assert_eq!(v["closed"], true, "{how} pad {pad}: {v}");
            assert!(
                v["sent"].as_u64().unwrap() < 200,
                "{how} pad {pad}: cut before the end: {v}"
            );
            assert!(
                reached <= max_streams + 2,
                "{how} pad {pad}: {reached} started-then-cancelled calls reached the service"
            );
            eprintln!("{how} pad {pad}: {reached} reached the service; GOAWAY {code:?}");
        }
    }
    assert!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="denied"}"#) > 0.0,
        "the padding was denied, too"
    );
    // `count` calls started on one new connection of `who` and cancelled; a connection
    // that is cut closes at once, one that is not is watched for `wait` seconds
    let cancel = |who: &IssuedFiles, count: usize, wait: &str| {
        let count = count.to_string();
        let args = ["--count", &count, "--path", "/slow?ms=3000", "--wait", wait];
        abuse_as(&pki, port, who, "started_rst", &args)
    };
    // the allowance is the caller's, not the connection's: a new connection for each
    // burst is cut as soon as it spends what is left
    // an identity of its own that first cancels 20 calls on one connection (not cut:
    // under the allowance), just before, so that they are in the 10 s window however
    // long the attacks above took
    let burst = &pki.client_cert("burst");
    let v = cancel(burst, 20, "1");
    assert!(v["goaway"].is_null() && v["closed"] == false, "{v}");
    let before = up.hits();
    let mut cuts = 0;
    for _ in 0..8 {
        if cancel(burst, 10, "0.5")["goaway"]["debug"] == "h2_rapid_reset" {
            cuts += 1;
        }
    }
    let reached = up.hits() - before;
    assert!(cuts >= 6, "most of the new connections were cut: {cuts}");
    assert!(
        reached <= max_streams,
        "{reached} started-then-cancelled calls over 8 connections"
    );
    // past its allowance, the caller's next connection is cut before its streams start:
    // a burst sent in one go reaches the service hardly at all. An identity of its own
    // spends the whole allowance on one connection just before (not cut: 40 is not
    // past 40), so that it is spent whatever the 10 s window did to the count above
    let spent = &pki.client_cert("spent");
    let v = cancel(spent, max_streams, "1");
    assert!(v["goaway"].is_null() && v["closed"] == false, "{v}");
    let before = up.hits();
    let v = cancel(spent, 30, "1");
    assert_eq!(v["goaway"]["debug"], "h2_rapid_reset", "{v}");
    let reached = up.hits() - before;
    assert!(
        reached <= 3,
        "{reached} calls of a caller past its allowance started"
    );
}
/// An `http://` endpoint gets no more sockets from the node than its service's
/// `max_connections`, however many streams callers send at once: a request beyond waits
/// for one within its deadline, or is refused with 503 (`reason="overloaded"`).
#[test]
fn an_http1_endpoint_gets_no_more_sockets_than_its_cap() {
    let pki = Pki::new();
    let up = upstream::start(Proto::Http1);
    // started with a soft file-descriptor limit below the hard one, as a login shell or
    // a supervisor may leave it: fedport raises it
    let hard = fedport::limits::nofile::current().unwrap().hard;
    let soft = (hard / 2).min(1024);
    let fp = Fedport::start_with_soft_nofile(
        &node_config(
            &pki,
            &format!(
                "[[service]]\nname = \"legacy\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
                 max_connections = 4\ntimeout = \"1500ms\"\n",
                up.url(Proto::Http1)
            ),
        ),
        soft,
    );
    // 48 calls at once on one connection (h2load, on the local listener), each holding
    // its socket for 250 ms: the 2 sockets of the worker serve about a dozen within the
    // 1.5 s deadline; the rest wait, and are refused
    let url = format!("http://127.0.0.1:{}/slow?ms=250", fp.port("local"));
    let out = Command::new("h2load")
        .args([
            "-n",
            "48",
            "-c",
            "1",
            "-m",
            "48",
            "-H",
            "fed-service: legacy",
            &url,
        ])
        .output()
        .expect("h2load (scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |what: &str| -> usize {
        text.lines()
            .find_map(|l| l.strip_prefix("status codes: "))
            .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(what)))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let (ok, failed) = (count(" 2xx"), count(" 5xx"));
    let codes = text.to_string();
    let busy = failed;
    let refusals = || {
        fp.log_text()
            .lines()
            .filter(|l| l.contains("refused"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(ok + failed, 48, "{codes} {}", refusals());
    assert!(
        ok >= 6,
        "calls that got a socket in time were served: {codes}"
    );
    assert!(busy > 0, "{codes}");
    // the cap is on sockets open at once; over the run a socket whose answer came too
    // late for its call's deadline is closed (an HTTP/1.1 answer cut short cannot be
    // reused) and another opened in its place, at most one per call refused
    let peak = up.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 4, "the service saw {peak} connections at once");
    assert!(
        up.conns.load(std::sync::atomic::Ordering::SeqCst) <= 4 + failed,
        "the service saw {} connections over the run",
        up.conns.load(std::sync::atomic::Ordering::SeqCst)
    );
    // refused as overloaded while waiting for a socket; a call that got one too late
    // for its deadline is a 504
    wait_until("the refusals counted", Duration::from_secs(3), || {
        let m = |r: &str| {
            fp.metric(&format!(
                r#"fedport_rejections_total{{listener="local",reason="{r}"}}"#
            ))
        };
        m("overloaded") >= 1.0 && m("overloaded") + m("deadline") == busy as f64
    });

    // the file-descriptor limits: raised, reported, and checked against
    let v: serde_json::Value = serde_json::from_str(&fp.admin_get("/readyz?verbose")).unwrap();
    assert_eq!(v["nofile"]["soft"], v["nofile"]["hard"], "{v}");
    assert!(
        v["nofile"]["soft"].as_u64().unwrap() > soft,
        "raised from {soft}: {v}"
    );
    assert!(v["nofile"]["needed"].as_u64().unwrap() > 10_000, "{v}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("big.toml");
    std::fs::write(
        &cfg,
        node_config(&pki, "[[service]]\nname = \"s\"\nprotocol = \"http\"\nendpoints = [\"http://127.0.0.1:1\"]\n")
            .replace("name = \"local\"\n", "name = \"local\"\nmax_connections = 100000000\n"),
    )
    .unwrap();
    let out = Command::new(crate::support::bin())
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("file descriptors"), "{err}");
    assert_eq!(out.status.code(), Some(0), "a warning: {err}");
}

/// Many calls each send all but the last byte of a large message that must be held
/// whole to be validated. What fedport holds for them stays within the connection's
/// budget, the identity's share (a quarter of the node's budget, all its connections
/// together) and the node's budget; the calls past them are refused with
/// RESOURCE_EXHAUSTED, fedport's memory stays within the budget over its idle size, and
/// a caller of another identity is served meanwhile.
#[test]
fn messages_held_for_validation_stay_within_the_memory_budgets() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let proto =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto/test.proto");
    let budget: u64 = 48 << 20;
    let (share, size) = (budget / 4, 2u64 << 20);
    let cfg = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"{}\"]\n\
             schema = {{ proto = [\"{}\"] }}\nmax_message_bytes = \"4MiB\"\ntimeout = \"60s\"\n",
            up.url(Proto::H2c),
            proto.display()
        ),
    )
    .replace(
        "drain_timeout = \"10s\"\n",
        "drain_timeout = \"10s\"\nmemory_budget = \"48MiB\"\n",
    )
    .replace(
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\n",
        "name = \"internal\"\nbind = \"127.0.0.1:0\"\nconnection_memory_budget = \"12MiB\"\n",
    );
    assert!(cfg.contains("memory_budget = \"48MiB\"") && cfg.contains("connection_memory_budget"));
    let fp = Fedport::start(&cfg);
    let port = fp.port("internal");
    let idle = crate::support::status_kib(fp.pid(), "VmRSS");
    let held = "fedport_memory_held_bytes";

    // alice on 4 connections (64 MiB asked, more than her share), and five other
    // identities on one each (16 MiB asked each): 144 MiB asked in all, three times the
    // node's budget
    let attack = |who: &IssuedFiles, conns: &str| {
        let size = size.to_string();
        let args = [
            "--conns",
            conns,
            "--streams",
            "8",
            "--size",
            &size,
            "--seconds",
            "6",
        ];
        PyClient::new(&pki, "h2_hold.py", port, who, &args).spawn()
    };
    // alice first, until she holds some of her share: otherwise the five others can
    // fill the node's budget before any of her streams arrive, and whether she is held
    // to her share is not tried at all
    let alice = attack(&pki.client, "4");
    wait_until("alice held", Duration::from_secs(30), || {
        fp.metric(held) >= (share as f64) * 0.5
    });
    let others: Vec<_> = (0..5)
        .map(|i| attack(&pki.client_cert(&format!("holder-{i}")), "1"))
        .collect();
    let mut most = 0.0f64;
    wait_until("the budget filled", Duration::from_secs(30), || {
        let h = fp.metric(held);
        most = most.max(h);
        h >= (budget as f64) * 0.5
    });
    std::thread::sleep(Duration::from_secs(1));
    most = most.max(fp.metric(held));
    assert!(most <= budget as f64, "held {most} of a {budget} budget");

    // a caller of another identity is served meanwhile: its message arrives whole, so
    // nothing of it is held
    let bob = pki.client_cert("bob");
    let before = up.hits();
    let r = say_as(&pki, port, &bob);
    assert_eq!(r["status"], 200, "{r}");
    assert!(r["headers"]["fed-refused"].is_null(), "{r}");
    assert_eq!(up.hits(), before + 1);

    let a = alice.join().unwrap();
    let others: Vec<_> = others.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("alice {a}; others {others:?}; held at most {most} bytes");
    // alice holds no more than her share, however many connections she opens
    assert!(
        a["held"].as_u64().unwrap() > 0,
        "calls within it were held: {a}"
    );
    assert!(
        a["held"].as_u64().unwrap() <= share / size,
        "alice held {a} with a share of {share} bytes"
    );
    let refused: u64 = std::iter::once(&a)
        .chain(&others)
        .map(|v| v["answered"]["8"].as_u64().unwrap_or(0))
        .sum();
    assert!(refused > 0, "calls past the budgets were refused");
    let held_all: u64 = std::iter::once(&a)
        .chain(&others)
        .map(|v| v["held"].as_u64().unwrap())
        .sum();
    assert!(held_all <= budget / size, "{held_all} held calls in all");
    wait_until("refusals counted", Duration::from_secs(3), || {
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="memory"}"#)
            >= refused as f64
    });
    let peak = fp.peak_rss_kib();
    eprintln!("RSS idle {idle} KiB, peak {peak} KiB");
    // the budget, and what the codec's windows and TLS buffers may add on top
    assert!(
        peak <= idle + (budget >> 10) + (24 << 10),
        "peak RSS {peak} KiB over idle {idle} KiB + a {} KiB budget",
        budget >> 10
    );
    wait_until("all given back", Duration::from_secs(10), || {
        fp.metric(held) == 0.0
    });
}

/// A caller sending a stream of small gzip bombs (a few KiB each, each inflating to a
/// valid 4 MiB message) does not hold the worker: inflation goes 256 KiB a turn and
/// takes at most half of the worker's time, so another caller on the same (only)
/// worker is served meanwhile.
#[test]
fn a_stream_of_gzip_bombs_does_not_hold_the_worker() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let proto =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proto/test.proto");
    let fp = Fedport::start(&one_worker(node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"echo\"\nprotocol = \"grpc\"\nendpoints = [\"{0}\"]\n\
             schema = {{ proto = [\"{1}\"] }}\nmax_message_bytes = \"8MiB\"\ntimeout = \"60s\"\n\
             [[service]]\nname = \"other\"\nprotocol = \"http\"\nendpoints = [\"{0}\"]\n",
            up.url(Proto::H2c),
            proto.display()
        ),
    )));
    let port = fp.port("internal");
    let attacker = PyClient::new(
        &pki,
        "h2_hold.py",
        port,
        &pki.client,
        &[
            "--bombs",
            "--path",
            "/test.Echo/Chat",
            "--size",
            &(4 << 20).to_string(),
            "--seconds",
            "6",
        ],
    )
    .spawn();
    std::thread::sleep(Duration::from_millis(1000));
    // the bombs are being inflated now: fedport's CPU over the next seconds, and
    // another caller's calls meanwhile
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", fp.pid())).unwrap();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let (t0, c0) = (std::time::Instant::now(), ticks());
    let c = pki.curl_client();
    let url = format!("https://localhost:{port}/x");
    let mut served = 0;
    for _ in 0..10 {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        a.extend(["--max-time", "2", "-H", "fed-service: other", &url]);
        if curl(&a).0 == 200 {
            served += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let hz = 100.0; // USER_HZ
    let share = (ticks() - c0) as f64 / hz / t0.elapsed().as_secs_f64();
    let v = attacker.join().unwrap();
    eprintln!("{v}");
    assert!(v["bombs_sent"].as_u64().unwrap() > 20, "{v}");
    assert_eq!(
        served, 10,
        "every call of the other caller was served while bombs inflated"
    );
    // inflation takes at most half of the worker; the rest of the work (TLS, the
    // codec, sending the bombs on) stays well under the other half
    eprintln!(
        "fedport used {:.0}% of a core while the bombs came",
        share * 100.0
    );
    assert!(
        share < 0.85,
        "inflation held the worker: {:.0}% of a core",
        share * 100.0
    );
}
