//! The systemd unit and the readiness protocol: `systemd-analyze security` rates
//! deploy/systemd/fedport.service at 2.0 or below and `systemd-analyze verify` finds
//! nothing; the node tells a service manager (a datagram socket of the test's, as
//! $NOTIFY_SOCKET) READY=1 once it listens, RELOADING=1 and READY=1 around a SIGHUP,
//! STOPPING=1 on SIGTERM — what the unit's Type=notify and ExecReload rely on.

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
        text.contains("Type=notify\n") && text.contains("ExecReload=/bin/kill -HUP $MAINPID\n")
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
