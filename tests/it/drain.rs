//! SIGTERM drains: readiness turns false, the port stops accepting, requests in flight
//! finish, and the process exits 0.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, wait_until, Fedport, Pki};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[test]
fn sigterm_lets_slow_requests_finish_refuses_new_connections_and_exits_zero() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let mut fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"slow\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    ));
    assert_eq!(fp.admin_get("/readyz").trim(), "ready");
    let url = format!("https://localhost:{}/x?ms=1500", fp.port("internal"));
    let c = pki.curl_client();
    let clients: Vec<_> = (0..5)
        .map(|_| {
            Command::new("curl")
                .args([
                    "-s",
                    "-S",
                    "--max-time",
                    "20",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    "fed-service: slow",
                ])
                .args(&c)
                .arg(&url)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until(
        "5 requests in flight upstream",
        Duration::from_secs(10),
        || up.inflight.load(Ordering::SeqCst) == 5,
    );

    fp.signal("TERM");
    let internal = fp.addr("internal");
    wait_until(
        "the peer port to refuse connections",
        Duration::from_secs(5),
        || std::net::TcpStream::connect_timeout(&internal, Duration::from_millis(200)).is_err(),
    );
    assert!(
        up.inflight.load(Ordering::SeqCst) > 0,
        "the slow requests are still running"
    );
    assert_eq!(
        fp.admin_get("/readyz").trim(),
        "not ready",
        "readiness is false while draining"
    );

    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "an in-flight request was cut off"
        );
    }
    let status = fp.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", fp.log_text());
    assert!(fp.log_text().contains("drained"));
}
