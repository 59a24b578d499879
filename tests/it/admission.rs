//! Who may connect at all: the allowlist closes foreign addresses before any TLS byte,
//! counted and logged once per source; the connection limit; TLS versions and suites
//! as openssl sees them; and `fed-origin`/`fed-hops` believed only from peer nodes.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, free_port, Fedport, Pki};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{src}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&to.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// True when the server closed the connection without sending a byte.
fn closed_silently(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn one_listener(pki: &Pki, listener_extra: &str, up: &upstream::Upstream) -> Fedport {
    Fedport::start(&listener_config(pki, listener_extra, up, ""))
}

fn listener_config(
    pki: &Pki,
    listener_extra: &str,
    up: &upstream::Upstream,
    service_extra: &str,
) -> String {
    format!(
        "[node]\nname = \"gate\"\nregion = \"r\"\nworkers = 2\naccess_log = true\n{}\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n{service_extra}\n\
         [[allow]]\nfrom = \"*\"\nto = \"*\"\n",
        pki.tls_section(),
        up.url(Proto::H2c)
    )
}

#[test]
fn a_foreign_address_is_closed_before_any_tls_byte_counted_and_logged_once() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_listener(&pki, "allow = [\"127.0.0.1/32\"]", &up);
    let addr = fp.addr("internal");
    for _ in 0..5 {
        assert!(
            closed_silently(connect_from("127.0.0.2", addr)),
            "127.0.0.2 must be closed at accept"
        );
    }
    // curl from the foreign address fails; from the allowed one it gets through
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/x", addr.port());
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend(["-H", "fed-service: up", &url]);
    let mut foreign = a.clone();
    foreign.extend(["--interface", "127.0.0.2"]);
    assert_eq!(curl(&foreign).0, 0);
    assert_eq!(curl(&a).0, 200);
    assert_eq!(up.hits(), 1);
    crate::support::wait_until("address rejections", Duration::from_secs(5), || {
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="address"}"#) == 6.0
    });
    assert_eq!(
        fp.metric(
            r#"fedport_tls_handshake_failures_total{listener="internal",reason="no_client_cert"}"#
        ),
        0.0,
        "no TLS work was done"
    );
    let log = fp.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("address not allowed") && l.contains("127.0.0.2"))
        .count();
    // one line per source per worker that saw it (each worker keeps its own interval)
    assert!(
        (1..=2).contains(&lines),
        "a scan must not flood the log: {lines} lines\n{log}"
    );
}

#[test]
fn connections_past_the_listener_limit_are_closed() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_listener(&pki, "max_connections = 2", &up);
    let addr = fp.addr("internal");
    let held: Vec<TcpStream> = (0..2).map(|_| connect_from("127.0.0.1", addr)).collect();
    crate::support::wait_until("two open connections", Duration::from_secs(5), || {
        fp.metric(r#"fedport_connections_active{listener="internal"}"#) == 2.0
    });
    assert!(
        closed_silently(connect_from("127.0.0.1", addr)),
        "the third connection is closed"
    );
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="max_connections"}"#),
        1.0
    );
    drop(held);
    crate::support::wait_until("connections released", Duration::from_secs(5), || {
        fp.metric(r#"fedport_connections_active{listener="internal"}"#) == 0.0
    });
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/x", addr.port());
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    a.extend(["-H", "fed-service: up", &url]);
    assert_eq!(curl(&a).0, 200, "room again once they close");
}

/// A burst of connections, accepted in one turn of the accept loop, cannot pass the
/// limit together: at most `max_connections` stay open.
#[test]
fn a_burst_of_connections_does_not_pass_the_listener_limit() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_listener(&pki, "max_connections = 5", &up);
    let addr = fp.addr("internal");
    let burst: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    crate::support::wait_until("the burst judged", Duration::from_secs(10), || {
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="max_connections"}"#)
            >= 295.0
    });
    let open = burst
        .into_iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 1];
            matches!((&*s).read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut)
        })
        .count();
    assert!(open <= 5, "{open} connections held open past a limit of 5");
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="max_connections"}"#),
        295.0
    );
}

/// Runs `openssl s_client` with the test client certificate and extra flags; returns
/// whether a session was established, and what it printed.
fn s_client(pki: &Pki, addr: SocketAddr, flags: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .arg("-CAfile")
        .arg(&pki.ca)
        .arg("-cert")
        .arg(&pki.client.cert)
        .arg("-key")
        .arg(&pki.client.key)
        .args(flags)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = text.contains("Verify return code: 0") && !text.contains("Cipher is (NONE)");
    (ok, text)
}

#[test]
fn only_tls13_by_default_and_only_aead_suites_when_tls12_is_allowed() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_listener(&pki, "", &up);
    let addr = fp.addr("internal");
    let (ok, text) = s_client(&pki, addr, &["-tls1_3"]);
    assert!(ok && text.contains("TLSv1.3"), "{text}");
    for v in ["-tls1_2", "-tls1_1", "-tls1"] {
        let (ok, text) = s_client(&pki, addr, &[v]);
        assert!(!ok, "{v} must be refused by default:\n{text}");
    }

    let pki12 = Pki::new();
    let section = pki12.tls_section() + "min_version = \"1.2\"\n";
    let fp12 = Fedport::start(&format!(
        "[node]\nname = \"gate\"\nregion = \"r\"\n{section}\n[[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
        up.url(Proto::H2c)
    ));
    let addr = fp12.addr("internal");
    let (ok, text) = s_client(
        &pki12,
        addr,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    );
    assert!(
        ok && text.contains("TLSv1.2"),
        "TLS 1.2 with an AEAD suite is allowed when configured:\n{text}"
    );
    for cipher in [
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-ECDSA-AES256-SHA384",
        "AES128-SHA",
    ] {
        let (ok, text) = s_client(&pki12, addr, &["-tls1_2", "-cipher", cipher]);
        assert!(!ok, "{cipher} (not AEAD) must be refused:\n{text}");
    }
    let (ok, _) = s_client(&pki12, addr, &["-tls1_1"]);
    assert!(!ok, "TLS 1.1 is never allowed");
}

#[test]
fn fed_origin_is_believed_only_from_peer_nodes() {
    let pki = Pki::new();
    let h1 = upstream::start(Proto::Http1);
    // B knows A as a peer node and lets A and the client alice reach its service
    let b = Fedport::start(&format!(
        "[node]\nname = \"b\"\nregion = \"r\"\nworkers = 1\n{}\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:0\"\nservice = \"plain\"\n\
         [[service]]\nname = \"plain\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
         [[peer]]\nname = \"a\"\nregion = \"r\"\naddress = \"127.0.0.1:1\"\nidentity = \"spiffe://fed.test/node/a\"\n\
         [[allow]]\nfrom = \"a\"\nto = \"plain\"\n\
         [[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"plain\"\n",
        pki.tls_section(),
        h1.url(Proto::Http1)
    ));
    let a = Fedport::start(&format!(
        "[node]\nname = \"a\"\nregion = \"r\"\nworkers = 1\n{}\n\
         [[listener]]\nname = \"local\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\n\
         [[service]]\nname = \"far\"\nprotocol = \"http\"\nendpoints = [\"https://localhost:{}\"]\n\
         [[allow]]\nfrom = \"local\"\nto = \"far\"\n",
        pki.tls_section(),
        b.port("internal")
    ));
    let forged = ["-H", "fed-origin: forged", "-H", "fed-hops: 7"];
    // through A: A sets its own origin, B believes A
    let url = format!("http://127.0.0.1:{}/o", a.port("local"));
    let mut args = vec!["-H", "fed-service: far"];
    args.extend(forged);
    args.push(&url);
    let (code, body, _) = curl(&args);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["headers"]["fed-origin"],
        serde_json::json!(["a"]),
        "{body}"
    );
    assert!(v["headers"].get("fed-hops").is_none(), "{body}");
    // straight to B as a client: the forged headers are replaced by B's own origin
    let c = pki.curl_client();
    let url = format!("https://localhost:{}/o", b.port("internal"));
    let mut args: Vec<&str> = c.iter().map(String::as_str).collect();
    args.extend(forged);
    args.push(&url);
    let (code, body, _) = curl(&args);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["headers"]["fed-origin"],
        serde_json::json!(["b"]),
        "{body}"
    );
    assert_eq!(
        v["headers"]["fed-peer"],
        serde_json::json!(["spiffe://fed.test/client/alice"])
    );
    assert!(v["headers"].get("fed-hops").is_none(), "{body}");
}

struct Haproxy {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}
impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy as an L4 balancer in front of `to`: one port sending PROXY v1, one v2.
fn haproxy_l4(to: SocketAddr) -> (Haproxy, u16, u16) {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (free_port(), free_port());
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  retries 0\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend v1\n\
             frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend v2\n\
             backend v1\n  server f {to} send-proxy\n\
             backend v2\n  server f {to} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .expect("haproxy is installed (scripts/install-test-deps.sh)");
    crate::support::wait_until("haproxy", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", v1)).is_ok()
            && TcpStream::connect(("127.0.0.1", v2)).is_ok()
    });
    (Haproxy { child, _dir: dir }, v1, v2)
}

#[test]
fn proxy_protocol_from_a_trusted_balancer_carries_the_client_address() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&listener_config(
        &pki,
        "allow = [\"127.0.0.2/32\"]\nproxy_protocol = { trusted = [\"127.0.0.1/32\"], timeout = \"500ms\" }",
        &up,
        "forwarded_headers = true",
    ));
    let addr = fp.addr("internal");
    let (_lb, v1, v2) = haproxy_l4(addr);
    let c = pki.curl_client();
    let via = |src: &str, port: u16, extra: &[&str]| {
        let url = format!("https://localhost:{port}/x");
        let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
        a.extend(["--interface", src, "-H", "fed-service: up"]);
        a.extend(extra);
        a.push(&url);
        curl(&a).0
    };
    // the allowlist applies to the address the header carries, for v1 and v2; the
    // service is told that address (not the balancer's, nor the caller's own claim)
    let forged = ["-H", "X-Forwarded-For: 6.6.6.6"];
    assert_eq!(via("127.0.0.2", v1, &forged), 200, "{}", fp.log_text());
    assert_eq!(via("127.0.0.2", v2, &forged), 200);
    assert_eq!(
        up.seen_header("x-forwarded-for"),
        ["127.0.0.2", "127.0.0.2"],
        "the PROXY-carried address"
    );
    assert_eq!(via("127.0.0.3", v1, &[]), 0);
    assert_eq!(via("127.0.0.3", v2, &[]), 0);
    assert_eq!(up.hits(), 2);
    // (curl or the balancer may try a refused connection again: at least one per call)
    assert!(fp.metric(r#"fedport_rejections_total{listener="internal",reason="address"}"#) >= 2.0);
    let log = fp.log_text();
    assert!(
        log.contains("remote=127.0.0.3"),
        "refusals name the carried address"
    );
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fedport::access"))
        .collect();
    assert_eq!(access.len(), 2, "{log}");
    assert!(
        access
            .iter()
            .all(|l| l.contains("remote=127.0.0.2:") && l.contains("status=200")),
        "the access log shows the carried address: {access:?}"
    );
    // the same header straight from an address that is not a balancer: refused
    assert_eq!(via("127.0.0.2", addr.port(), &["--haproxy-protocol"]), 0);
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="proxy_untrusted"}"#),
        1.0
    );
    // a trusted sender that sends no header in time is cut off; a malformed one too
    assert!(closed_silently(connect_from("127.0.0.1", addr)));
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="proxy_timeout"}"#),
        1.0
    );
    let mut s = connect_from("127.0.0.1", addr);
    std::io::Write::write_all(&mut s, b"PROXY TCP4 not-an-address\r\n").unwrap();
    assert!(closed_silently(s));
    crate::support::wait_until("malformed counted", Duration::from_secs(5), || {
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="proxy_malformed"}"#)
            == 1.0
    });
    assert_eq!(up.hits(), 2, "nothing refused reached the service");
}

#[tokio::test(flavor = "current_thread")]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = one_listener(&pki, "idle_timeout = \"400ms\"", &up);
    let mut client = crate::support::h2_connect(&pki, fp.addr("internal")).await;
    let port = fp.port("internal");
    // a request that outlasts the idle timeout is not cut off
    let req = http::Request::get(format!("https://localhost:{port}/x?ms=1200"))
        .header("fed-service", "up")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        !client.is_closed(),
        "busy for longer than the idle timeout, yet open"
    );
    // then nothing: the connection is closed
    let start = std::time::Instant::now();
    while !client.is_closed() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "an idle connection stays open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fp.metric(r#"fedport_rejections_total{listener="internal",reason="idle_timeout"}"#) >= 1.0
    );
}

/// An admin port on `[::]` is dual-stack: an IPv4 caller arrives as `::ffff:a.b.c.d`
/// and is judged by its IPv4 address — loopback is let in, like on `127.0.0.1`.
#[test]
fn an_admin_port_on_the_v6_wildcard_judges_ipv4_callers_by_their_address() {
    let pki = Pki::new();
    let config = crate::support::node_config(&pki, "").replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"[::]:0\"\nallow = [\"10.9.0.0/24\"]",
    );
    assert!(config.contains("[::]:0"), "{config}");
    let fp = Fedport::start(&config);
    let port = fp.admin.expect("admin").port();
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/healthz"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loopback over IPv4 refused: {:?}\n{}",
        out,
        fp.log_text()
    );
    assert_eq!(
        fp.metric(r#"fedport_rejections_total{listener="admin",reason="address"}"#),
        0.0
    );
}

/// A certificate whose only name is `local` carries no identity: `local` stands for
/// the local listener's callers in rules, and no certificate may take their grants.
#[test]
fn a_certificate_named_local_is_no_identity() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&crate::support::node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"local\"\nto = \"*\"\n",
    ));
    let local = pki
        .authority
        .issue(&fedport::identity::pki::LeafSpec {
            common_name: "local".into(),
            dns: vec!["local".into()],
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), "local-name")
        .unwrap();
    let (code, _, exit) =
        crate::support::curl_as(&pki, &local.cert, &local.key, fp.port("internal"));
    assert!(
        code != 200 && exit != 0,
        "refused in the handshake: {code} {exit}"
    );
    assert_eq!(up.hits(), 0);
    crate::support::wait_until("counted", Duration::from_secs(5), || {
        fp.metric(
            r#"fedport_tls_handshake_failures_total{listener="internal",reason="no_identity"}"#,
        ) >= 1.0
    });
}
