//! Upgrading the binary under load (SIGUSR2): h2load keeps a steady load on the node,
//! over HTTP/2 and HTTP/1.1 at once, while 1,000 connections are opened and closed one
//! after the other, and the upgrade happens in the middle. First with a "new binary" that exits at once: nothing fails,
//! the old process serves on and logs why. Then with the real one: nothing fails, no
//! connection is refused or reset, the new process took over every socket (the admin
//! and bundle endpoint ports too, and the ready file) and the old one exited 0 — one process at the end.

use crate::support::upstream::{self, Proto};
use crate::support::{Fedport, Pki};
use std::process::{Command, Stdio};
use std::time::Duration;

/// h2load through the local listener for `secs`, HTTP/2 (h2c, 4 connections of 8
/// streams) or HTTP/1.1 (4 connections): (succeeded, failed, errored). h2load cannot
/// move a request to a new connection after GOAWAY (it counts the requests it had left
/// as failed), so under HTTP/2 it passes only if the old process serves its busy
/// connections on rather than telling them to go.
fn h2load(port: u16, secs: u64, h1: bool) -> std::thread::JoinHandle<(u64, u64, u64)> {
    std::thread::spawn(move || {
        let mut cmd = Command::new("h2load");
        if h1 {
            cmd.args(["--h1", "-m", "1"]);
        } else {
            cmd.args(["-m", "8"]);
        }
        let out = cmd
            .args(["-D", &secs.to_string(), "-c", "4", "-H", "fed-service: up"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .expect("h2load (scripts/install-test-deps.sh)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("requests:"))
            .unwrap_or_else(|| panic!("h2load said: {text}"))
            .to_owned();
        let n = |what: &str| -> u64 {
            line.split(',')
                .find(|p| p.trim().ends_with(what))
                .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
                .unwrap_or(u64::MAX)
        };
        if n("failed") > 0 || n("errored") > 0 {
            eprintln!(
                "h2load said:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (n("succeeded"), n("failed"), n("errored"))
    })
}

/// 1,000 connections one after the other, each one HTTP/1.1 request: how many failed
/// (refused, reset, or not answered 200), and the first failure.
fn churn(port: u16) -> std::thread::JoinHandle<(u64, String)> {
    std::thread::spawn(move || {
        let script = format!(
            "import socket\nfails = 0\nfirst = ''\nfor i in range(1000):\n    try:\n        s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n        s.sendall(b'GET / HTTP/1.1\\r\\nhost: x\\r\\nfed-service: up\\r\\nconnection: close\\r\\n\\r\\n')\n        b = b''\n        while True:\n            d = s.recv(65536)\n            if not d: break\n            b += d\n        s.close()\n        if not b.startswith(b'HTTP/1.1 200'):\n            fails += 1\n            first = first or repr(b[:80])\n    except OSError as e:\n        fails += 1\n        first = first or repr(e)\nprint(fails, first)"
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (n, first) = text.split_once(' ').unwrap_or((&text, ""));
        (n.parse().unwrap_or(u64::MAX), first.to_owned())
    })
}

/// The inodes of the sockets listening on `port` (/proc/net/tcp): the same inodes
/// before and after an upgrade are the same sockets, handed over, not bound again.
fn listening(port: u16) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f[3] == "0A" {
                out.insert(f[9].parse().unwrap());
            }
        }
    }
    out
}

/// One HTTP/2 connection used every `every` seconds, `count` times at most, until
/// GOAWAY or `secs` (tests/py/h2_steady.py): what it saw.
fn steady(
    port: u16,
    every: f64,
    count: u32,
    secs: u64,
) -> std::thread::JoinHandle<serde_json::Value> {
    std::thread::spawn(move || {
        let out = Command::new("python3")
            .arg(crate::support::py("h2_steady.py"))
            .args(["--port", &port.to_string(), "--service", "up"])
            .args(["--every", &every.to_string(), "--count", &count.to_string()])
            .args(["--for", &secs.to_string()])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "h2_steady.py said: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
}

/// SIGUSR2 a second into `secs` of h2load's load (HTTP/2 and HTTP/1.1 at once) and
/// 1,000 connections one after the other: none may fail.
fn upgrade_under_load(fp: &Fedport, secs: u64) {
    let port = fp.port("local");
    let (h2, h1, conns) = (
        h2load(port, secs, false),
        h2load(port, secs, true),
        churn(port),
    );
    std::thread::sleep(Duration::from_secs(1));
    fp.signal("USR2");
    for (load, what) in [(h2, "HTTP/2"), (h1, "HTTP/1.1")] {
        let (ok, failed, errored) = load.join().unwrap();
        if failed > 0 {
            eprintln!("LOG:\n{}", fp.log_text());
        }
        assert!(ok > 100, "{what}: {ok} succeeded");
        assert_eq!(
            (failed, errored),
            (0, 0),
            "h2load {what}: none failed or errored"
        );
    }
    let (churn_failed, first) = conns.join().unwrap();
    assert_eq!(churn_failed, 0, "no connection refused or reset: {first}");
}

/// SIGTERM to a process an upgrade started (no child of the test's), and its end.
fn stop(pid: u32) {
    let _ = Command::new("kill")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status();
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ready_pid(fp: &Fedport) -> u32 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fp.ready_file()).unwrap()).unwrap();
    v["pid"].as_u64().unwrap() as u32
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Replaces the file at `path` (as a package upgrade does: a new file, renamed over).
fn replace(path: &std::path::Path, with: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, with).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sigusr2_upgrades_the_binary_under_load_and_drops_nothing() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fedport");
    let real = std::fs::read(crate::support::bin()).unwrap();
    replace(&exe, &real);
    let mut fp = Fedport::start_by(
        Command::new(&exe),
        &crate::support::node_config(
            &pki,
            &format!(
                "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n\
                 [bundle_endpoint]\nbind = \"127.0.0.1:0\"\n",
                up.url(Proto::H2c)
            ),
        ),
    );
    let port = fp.port("local");
    let old = fp.pid();
    let sockets = (
        listening(port),
        listening(fp.port("internal")),
        listening(fp.port("bundle_endpoint")),
        listening(fp.admin.unwrap().port()),
    );
    assert_eq!(sockets.0.len(), 2, "one socket per worker: {:?}", sockets.0);

    // a "new binary" that exits at once: nothing fails, the old process serves on
    replace(&exe, b"#!/bin/sh\nexit 3\n");
    upgrade_under_load(&fp, 4);
    assert!(fp
        .log_text()
        .contains("upgrade failed; this process serves on"));
    assert!(fp.log_text().contains("exit status: 3"), "says why");
    assert!(alive(old) && ready_pid(&fp) == old);

    // the real one: it takes every socket over, and the old process drains and exits 0
    // besides the load: a connection that made one call and idles, which is told to go
    // (GOAWAY, no error) soon after the handover rather than kept by the old process
    replace(&exe, &real);
    // its call answered by the old process before the upgrade begins: a python that
    // starts slowly (a loaded machine) would otherwise connect after the handover, to
    // the new process, which has no reason to send it away
    let served = || {
        fp.admin_get("/metrics")
            .lines()
            .filter(|l| {
                l.starts_with("fedport_requests_total{")
                    && l.contains("listener=\"local\"")
                    && l.contains("service=\"up\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = served();
    let idle = steady(port, 0.1, 1, 20);
    crate::support::wait_until(
        "the idle connection's call",
        Duration::from_secs(20),
        || served() > before,
    );
    upgrade_under_load(&fp, 5);
    let idle = idle.join().unwrap();
    assert_eq!(idle["ok"], 1, "{idle}");
    assert_eq!(
        idle["goaway"], 0,
        "the idle connection was told GOAWAY(NO_ERROR): {idle}"
    );
    assert_eq!(idle["unanswered"], 0, "{idle}");
    // its busy connections ended with the load, so the old process is gone well before
    // upgrade_drain_timeout (60 s)
    let status = fp.wait_exit(Duration::from_secs(40));
    assert_eq!(status, Some(0), "the old process drained and exited 0");
    let new = ready_pid(&fp);
    assert_ne!(new, old, "the ready file is the new process's");
    assert_eq!(
        (
            listening(port),
            listening(fp.port("internal")),
            listening(fp.port("bundle_endpoint")),
            listening(fp.admin.unwrap().port()),
        ),
        sockets,
        "the very sockets the old process listened on, handed over: none bound anew"
    );
    assert!(alive(new));
    // the same ports: the local listener and the admin port answer from the new process
    let (code, _, _) = crate::support::curl(&[
        "-H",
        "fed-service: up",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    assert_eq!(code, 200);
    let ready = fp.admin_get("/readyz");
    assert!(ready.contains("ready"), "{ready}");
    stop(new);
    assert!(!alive(new), "the new process stops on SIGTERM");
}

/// A connection that stays busy after an upgrade is served by the old process only
/// until `upgrade_drain_timeout`; then it is told GOAWAY (no error), nothing it asked is
/// reset or refused, and the old process exits 0 though the client would go on. A busy
/// HTTP/1.1 keep-alive connection is told `Connection: close` in an answer.
#[test]
fn a_connection_busy_past_the_upgrade_drain_time_is_told_to_go() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let config = crate::support::node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    )
    .replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\nupgrade_drain_timeout = \"2s\"",
    );
    let mut fp = Fedport::start(&config);
    let port = fp.port("local");
    let old = fp.pid();
    // a request every 0.2 s: never idle for the second that sends an idle one away
    let busy = steady(port, 0.2, u32::MAX, 40);
    // and an HTTP/1.1 keep-alive connection used as often: told `Connection: close` in
    // an answer after the handover, every request answered 200, none cut
    let h1 = std::thread::spawn(move || {
        let script = format!(
            "import socket, time\ns = socket.create_connection(('127.0.0.1', {port}), timeout=10)\nf = s.makefile('rb')\nok = 0\nclosed = False\nt0 = time.monotonic()\nwhile time.monotonic() - t0 < 30 and not closed:\n    s.sendall(b'GET / HTTP/1.1\\r\\nhost: x\\r\\nfed-service: up\\r\\n\\r\\n')\n    status = f.readline()\n    if not status.startswith(b'HTTP/1.1 200'):\n        print('bad', ok, repr(status)); raise SystemExit\n    n = 0\n    while True:\n        h = f.readline()\n        if h in (b'\\r\\n', b''): break\n        k, _, v = h.decode().partition(':')\n        if k.lower() == 'content-length': n = int(v)\n        if k.lower() == 'connection' and 'close' in v.lower(): closed = True\n    f.read(n)\n    ok += 1\n    time.sleep(0.2)\nprint('closed' if closed else 'open', ok)"
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    });
    // both connections open on the old process before the upgrade (a python slow to
    // start would otherwise connect to the new one), then about 5 calls each
    crate::support::wait_until("both clients connected", Duration::from_secs(20), || {
        fp.metric(r#"fedport_connections_active{listener="local"}"#) == 2.0
    });
    std::thread::sleep(Duration::from_secs(1));
    fp.signal("USR2");
    let h1 = h1.join().unwrap();
    assert!(
        h1.starts_with("closed "),
        "told Connection: close in a 200: {h1}"
    );

    let seen = busy.join().unwrap();
    assert_eq!(
        seen["goaway"], 0,
        "told GOAWAY(NO_ERROR) once the drain time passed, not kept for the client's 40 s: {seen}"
    );
    assert!(
        seen["ok"].as_u64().unwrap() >= 10,
        "served by the old process after the handover (about 5 calls came before it): {seen}"
    );
    assert_eq!(
        (&seen["bad"], &seen["reset"]),
        (&0.into(), &0.into()),
        "{seen}"
    );
    assert_eq!(
        fp.wait_exit(Duration::from_secs(20)),
        Some(0),
        "the old process exited 0"
    );
    let new = ready_pid(&fp);
    assert_ne!(new, old);
    let (code, _, _) = crate::support::curl(&[
        "-H",
        "fed-service: up",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    assert_eq!(code, 200, "the new process serves");
    stop(new);
}
