//! The Debian package: `cargo deb` (the cargo-deb crate, installed by
//! scripts/install-test-deps.sh) builds it from the test build's binary, `dpkg -i`
//! installs it on this machine — the binary, the unit, fedport's
//! user, an example config under /etc/fedport and the docs — the installed binary's
//! `fedport check` passes on the installed example once `fedport certs init` made its
//! certificates (the README's steps), and `dpkg --purge` removes it all.
//!
//! It installs into the machine's own /usr and /etc: it runs as root, as CI does.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_installs_checks_and_purges_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("fedport.deb");
    // the test build's binary where cargo-deb takes a release build's from, in a target
    // directory of the test's own (no release build needed, none overwritten)
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("release")).unwrap();
    std::fs::copy(crate::support::bin(), target.join("release/fedport")).unwrap();
    run(Command::new(env!("CARGO"))
        .args(["deb", "--no-build", "--no-strip", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(root));
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for f in [
        "./usr/bin/fedport",
        "./lib/systemd/system/fedport.service",
        "./etc/fedport/fedport.toml",
        "./etc/fedport/protos/orders.proto",
        "./usr/share/doc/fedport/README.md",
        "./usr/share/doc/fedport/docs/config.md",
    ] {
        assert!(listing.contains(f), "{f} in the package:\n{listing}");
    }
    run(Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let installed = std::panic::catch_unwind(|| {
        assert!(run(Command::new("getent").args(["passwd", "fedport"])).contains("fedport"));
        let version = run(Command::new("/usr/bin/fedport").arg("--version"));
        assert!(version.starts_with("fedport "), "{version}");
        // the README's first steps, on the installed example
        run(Command::new("/usr/bin/fedport")
            .args([
                "certs",
                "init",
                "--node",
                "eu-west-a",
                "--trust-domain",
                "fed.example",
            ])
            .current_dir("/etc/fedport"));
        // as the README goes on: the node's user reads its key, the CA's key leaves
        run(Command::new("bash")
            .args([
                "-ec",
                "chgrp fedport certs/*.key && chmod 0640 certs/*.key && mv certs/federation-ca.key \"$1\"",
                "-",
            ])
            .arg(dir.path())
            .current_dir("/etc/fedport"));
        // as the unit runs it: user fedport reads the config, its files and its key
        let checked = run(Command::new("runuser").args([
            "-u",
            "fedport",
            "--",
            "/usr/bin/fedport",
            "check",
            "/etc/fedport/fedport.toml",
        ]));
        assert!(checked.contains("fedport.toml: ok"), "{checked}");
        let out = Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/fedport.service"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !said.contains("fedport.service"),
            "{said}"
        );
    });
    // what the steps made is the operator's: removed first, then the package, purged
    let _ = std::fs::remove_dir_all("/etc/fedport/certs");
    run(Command::new("dpkg").args(["--purge", "fedport"]));
    if let Err(e) = installed {
        std::panic::resume_unwind(e);
    }
    for gone in [
        "/usr/bin/fedport",
        "/lib/systemd/system/fedport.service",
        "/etc/fedport",
        "/var/lib/fedport",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is removed");
    }
    let user = Command::new("getent")
        .args(["passwd", "fedport"])
        .output()
        .unwrap();
    assert!(!user.status.success(), "fedport's user is removed on purge");
}
