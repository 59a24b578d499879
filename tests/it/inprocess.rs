//! A node run in-process through `fedport::server::run`, on a socket the test bound to
//! port 0 itself (mini-redis's shape): it serves real mTLS requests on that socket while
//! it runs, and once its shutdown future completes it drains, returns, and the socket
//! is closed.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, Pki};
use std::collections::HashMap;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_held_in_process_serves_on_the_socket_it_was_given_and_stops() {
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
