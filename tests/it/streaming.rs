//! Bodies and streams at scale: a 256 MiB body streams through in bounded memory,
//! 1,000 concurrent streams on a few connections all complete, and an upstream that
//! answers early and resets with NO_ERROR (nginx) neither loses the answer nor the
//! pooled connection; streams the caller resets or stalls leave nothing behind; an
//! answer the service cuts short of its declared length is never passed on as whole.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, Fedport, Pki};
use http_body_util::{BodyExt, Full};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

fn one_service(pki: &Pki, url: &str) -> Fedport {
    Fedport::start(&node_config(
        pki,
        &format!("[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{url}\"]\ntimeout = \"60s\"\n"),
    ))
}

#[test]
fn a_256_mib_body_streams_through_in_under_64_mib() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_service(&pki, &up.url(Proto::H2c));
    let before = fp.peak_rss_kib();
    let size: u64 = 256 << 20;
    let url = format!("https://localhost:{}/count", fp.port("internal"));
    let cmd = format!(
        "head -c {size} /dev/zero | curl -s -S --max-time 120 --cacert {} --cert {} --key {} -H 'fed-service: up' -T - {url}",
        pki.ca.display(),
        pki.client.cert.display(),
        pki.client.key.display()
    );
    let out = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["bytes"], size, "every byte arrived");
    let peak = fp.peak_rss_kib();
    eprintln!("fedport peak RSS: {before} KiB before, {peak} KiB after 256 MiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is over 64 MiB");
}

#[tokio::test(flavor = "current_thread")]
async fn a_thousand_concurrent_streams_on_four_connections_all_complete() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_service(&pki, &up.url(Proto::H2c));
    let mut senders = Vec::new();
    for _ in 0..4 {
        senders.push(crate::support::h2_connect(&pki, fp.addr("internal")).await);
    }
    let port = fp.port("internal");
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let mut s = senders[i % 4].clone();
        set.spawn(async move {
            let req = http::Request::get(format!("https://localhost:{port}/x?ms=300"))
                .header("fed-service", "up")
                .body(Full::new(bytes::Bytes::new()))
                .unwrap();
            let resp = s.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        let status = r.unwrap().unwrap();
        assert_eq!(status, 200);
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(up.hits(), 1000);
    let peak = up.peak.load(Ordering::SeqCst);
    eprintln!(
        "upstream saw {peak} requests at once over {} connections",
        up.conns.load(Ordering::SeqCst)
    );
    assert!(peak >= 500, "streams were not concurrent: peak {peak}");
}

/// Requests that end on the caller's side leave nothing behind: one reset while fedport
/// waits for the service, one whose body stalls past its deadline (a small body, which
/// fedport buffers so that it can be sent again) — 504, never sent on, and in both
/// cases the stream gauge is back to zero.
#[tokio::test(flavor = "current_thread")]
async fn callers_that_reset_or_stall_leave_no_stream_behind() {
    use http_body_util::channel::Channel;
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_service(&pki, &up.url(Proto::H2c));
    let port = fp.port("internal");
    let mut s =
        crate::support::h2_connect::<Channel<bytes::Bytes>>(&pki, fp.addr("internal")).await;
    let active = r#"fedport_streams_active{listener="internal"}"#;

    // reset by the caller after 300 ms of a 3 s answer
    let (tx, body) = Channel::new(1);
    drop(tx);
    let req = http::Request::get(format!("https://localhost:{port}/x"))
        .header("fed-service", "up")
        .header("x-sleep-ms", "3000")
        .body(body)
        .unwrap();
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), s.send_request(req));
    assert!(waited.await.is_err(), "the answer takes 3 s");
    crate::support::wait_until(
        "the reset stream is gone",
        std::time::Duration::from_secs(5),
        || fp.metric(active) == 0.0,
    );

    // 10 of 1,000 declared bytes, then nothing, with a 300 ms deadline
    let (mut tx, body) = Channel::new(1);
    let req = http::Request::post(format!("https://localhost:{port}/count"))
        .header("fed-service", "up")
        .header("content-length", "1000")
        .header("fed-timeout", "300")
        .body(body)
        .unwrap();
    tx.send_data(bytes::Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), s.send_request(req))
        .await
        .expect("answered within its deadline, not when the caller gives up")
        .unwrap();
    assert_eq!(resp.status(), 504);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["reason"], "deadline", "{v}");
    drop(tx);
    crate::support::wait_until(
        "the stalled stream is gone",
        std::time::Duration::from_secs(5),
        || fp.metric(active) == 0.0,
    );
    assert_eq!(up.hits(), 1, "only the reset request reached the service");
}

struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}
impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, so that the master takes its workers along (a killed master leaves
        // them running)
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// nginx as an h2c upstream that answers `/early` without reading the request body.
fn nginx_early() -> (Nginx, u16) {
    nginx_h2c(100_000)
}

/// nginx as an h2c upstream that closes each connection (GOAWAY) after `requests`.
fn nginx_h2c(requests: u32) -> (Nginx, u16) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let port = crate::support::free_port();
    let conf = format!(
        "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests {requests}; client_max_body_size 0;
  server {{
    listen 127.0.0.1:{port} http2;
    location /early {{ return 200 \"early-answer\\n\"; }}
    location / {{ return 200 \"ok\\n\"; }}
  }}
}}
"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args(["-c", &format!("{d}/nginx.conf"), "-p", &d.to_string()])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx is installed (scripts/install-test-deps.sh)");
    crate::support::wait_until("nginx", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (Nginx { child, _dir: dir }, port)
}

/// curl 7.88 itself reports nginx's RST_STREAM(NO_ERROR) after a complete answer as a
/// stream error (it does so without fedport too), so this test's client is hyper's,
/// which follows RFC 9113 §8.1 here.
#[tokio::test(flavor = "current_thread")]
async fn early_answer_with_no_error_reset_reaches_the_caller_and_keeps_the_connection() {
    let pki = Pki::new();
    let (_nginx, port) = nginx_early();
    let fp = one_service(&pki, &format!("h2c://127.0.0.1:{port}"));
    let mut client = crate::support::h2_connect(&pki, fp.addr("internal")).await;
    let body = bytes::Bytes::from(vec![b'x'; 4 << 20]);
    let fport = fp.port("internal");
    for round in 0..10 {
        for (path, payload, expect) in [
            ("/early", body.clone(), "early-answer\n"),
            ("/next", bytes::Bytes::new(), "ok\n"),
        ] {
            let req = http::Request::post(format!("https://localhost:{fport}{path}"))
                .header("fed-service", "up")
                .body(Full::new(payload))
                .unwrap();
            let resp = client
                .send_request(req)
                .await
                .unwrap_or_else(|e| panic!("round {round} {path}: {e}\n{}", fp.log_text()));
            assert_eq!(resp.status(), 200, "round {round} {path}");
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                text,
                expect.as_bytes(),
                "round {round} {path}: the answer arrives intact"
            );
        }
    }
    let connects = fp.metric(r#"fedport_upstream_connects_total{service="up",result="ok"}"#);
    // 2 workers x 2 connections at most; a connection lost per early answer would show 10+
    assert!(
        (1.0..=4.0).contains(&connects),
        "upstream connections made: {connects}"
    );
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="upstream_error"}"#),
        0.0
    );
}

/// An h2c service written with the `h2` crate: `/cut` answers 100 of 1,000 declared
/// bytes and, 200 ms later, resets the stream with NO_ERROR (which hyper reads as a
/// clean end);
/// anything else gets all 1,000 bytes, or the headers alone to HEAD.
fn cutting_upstream() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let head = req.method() == http::Method::HEAD;
                        let resp = http::Response::builder()
                            .status(200)
                            .header("content-length", "1000")
                            .body(())
                            .unwrap();
                        let Ok(mut send) = respond.send_response(resp, head) else {
                            continue;
                        };
                        if head {
                            continue;
                        }
                        if req.uri().path() == "/cut" {
                            let _ = send.send_data(bytes::Bytes::from(vec![b'a'; 100]), false);
                            // the head and the first bytes go out (the connection is
                            // polled meanwhile) before the reset does
                            tokio::spawn(async move {
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                                send.send_reset(h2::Reason::NO_ERROR);
                            });
                        } else {
                            let _ = send.send_data(bytes::Bytes::from(vec![b'a'; 1000]), true);
                        }
                    }
                });
            }
        });
    });
    port
}

/// curl through the node, with `extra` arguments: (status, body, curl's exit code).
fn curl_up(pki: &Pki, port: u16, path: &str, extra: &[&str]) -> (u16, String, i32) {
    let c = pki.curl_client();
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    let url = format!("https://localhost:{port}{path}");
    a.extend(["-H", "fed-service: up"]);
    a.extend(extra);
    a.push(&url);
    crate::support::curl(&a)
}

#[test]
fn an_answer_cut_short_of_its_length_is_not_passed_on_as_whole() {
    let pki = Pki::new();
    let up = cutting_upstream();
    let config = node_config(
        &pki,
        &format!("[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"h2c://127.0.0.1:{up}\"]\n"),
    )
    .replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\naccess_log = true",
    );
    let fp = Fedport::start_with(None, &config, &["--log-format", "json"]);
    let port = fp.port("internal");

    let (code, body, exit) = curl_up(&pki, port, "/whole", &[]);
    assert_eq!((code, body.len(), exit), (200, 1000, 0), "a whole answer");
    let (code, _, exit) = curl_up(&pki, port, "/whole", &["-I"]);
    assert_eq!(
        (code, exit),
        (200, 0),
        "HEAD: a length declared, no body owed"
    );

    // over HTTP/2 the caller's stream is reset; over HTTP/1.1 its connection closes
    // short of the length. Either way the caller cannot take the answer as whole.
    for proto in ["--http2", "--http1.1"] {
        let (_, body, exit) = curl_up(&pki, port, "/cut", &[proto]);
        assert_ne!(
            exit,
            0,
            "{proto}: curl saw a whole answer ({} bytes)\n{}",
            body.len(),
            fp.log_text()
        );
        assert!(body.len() < 1000, "{proto}: {} bytes", body.len());
    }
    let (code, body, exit) = curl_up(&pki, port, "/whole", &[]);
    assert_eq!(
        (code, body.len(), exit),
        (200, 1000, 0),
        "the next answer is whole"
    );

    crate::support::wait_until("access lines", std::time::Duration::from_secs(5), || {
        fp.log_text().matches("fedport::access").count() >= 5
    });
    let cut: Vec<serde_json::Value> = fp
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "fedport::access" && l["fields"]["path"] == "/cut")
        .collect();
    assert_eq!(cut.len(), 2, "{cut:?}");
    for l in &cut {
        assert_eq!(l["fields"]["reason"], "truncated", "{l}");
        assert_eq!(l["fields"]["bytes_out"], 100, "{l}");
    }
}

/// `fedport bench` against a server that ends each connection with GOAWAY after 50
/// requests (nginx's keepalive_requests): it connects again and goes on, in closed and
/// open loop, rather than spinning on (or sending to) the closed connection and
/// counting the rest of its budget as errors.
#[test]
fn bench_goes_on_when_the_server_closes_its_connection() {
    let (_nginx, port) = nginx_h2c(50);
    let url = format!("http://127.0.0.1:{port}/");
    for args in [["-m", "4"], ["--rate", "2000"]] {
        let out = Command::new(crate::support::bin())
            .args(["bench", &url, "-c", "1", "-n", "400", "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["requests"], 400, "{args:?}: {v}");
        let ok = v["outcomes"]["200"].as_u64().unwrap_or(0);
        // eight closes, each losing at most the requests in flight on it
        assert!(ok >= 300, "{args:?}: {v}");
        assert_eq!(v["errors"].as_u64().unwrap() + ok, 400, "{args:?}: {v}");
    }
}
