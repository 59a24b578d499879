//! TCP services with Debian's Redis: `redis-cli` on a node's local port and, over mTLS,
//! on its peer port reaches Redis through fedport; a caller no rule admits and a
//! stranger's certificate are refused; a large value passes intact; a half-close is
//! passed on; a stopped endpoint's new connections go to the next.

use crate::support::{free_port, node_config_with_rules, wait_until, Fedport, Pki};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A Redis server on a port of its own, stopped when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-test-deps.sh)");
        let r = Self { child, port };
        wait_until("redis up", Duration::from_secs(10), || {
            cli(&["-p", &port.to_string(), "PING"]) == "PONG"
        });
        r
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// redis-cli over TLS with a client certificate, to the node's TCP port.
fn cli_tls(
    pki: &Pki,
    who: &fedport::identity::pki::IssuedFiles,
    port: u16,
    args: &[&str],
) -> String {
    let (ca, c, k, p) = (
        pki.ca.display().to_string(),
        who.cert.display().to_string(),
        who.key.display().to_string(),
        port.to_string(),
    );
    let mut a = vec![
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &c,
        "--key",
        &k,
        "-h",
        "localhost",
        "-p",
        &p,
    ];
    a.extend(args);
    cli(&a)
}

fn config(pki: &Pki, endpoints: &[u16]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|p| format!("\"tcp://127.0.0.1:{p}\""))
        .collect();
    node_config_with_rules(
        pki,
        &format!(
            "[[service]]\nname = \"cache\"\nprotocol = \"tcp\"\nendpoints = [{}]\n\
             [[listener]]\nname = \"cache-local\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"cache\"\n\
             [[listener]]\nname = \"cache-tls\"\nbind = \"127.0.0.1:0\"\nservice = \"cache\"\n",
            eps.join(", ")
        ),
        "[[allow]]\nfrom = \"spiffe://fed.test/client/alice\"\nto = \"cache\"\n\
         [[allow]]\nfrom = \"local\"\nto = \"cache\"\n",
    )
}

#[test]
fn redis_is_reached_through_a_tcp_service_and_strangers_are_not() {
    let pki = Pki::new();
    let (r1, r2) = (Redis::start(), Redis::start());
    let fp = Fedport::start(&config(&pki, &[r1.port, r2.port]));
    let local = fp.port("cache-local").to_string();
    let tls = fp.port("cache-tls");

    // the node's own applications, in cleartext on loopback
    assert_eq!(cli(&["-p", &local, "SET", "greeting", "hello"]), "OK");
    let on = cli(&["-p", &local, "INFO", "server"]);
    let first: u16 = on
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(first == r1.port || first == r2.port);
    // alice over mTLS
    assert_eq!(cli_tls(&pki, &pki.client, tls, &["PING"]), "PONG");
    // bob has a certificate, but no rule: the connection is closed, counted and logged
    let bob = pki.client_cert("bob");
    assert_ne!(cli_tls(&pki, &bob, tls, &["PING"]), "PONG");
    wait_until("the denial counted", Duration::from_secs(3), || {
        fp.metric(r#"fedport_rejections_total{listener="cache-tls",reason="denied"}"#) >= 1.0
    });
    // a stranger's certificate fails the handshake
    assert_ne!(cli_tls(&pki, &pki.stranger, tls, &["PING"]), "PONG");
    assert!(
        fp.metric(
            r#"fedport_tls_handshake_failures_total{listener="cache-tls",reason="unknown_ca"}"#
        ) >= 1.0
    );

    // a 4 MiB value, in and out intact (by checksum)
    let value: String = (0..4 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let file = pki.path().join("big.txt");
    std::fs::write(&file, &value).unwrap();
    for p in [r1.port, r2.port] {
        // the same value on both, so that whichever endpoint is chosen has it
        let mut c = Command::new("redis-cli")
            .args(["-p", &p.to_string(), "-x", "SET", "big"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&c.stdout).trim(), "OK");
        c.stdout.clear();
    }
    let got = Command::new("redis-cli")
        .args(["-p", &local, "--raw", "GET", "big"])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&got.stdout);
    assert_eq!(got.trim_end().len(), value.len());
    assert!(got.trim_end() == value, "the value came back whole");
    let sent_in = fp.metric(
        r#"fedport_tcp_bytes_total{listener="cache-local",service="cache",direction="out"}"#,
    );
    assert!(sent_in > 4_000_000.0, "{sent_in}");

    // a half-close is passed on: the caller ends its side, and still reads the answer
    let py = format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {local})); s.sendall(b'PING\\r\\n'); \
         s.shutdown(socket.SHUT_WR); b = b''\nwhile True:\n    d = s.recv(100)\n    if not d: break\n    b += d\nprint(b.decode().strip())"
    );
    let out = Command::new("python3").args(["-c", &py]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "+PONG",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the endpoint in use stops: new connections go to the other
    let (gone, other) = if first == r1.port { (r1, r2) } else { (r2, r1) };
    drop(gone);
    let on = cli(&["-p", &local, "INFO", "server"]);
    assert!(on.contains(&format!("tcp_port:{}", other.port)), "{on}");
    assert!(
        fp.metric(r#"fedport_tcp_connections_total{listener="cache-local",service="cache"}"#)
            >= 5.0
    );
}

/// `check` refuses a rule that names methods for a TCP service, a tcp:// endpoint of an
/// HTTP service and an http:// one of a TCP service; a TCP service with endpoints and
/// no listener (reached by peers' CONNECT streams) is no fault.
#[test]
fn check_refuses_tcp_services_written_as_http_ones() {
    let pki = Pki::new();
    let cases = [
        (
            "[[service]]\nname = \"db\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:5432\"]\n\
             [[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nservice = \"db\"\n\
             [[allow]]\nfrom = \"*\"\nto = \"db\"\nmethods = [\"GET /\"]\n",
            "a rule for TCP service \"db\" names methods",
        ),
        (
            "[[service]]\nname = \"web\"\nprotocol = \"http\"\nendpoints = [\"tcp://127.0.0.1:80\"]\n",
            "is tcp://, but service \"web\" is not protocol = \"tcp\"",
        ),
        (
            "[[service]]\nname = \"db\"\nprotocol = \"tcp\"\nendpoints = [\"http://127.0.0.1:5432\"]\n",
            "has endpoint http://127.0.0.1:5432, which is not tcp://",
        ),
        (
            "[[service]]\nname = \"db\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1\"]\n",
            "has no port",
        ),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let path = pki.path().join(format!("tcp-{i}.toml"));
        std::fs::write(&path, node_config_with_rules(&pki, extra, "")).unwrap();
        let (code, err) = crate::support::check(&path);
        assert_eq!(code, Some(1), "case {i}: {err}");
        assert!(err.contains(want), "case {i}: {err}");
        assert!(err.contains(&format!("tcp-{i}.toml:")), "{err}");
    }
    let path = pki.path().join("tcp-alone.toml");
    std::fs::write(
        &path,
        node_config_with_rules(
            &pki,
            "[[service]]\nname = \"mq\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:5672\"]\n",
            "[[allow]]\nfrom = \"*\"\nto = \"mq\"\n",
        ),
    )
    .unwrap();
    let (code, err) = crate::support::check(&path);
    assert_eq!(code, Some(0), "{err}");
    // with endpoints and no listener, peers reach it by CONNECT: nothing to say
    assert!(!err.contains("mq"), "{err}");
    // a rule to every service opens the TCP services too: said; a TCP listener whose
    // idle timeout is 0 would cut every connection: refused
    std::fs::write(
        &path,
        node_config_with_rules(
            &pki,
            "[[service]]\nname = \"db\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:5432\"]\n\
             [[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nservice = \"db\"\nidle_timeout = \"0s\"\n",
            "[[allow]]\nfrom = \"spiffe://fed.test/client/*\"\nto = \"*\"\n",
        ),
    )
    .unwrap();
    let (code, err) = crate::support::check(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("grants every service, the TCP services' connections included"),
        "{err}"
    );
    assert!(err.contains("must be more than 0"), "{err}");
}

/// What a splice holds counts against the memory budgets: with a node budget of
/// 256 KiB, the local identity's share (a quarter) holds one connection, and a second
/// at the same time is closed and counted as `memory`.
#[test]
fn a_spliced_connection_counts_against_the_memory_budget() {
    let pki = Pki::new();
    let eof = crate::support::PyServer::start("tcp_peer.py", &["eof-echo"]);
    let fp = Fedport::start(
        &node_config_with_rules(
            &pki,
            &format!(
                "[[service]]\nname = \"eof\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:{}\"]\n\
                 [[listener]]\nname = \"eof\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"eof\"\n",
                eof.port
            ),
            "[[allow]]\nfrom = \"local\"\nto = \"eof\"\n",
        )
        .replace("[node]\n", "[node]\nmemory_budget = \"256KiB\"\n"),
    );
    let port = fp.port("eof");
    let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until("the first spliced", Duration::from_secs(5), || {
        fp.metric(r#"fedport_tcp_connections_open{listener="eof",service="eof"}"#) == 1.0
    });
    let mut second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut second, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the second connection is closed");
    wait_until("counted as memory", Duration::from_secs(3), || {
        fp.metric(r#"fedport_rejections_total{listener="eof",reason="memory"}"#) >= 1.0
    });
    drop(held);
    // once the first is gone, a connection is spliced again
    wait_until("the first let go", Duration::from_secs(5), || {
        fp.metric(r#"fedport_tcp_connections_open{listener="eof",service="eof"}"#) == 0.0
    });
    let _again = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    wait_until("spliced again", Duration::from_secs(5), || {
        fp.metric(r#"fedport_tcp_connections_total{listener="eof",service="eof"}"#) >= 2.0
    });
}

fn python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sends 100,000 bytes to `port`, then half-closes: what the service answered after
/// reading to the end (tests/py/tcp_peer.py eof-echo says "got N").
fn half_close(port: u16) -> String {
    python(&format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {port})); s.sendall(b'x' * 100000); \
         s.shutdown(socket.SHUT_WR); s.settimeout(10); b = b''\nwhile True:\n    d = s.recv(100)\n    if not d: break\n    b += d\nprint(b.decode())"
    ))
}

/// Sends a few bytes to `port` and reads: `reset`, `closed` or `data`.
fn reset_seen(port: u16) -> String {
    python(&format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {port})); s.sendall(b'hello'); s.settimeout(10)\n\
         try:\n    d = s.recv(100)\n    print('closed' if not d else 'data')\nexcept ConnectionResetError:\n    print('reset')"
    ))
}

/// redis-cli on a node's local port: the Redis port that answered (`INFO server`).
fn redis_port_behind(local: u16) -> u16 {
    let on = cli(&["-p", &local.to_string(), "INFO", "server"]);
    on.lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Redis answered: {on:?}"))
}

/// A half-close reaches the service (it answers only once it has read to the end); a
/// service's reset reaches the caller as a reset; HTTP on another listener cannot call
/// a TCP service.
#[test]
fn half_close_and_reset_pass_through_and_http_cannot_call_a_tcp_service() {
    let pki = Pki::new();
    let (eof, reset) = (
        crate::support::PyServer::start("tcp_peer.py", &["eof-echo"]),
        crate::support::PyServer::start("tcp_peer.py", &["reset"]),
    );
    let fp = Fedport::start(&node_config_with_rules(
        &pki,
        &format!(
            "[[service]]\nname = \"eof\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:{}\"]\n\
             [[service]]\nname = \"rst\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:{}\"]\n\
             [[listener]]\nname = \"eof\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"eof\"\n\
             [[listener]]\nname = \"rst\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"rst\"\n",
            eof.port, reset.port
        ),
        "[[allow]]\nfrom = \"*\"\nto = \"*\"\n",
    ));
    assert_eq!(half_close(fp.port("eof")), "got 100000");
    assert_eq!(reset_seen(fp.port("rst")), "reset");
    // the TCP service's name on an HTTP listener routes nowhere
    let c = pki.curl_client();
    let mut a: Vec<&str> = c.iter().map(String::as_str).collect();
    let url = format!("https://localhost:{}/x", fp.port("internal"));
    a.extend(["-H", "fed-service: eof", &url]);
    assert_eq!(crate::support::curl(&a).0, 404);
}

/// A TCP service with no endpoint on node a is carried to the peers that offer it, as
/// HTTP/2 CONNECT streams on the peer connections: `redis-cli` on a's local port
/// reaches Redis on b (the nearer), a large value passes intact, a half-close and a
/// reset pass through the tunnel; with b's Redis stopped, new connections go to c. A
/// caller that is not a peer node may not CONNECT.
#[test]
fn a_tcp_service_is_carried_to_a_peer_and_fails_over_to_another() {
    use crate::federation::{node_config, peer};
    let pki = Pki::new();
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let (rb, rc) = (Redis::start(), Redis::start());
    let (eof, reset) = (
        crate::support::PyServer::start("tcp_peer.py", &["eof-echo"]),
        crate::support::PyServer::start("tcp_peer.py", &["reset"]),
    );
    let tcp = |name: &str, endpoint: Option<u16>, local: bool| {
        let ep = endpoint.map_or(String::new(), |p| format!("\"tcp://127.0.0.1:{p}\""));
        let mut s =
            format!("[[service]]\nname = \"{name}\"\nprotocol = \"tcp\"\nendpoints = [{ep}]\n");
        if local {
            s += &format!(
                "[[listener]]\nname = \"{name}\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"{name}\"\n"
            );
        }
        s
    };
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}{}{}{}",
            tcp("cache", None, true),
            tcp("eof", None, true),
            tcp("rst", None, true),
            peer("b", "eu-1", pb, &["cache", "eof", "rst"]),
            peer("c", "us-1", pc, &["cache"]),
        ),
    ));
    let b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}{}{}",
            tcp("cache", Some(rb.port), false),
            tcp("eof", Some(eof.port), false),
            tcp("rst", Some(reset.port), false),
            peer("a", "eu-1", pa, &[]),
        ),
    ));
    let c = Fedport::start(&node_config(
        &pki,
        "c",
        "us-1",
        pc,
        &format!(
            "{}{}",
            tcp("cache", Some(rc.port), false),
            peer("a", "eu-1", pa, &[])
        ),
    ));
    wait_until("peers up", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
            && a.metric(r#"fedport_peer_up{peer="c"}"#) == 1.0
    });
    let local = a.port("cache");
    assert_eq!(cli(&["-p", &local.to_string(), "PING"]), "PONG");
    assert_eq!(
        redis_port_behind(local),
        rb.port,
        "b is in a's region: it comes first"
    );
    assert!(
        b.metric(r#"fedport_tcp_connections_total{listener="internal",service="cache"}"#) >= 2.0,
        "b spliced the CONNECT streams that came over its peer listener"
    );

    // a 4 MiB value, through the tunnel and back, intact
    let value: String = (0..4 << 20)
        .map(|i| (b'a' + (i % 23) as u8) as char)
        .collect();
    let file = pki.path().join("big.txt");
    std::fs::write(&file, &value).unwrap();
    let set = Command::new("redis-cli")
        .args(["-p", &local.to_string(), "-x", "SET", "big"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK");
    assert_eq!(
        cli(&["-p", &rb.port.to_string(), "STRLEN", "big"]),
        value.len().to_string(),
        "b's Redis holds it whole"
    );
    let got = Command::new("redis-cli")
        .args(["-p", &local.to_string(), "--raw", "GET", "big"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&got.stdout).trim_end() == value,
        "the value came back whole"
    );

    // a half-close and a reset, each way across the tunnel
    assert_eq!(half_close(a.port("eof")), "got 100000");
    assert_eq!(reset_seen(a.port("rst")), "reset");

    // a caller that is not a peer node may not CONNECT (refused, nothing spliced)
    let case = serde_json::json!([{
        "proto": "h2", "method": "CONNECT", "authority": "cache",
        "headers": [["fed-service", "cache"]], "path": "",
    }]);
    let cases = pki.path().join("connect.json");
    std::fs::write(&cases, case.to_string()).unwrap();
    let cases = cases.display().to_string();
    let before = b.metric(r#"fedport_tcp_connections_total{listener="internal",service="cache"}"#);
    let v =
        crate::support::PyClient::new(&pki, "raw_request.py", pb, &pki.client, &[&cases]).json();
    assert_eq!(v["status"], 400, "{v}");
    assert!(v["body"].as_str().unwrap().contains("bad_request"), "{v}");
    assert_eq!(
        b.metric(r#"fedport_tcp_connections_total{listener="internal",service="cache"}"#),
        before
    );

    // b's Redis stops: b refuses the next connection as no_healthy_target, and a
    // sends it to c
    drop(rb);
    assert_eq!(redis_port_behind(local), rc.port, "failed over to c");
    assert!(
        b.metric(r#"fedport_rejections_total{listener="internal",reason="no_healthy_target"}"#)
            >= 1.0
    );
    assert!(
        c.metric(r#"fedport_tcp_connections_total{listener="internal",service="cache"}"#) >= 1.0
    );
    assert_eq!(cli(&["-p", &local.to_string(), "SET", "k", "v"]), "OK");
    assert_eq!(cli(&["-p", &rc.port.to_string(), "GET", "k"]), "v");
}

/// A connection carried to a peer holds more than a local splice: what the tunnel's
/// stream window lets the far node send unread. It counts that against the caller's
/// share: with a node budget of 4 MiB (the local identity's share 1 MiB), three tunneled
/// connections of 64 KiB + 256 KiB are held, and a fourth is closed as `memory`.
#[test]
fn a_tunneled_connection_counts_its_window_against_the_memory_budget() {
    use crate::federation::{node_config, peer};
    let pki = Pki::new();
    let (pa, pb) = (free_port(), free_port());
    let r = Redis::start();
    let a = Fedport::start(&node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "[[service]]\nname = \"cache\"\nprotocol = \"tcp\"\nendpoints = []\n\
             [[listener]]\nname = \"cache\"\nrole = \"local\"\nbind = \"127.0.0.1:0\"\nservice = \"cache\"\n{}",
            peer("b", "eu-1", pb, &["cache"])
        ),
    )
    .replace("workers = 2\n", "workers = 2\nmemory_budget = \"4MiB\"\n"));
    let _b = Fedport::start(&node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "[[service]]\nname = \"cache\"\nprotocol = \"tcp\"\nendpoints = [\"tcp://127.0.0.1:{}\"]\n{}",
            r.port,
            peer("a", "eu-1", pa, &[])
        ),
    ));
    wait_until("b up at a", Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
    });
    // six connections held open at once, each asking PING: how many were answered
    let answered = python(&format!(
        "import socket\nheld = []\nn = 0\nfor _ in range(6):\n    s = socket.create_connection(('127.0.0.1', {})); s.settimeout(5)\n    held.append(s)\n    try:\n        s.sendall(b'PING\\r\\n')\n        n += s.recv(100) == b'+PONG\\r\\n'\n    except OSError:\n        pass\nprint(n)",
        a.port("cache")
    ));
    assert_eq!(
        answered, "3",
        "three tunnels fit the local identity's 1 MiB share"
    );
    assert!(a.metric(r#"fedport_rejections_total{listener="cache",reason="memory"}"#) >= 3.0);
}

/// The rules hold for connections already spliced, too: a reload that takes the rule
/// away resets an open connection (counted as `denied`); its bytes are counted while it
/// is open, not only at its end.
#[test]
fn a_reload_that_takes_the_rule_away_closes_open_connections() {
    let pki = Pki::new();
    let r = Redis::start();
    let fp = Fedport::start(&config(&pki, &[r.port]));
    let port = fp.port("cache-local");
    let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut held = std::io::BufReader::new(held);
    use std::io::{BufRead, Write};
    held.get_mut().write_all(b"PING\r\n").unwrap();
    let mut line = String::new();
    held.read_line(&mut line).unwrap();
    assert_eq!(line, "+PONG\r\n");
    // counted while the connection is still open
    wait_until("bytes counted as they move", Duration::from_secs(3), || {
        fp.metric(
            r#"fedport_tcp_bytes_total{listener="cache-local",service="cache",direction="out"}"#,
        ) >= 7.0
    });
    // the rule for `local` goes; alice's stays
    let text = std::fs::read_to_string(&fp.config)
        .unwrap()
        .replace("[[allow]]\nfrom = \"local\"\nto = \"cache\"\n", "");
    std::fs::write(&fp.config, text).unwrap();
    fp.signal("HUP");
    line.clear();
    // cut, not ended as if complete
    let cut = held.read_line(&mut line);
    assert!(
        matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the open connection was reset: {cut:?} {line:?}"
    );
    wait_until("counted", Duration::from_secs(3), || {
        fp.metric(r#"fedport_rejections_total{listener="cache-local",reason="denied"}"#) >= 1.0
    });
    assert_eq!(
        cli(&["-p", &port.to_string(), "PING"]),
        "",
        "and new ones are refused"
    );
}
