//! The systemd unit and the readiness protocol: `systemd-analyze security` rates
//! deploy/systemd/fedport.service at 2.0 or below and `systemd-analyze verify` finds
//! nothing; the node tells a service manager (a datagram socket of the test's, as
//! $NOTIFY_SOCKET) READY=1 once it listens, RELOADING=1 and READY=1 around a SIGHUP,
//! STOPPING=1 on SIGTERM — what the unit's Type=notify and ExecReload rely on; and
//! `fedport reload` (the unit's ExecReload) returns once the node has reloaded, and
//! fails when the file or the node refused it.

use crate::support::{Fedport, Pki};
use std::process::Command;
use std::time::Duration;

fn unit() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/fedport.service")
}

#[test]
fn the_unit_is_hardened_and_verifies_clean() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit())
        .output()
        .expect("systemd-analyze (Debian's systemd, scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for fedport.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level: {text}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
    // verify needs the binary the unit names: the test build's, in a copy of the unit
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("fedport.service");
    let text = std::fs::read_to_string(unit()).unwrap();
    assert!(
        text.contains("Type=notify\n")
            && text.contains(
                "ExecReload=/usr/bin/fedport reload -c /etc/fedport/fedport.toml --pid $MAINPID\n"
            )
    );
    assert!(text.contains("Restart=on-failure\n"));
    std::fs::write(
        &copy,
        text.replace("/usr/bin/fedport", crate::support::bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("fedport.service"), "verify is clean: {said}");
}

#[test]
fn the_node_tells_the_service_manager_when_it_is_ready_reloading_and_stopping() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = Command::new(crate::support::bin());
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let fp = Fedport::start_by(cmd, &crate::support::node_config(&pki, ""));
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // READY=1 comes once the ports listen: the node answers at once
    let (status, _, _) =
        crate::support::curl_as(&pki, &pki.client.cert, &pki.client.key, fp.port("internal"));
    assert_ne!(status, 0);
    fp.signal("HUP");
    let reloading = next();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let again = next();
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");
    fp.signal("TERM");
    let stopping = next();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

#[test]
fn fedport_reload_returns_once_the_node_has_reloaded_and_fails_when_it_refused() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut cmd = Command::new(crate::support::bin());
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let base = crate::support::node_config(&pki, "");
    let fp = Fedport::start_by(cmd, &base);
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    let reload = || {
        let out = Command::new(crate::support::bin())
            .args(["reload", "-c"])
            .arg(&fp.config)
            .args(["--pid", &fp.pid().to_string()])
            .args(["--admin", &fp.admin.unwrap().to_string()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let said_since = || {
        sock.set_nonblocking(true).unwrap();
        let mut all = String::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            all += &String::from_utf8_lossy(&buf[..n]);
        }
        sock.set_nonblocking(false).unwrap();
        all
    };
    let hash = || {
        let v: serde_json::Value = serde_json::from_str(&fp.admin_get("/config")).unwrap();
        v["hash"].as_str().unwrap().to_owned()
    };

    // a change the node takes: when the command returns, the node runs it and has said
    // RELOADING=1 and READY=1 already
    let added = format!(
        "{base}\n[[service]]\nname = \"added\"\nprotocol = \"http\"\nendpoints = [\"http://127.0.0.1:9\"]\n"
    );
    std::fs::write(&fp.config, &added).unwrap();
    let (code, text) = reload();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("reloaded"), "{text}");
    assert_eq!(
        hash(),
        fedport::config::text_hash(&added),
        "running it on return"
    );
    let said = said_since();
    assert!(
        said.contains("RELOADING=1") && said.contains("READY=1"),
        "the node said both before the command returned: {said:?}"
    );

    // a file that does not check: refused here with file:line:col, the node not signalled
    let running = hash();
    std::fs::write(&fp.config, format!("{added}\n[[service]\nname = 1\n")).unwrap();
    let (code, text) = reload();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("fedport.toml:"), "file:line:col: {text}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!said_since().contains("RELOADING=1"), "not signalled");
    assert_eq!(hash(), running);

    // a file that checks but the node cannot apply (its new port is taken): exit 1, the
    // running configuration serves on
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(
        &fp.config,
        format!(
            "{added}\n[[listener]]\nname = \"more\"\nrole = \"local\"\nbind = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    let (code, text) = reload();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("refused"), "{text}");
    assert_eq!(hash(), running, "the running configuration serves on");
}
