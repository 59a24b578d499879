//! The first minutes of a new operator: the README's "Your first node" lines, run in
//! order in an empty directory with the real binary on PATH, leave an example config
//! that `fedport check` passes; the certificates chain to the CA (openssl) and carry the
//! SPIFFE IDs and SANs asked for; nothing is overwritten without --force.

use std::process::Command;

#[test]
fn the_readmes_first_steps_work_from_an_empty_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme
        .split("<!-- first-minutes")
        .nth(1)
        .and_then(|b| b.split("```sh\n").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the README's first-minutes block");
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(crate::support::bin())
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let out = Command::new("bash")
            .args(["-ec", line])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("REPO", root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert!(
        outputs.iter().any(|o| o.contains("fedport.toml: ok")),
        "{outputs:?}"
    );
    assert!(
        outputs
            .iter()
            .any(|o| o.contains("[tls]\ncert = \"certs/eu-west-a.pem\"")),
        "{outputs:?}"
    );
    assert!(outputs
        .iter()
        .any(|o| o.contains("[[trust_domain]]\nname = \"partner.example\"")));
    let certs = dir.path().join("certs");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&certs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    openssl(&[
        "verify",
        "-CAfile",
        "federation-ca.pem",
        "eu-west-a.pem",
        "alice.pem",
    ]);
    let sans = openssl(&[
        "x509",
        "-in",
        "eu-west-a.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        sans.contains("URI:spiffe://fed.example/node/eu-west-a"),
        "{sans}"
    );
    assert!(sans.contains("IP Address:10.0.0.5"), "{sans}");
    let alice = openssl(&[
        "x509",
        "-in",
        "alice.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        alice.contains("URI:spiffe://fed.example/client/alice"),
        "{alice}"
    );
    // the partner's CA is a CA of its own: the federation's certificates do not chain to it
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", "partner-ca.pem", "alice.pem"])
        .current_dir(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    use std::os::unix::fs::PermissionsExt;
    for key in [
        "federation-ca.key",
        "eu-west-a.key",
        "alice.key",
        "partner-ca.key",
    ] {
        let mode = std::fs::metadata(certs.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // nothing is overwritten: the same init again is refused and leaves the CA as it was
    let before = std::fs::read(certs.join("federation-ca.pem")).unwrap();
    let again = Command::new(crate::support::bin())
        .args(["certs", "init", "--node", "eu-west-a"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    assert_eq!(
        std::fs::read(certs.join("federation-ca.pem")).unwrap(),
        before
    );
    // a CA key that is not the CA certificate's is refused before anything is issued
    let ca_key = std::fs::read(certs.join("federation-ca.key")).unwrap();
    std::fs::copy(
        certs.join("partner-ca.key"),
        certs.join("federation-ca.key"),
    )
    .unwrap();
    let mixed = Command::new(crate::support::bin())
        .args(["certs", "client", "bob"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!mixed.status.success());
    assert!(
        String::from_utf8_lossy(&mixed.stderr).contains("is not the key of"),
        "{}",
        String::from_utf8_lossy(&mixed.stderr)
    );
    assert!(!certs.join("bob.pem").exists(), "nothing issued");
    std::fs::write(certs.join("federation-ca.key"), ca_key).unwrap();
    // an init the node's certificate would refuse leaves no CA behind
    let empty = tempfile::tempdir().unwrap();
    let bad = Command::new(crate::support::bin())
        .args(["certs", "init", "--node", "no/such name"])
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        !empty.path().join("certs/federation-ca.pem").exists()
            && !empty.path().join("certs/federation-ca.key").exists(),
        "no CA left behind"
    );
}
