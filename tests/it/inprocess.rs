//! A node run in-process through `fedport::server::run`, on a socket the test bound to
//! port 0 itself (mini-redis's shape): it serves real mTLS requests on that socket while
//! it runs, and once its shutdown future completes it drains, returns, and the socket
//! is closed. And a node whose worker runs on the test's own runtime
//! (`fedport::server::run_here`), on tokio's paused clock: its timers fire as soon as
//! everything waits on them, without the test sleeping.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, Pki};
use std::collections::HashMap;
use std::sync::Arc;

/// A node's configuration with one service `svc` on a service of the test's.
fn svc_node() -> (Pki, upstream::Upstream, fedport::config::Config) {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let text = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"svc\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    );
    let path = pki.path().join("fedport.toml");
    std::fs::write(&path, &text).unwrap();
    let (cfg, _) = fedport::config::compile(&path, &text).unwrap();
    (pki, up, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_held_in_process_serves_on_the_socket_it_was_given_and_stops() {
    let (pki, up, cfg) = svc_node();
    // bound by the test, not by the node: port 0, known before the node starts
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let metrics = fedport::telemetry::Metrics::new("test-a", "h");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(fedport::server::run(
        Arc::new(cfg),
        metrics,
        HashMap::from([("internal".to_owned(), socket)]),
        async {
            let _ = stopped.await;
        },
    ));

    let c = pki.curl_client();
    let url = format!("https://localhost:{port}/hello");
    let get = || {
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        a.extend(["-H", "fed-service: svc", url.as_str()]);
        curl(&a)
    };
    let before = up.hits();
    let (status, body, rc) = tokio::task::block_in_place(get);
    assert_eq!((status, rc), (200, 0), "{body}");
    assert_eq!(up.hits(), before + 1, "the service answered it");

    stop.send(()).unwrap();
    let ran = tokio::time::timeout(std::time::Duration::from_secs(20), node)
        .await
        .expect("the node drains and returns")
        .unwrap();
    assert!(ran.is_ok(), "{ran:?}");
    let refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    assert!(refused, "the socket is closed once the node has stopped");
}

/// A node whose worker runs on the test's runtime (`server::run_here`) with tokio's
/// clock paused: a call to a service that never answers is refused at the service's
/// five-minute deadline (504), another at the one-minute stream idle timeout (408), each
/// with a JSON reason, counted, as soon as everything is waiting on that timer; the test
/// sleeps neither. The service is a
/// real h2c server on loopback that takes the request and never answers.
#[tokio::test(start_paused = true)]
async fn a_five_minute_deadline_passes_on_the_paused_clock() {
    use http_body_util::{BodyExt, Empty};
    let pki = Pki::new();
    // the service: takes each request and never answers it
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = taken.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = up.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::future::pending::<
                        Result<http::Response<Empty<bytes::Bytes>>, std::io::Error>,
                    >()
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    let text = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"slow\"\nprotocol = \"http\"\nendpoints = [\"h2c://{up_addr}\"]\n\
             timeout = \"300s\"\nstream_idle_timeout = \"600s\"\n\n\
             [[service]]\nname = \"idle\"\nprotocol = \"http\"\nendpoints = [\"h2c://{up_addr}\"]\n\
             timeout = \"300s\"\n"
        ),
    )
    .replace("workers = 2\n", "workers = 1\n");
    let path = pki.path().join("fedport.toml");
    std::fs::write(&path, &text).unwrap();
    let (cfg, _) = fedport::config::compile(&path, &text).unwrap();
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let metrics = fedport::telemetry::Metrics::new("test-a", "h");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(fedport::server::run_here(
        Arc::new(cfg),
        metrics.clone(),
        HashMap::from([("internal".to_owned(), socket)]),
        async {
            let _ = stopped.await;
        },
    ));

    let mut client = crate::support::h2_connect::<Empty<bytes::Bytes>>(&pki, addr).await;
    let mut call = async |service: &str| {
        let start = tokio::time::Instant::now();
        let req = http::Request::get(format!("https://localhost:{}/wait", addr.port()))
            .header("fed-service", service)
            .body(Empty::new())
            .unwrap();
        let res = client.send_request(req).await.unwrap();
        let waited = start.elapsed();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (status, body, waited)
    };
    let secs = std::time::Duration::from_secs;
    // the service's deadline (its stream idle timeout is longer)
    let (status, body, waited) = call("slow").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["reason"], "deadline", "{body}");
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the service took it"
    );
    // on the paused clock: at the deadline, not a moment before it
    assert!(
        waited >= secs(300) && waited < secs(301),
        "after {waited:?}"
    );
    // the default stream idle timeout (60 s), shorter than this service's deadline
    let (status, body, waited) = call("idle").await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["reason"], "stream_idle_timeout", "{body}");
    assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(waited >= secs(60) && waited < secs(61), "after {waited:?}");
    let refused = |reason: &str| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        text.lines().any(|l| {
            l.starts_with("fedport_rejections_total{")
                && l.contains(&format!("reason=\"{reason}\""))
                && l.ends_with(" 1")
        })
    };
    assert!(
        refused("deadline") && refused("stream_idle_timeout"),
        "counted by reason"
    );

    stop.send(()).unwrap();
    node.await.unwrap().unwrap();
}

/// A node accepts nothing until it is open (`Server::open`, once it is ready): a
/// connection that arrives before waits in the socket's queue. A node that stops
/// without opening (a new binary of an upgrade that fails before it is ready) takes
/// no connection with it: the one queued is still there for whoever else holds the
/// socket (the old process), and is answered by it.
#[test]
fn a_node_accepts_nothing_before_it_is_open_and_a_queued_connection_outlives_it() {
    use std::io::{Read, Write};
    let (_pki, _up, cfg) = svc_node();
    let cfg = Arc::new(cfg);
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    // the other holder of the socket (as the old process of an upgrade is)
    let other = socket.try_clone().unwrap();
    let start = |s: std::net::TcpListener| {
        fedport::server::Server::start_with(
            cfg.clone(),
            fedport::telemetry::Metrics::new("test-a", "h"),
            HashMap::from([("local".to_owned(), s)]),
        )
        .unwrap()
    };

    let failing = start(socket);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .write_all(b"GET /q HTTP/1.1\r\nhost: x\r\nfed-service: svc\r\nconnection: close\r\n\r\n")
        .unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_millis(800)))
        .unwrap();
    let mut buf = [0u8; 64];
    let early = client.read(&mut buf);
    assert!(
        early.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "not accepted (nor answered, nor reset) before the node is open: {early:?}"
    );
    assert!(!failing.state.is_ready());
    // it stops without ever opening
    failing.drain();
    failing.join();

    let serving = start(other);
    serving.open();
    assert!(serving.state.is_ready());
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "the queued connection was answered by the node that holds the socket still: {:?}",
        String::from_utf8_lossy(&answer)
    );
    serving.drain();
    serving.join();
}
