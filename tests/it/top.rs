//! `fedport top` in a real terminal (tmux) against a node under bounded load: the
//! service rows show live rates, the peer rows their state, and `q` quits.

use crate::support::upstream::{self, Proto};
use crate::support::{node_config, Fedport, Pki};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::process::Command;
use std::time::Duration;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Session(String);
impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_live_service_rows_and_quits_on_q() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"inventory\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
             [[peer]]\nname = \"far-away\"\nregion = \"r\"\naddress = \"127.0.0.1:1\"\n\
             identity = \"spiffe://fed.test/node/far-away\"\nservices = [\"inventory\"]\n",
            up.url(Proto::H2c)
        ),
    ));
    // bounded load: 50 requests a second for at most 8 s
    let mut s = crate::support::h2_connect::<Full<Bytes>>(&pki, fp.addr("internal")).await;
    let port = fp.port("internal");
    let load = tokio::spawn(async move {
        for _ in 0..400 {
            let req = http::Request::get(format!("https://localhost:{port}/v1/items"))
                .header("fed-service", "inventory")
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(r) = s.send_request(req).await {
                let _ = r.into_body().collect().await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let name = format!("fedport-top-{}", std::process::id());
    let session = Session(name.clone());
    let cmd = format!(
        "{} top --admin {} --interval-ms 500",
        crate::support::bin(),
        fp.admin.unwrap()
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &name,
        "-x",
        "120",
        "-y",
        "30",
        &cmd,
    ]);
    let mut screen = String::new();
    let rate_shown = |screen: &str| {
        screen.lines().any(|l| {
            let cols: Vec<&str> = l.trim_matches('│').split_whitespace().collect();
            cols.first() == Some(&"inventory")
                && cols
                    .get(1)
                    .and_then(|r| r.parse::<f64>().ok())
                    .is_some_and(|r| r > 5.0)
        })
    };
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        screen = tmux(&["capture-pane", "-p", "-t", &name]);
        if rate_shown(&screen) {
            break;
        }
    }
    assert!(rate_shown(&screen), "a live inventory row:\n{screen}");
    assert!(
        screen.contains("SERVICE") && screen.contains("P99"),
        "{screen}"
    );
    assert!(screen.contains("far-away"), "the peer row:\n{screen}");
    assert!(screen.contains("q quits"), "{screen}");
    tmux(&["send-keys", "-t", &name, "q"]);
    let mut gone = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !Command::new("tmux")
            .args(["has-session", "-t", &name])
            .output()
            .unwrap()
            .status
            .success()
        {
            gone = true;
            break;
        }
    }
    assert!(gone, "q quits");
    load.abort();
    drop(session);
}
