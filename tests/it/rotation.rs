//! Certificates change without a restart: a rotated node certificate is used by the
//! next handshake while a long request finishes on the old one; a CRL revokes a client
//! after reload; a broken new file is refused and the old material keeps serving; a
//! certificate rotated on disk is what the node presents to its peers as well.

use crate::federation;
use crate::support::upstream::{self, Proto};
use crate::support::{free_port, node_config, wait_until, Fedport, Pki};
use fedport::identity::pki::LeafSpec;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn reloads(fp: &Fedport, result: &str) -> f64 {
    fp.metric(&format!(
        r#"fedport_tls_reloads_total{{result="{result}"}}"#
    ))
}

fn get(pki: &Pki, cert: &std::path::Path, key: &std::path::Path, port: u16) -> u16 {
    crate::support::curl_as(pki, cert, key, port).0
}

fn presented_subject(pki: &Pki, port: u16) -> String {
    let out = Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("-CAfile")
        .arg(&pki.ca)
        .arg("-cert")
        .arg(&pki.client.cert)
        .arg("-key")
        .arg(&pki.client.key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_rotated_certificate_serves_new_handshakes_while_a_long_request_finishes() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fp = Fedport::start(&node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    ));
    let port = fp.port("internal");
    assert!(
        presented_subject(&pki, port).contains("node-a"),
        "{}",
        presented_subject(&pki, port)
    );
    let c = pki.curl_client();
    let slow = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "fed-service: up",
            "--max-time",
            "20",
        ])
        .args(&c)
        .arg(format!("https://localhost:{port}/x?ms=2500"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the long request upstream", Duration::from_secs(10), || {
        up.inflight.load(Ordering::SeqCst) == 1
    });

    let fresh = pki
        .authority
        .issue(&LeafSpec {
            common_name: "node-a-rotated".into(),
            spiffe: Some("spiffe://fed.test/node/a".into()),
            dns: vec!["localhost".into()],
            ..Default::default()
        })
        .unwrap();
    std::fs::write(&pki.node.key, &fresh.key_pem).unwrap();
    std::fs::write(&pki.node.cert, &fresh.cert_pem).unwrap();
    fp.signal("HUP");
    wait_until("a reload", Duration::from_secs(10), || {
        reloads(&fp, "ok") >= 1.0
    });
    let subject = presented_subject(&pki, port);
    assert!(
        subject.contains("node-a-rotated"),
        "the next handshake presents the new certificate: {subject}"
    );
    assert_eq!(
        up.inflight.load(Ordering::SeqCst),
        1,
        "the long request is still running"
    );
    let out = slow.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the long request completed"
    );
}

#[test]
fn a_crl_revokes_a_client_after_reload_and_a_broken_file_changes_nothing() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let d = pki.path();
    let issue = |name: &str, serial: u64| {
        pki.authority
            .issue(&LeafSpec {
                common_name: name.into(),
                spiffe: Some(format!("spiffe://fed.test/client/{name}")),
                serial: Some(serial),
                ..Default::default()
            })
            .unwrap()
            .write(d, name)
            .unwrap()
    };
    let (alice, bob) = (issue("alice2", 1001), issue("bob", 1002));
    let crl = d.join("crl.pem");
    std::fs::write(&crl, pki.authority.crl(&[]).unwrap()).unwrap();
    let config = node_config(
        &pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
            up.url(Proto::H2c)
        ),
    )
    .replace(
        "[admin]",
        &format!("crl = \"{}\"\n\n[admin]", crl.display()),
    );
    let fp = Fedport::start(&config);
    let port = fp.port("internal");
    assert_eq!(get(&pki, &alice.cert, &alice.key, port), 200);
    assert_eq!(get(&pki, &bob.cert, &bob.key, port), 200);

    std::fs::write(&crl, pki.authority.crl(&[1001]).unwrap()).unwrap();
    fp.signal("HUP");
    wait_until("a reload", Duration::from_secs(10), || {
        reloads(&fp, "ok") >= 1.0
    });
    assert_eq!(
        get(&pki, &alice.cert, &alice.key, port),
        0,
        "a revoked client is refused"
    );
    assert_eq!(
        get(&pki, &bob.cert, &bob.key, port),
        200,
        "the others are not"
    );
    wait_until("revoked counted", Duration::from_secs(5), || {
        fp.metric(r#"fedport_tls_handshake_failures_total{listener="internal",reason="revoked"}"#)
            >= 1.0
    });

    // a broken certificate file: refused, logged, the old material keeps serving
    std::fs::write(
        &pki.node.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    fp.signal("HUP");
    wait_until("a refused reload", Duration::from_secs(10), || {
        reloads(&fp, "error") >= 1.0
    });
    assert_eq!(get(&pki, &bob.cert, &bob.key, port), 200, "still serving");
    assert!(
        fp.log_text().contains("TLS material refused"),
        "{}",
        fp.log_text()
    );
}

#[test]
fn a_certificate_rotated_on_disk_is_presented_to_peers_too() {
    let pki = Pki::new();
    let d = pki.path();
    let (pa, pb) = (free_port(), free_port());
    let up = upstream::start(Proto::H2c);
    // a hosts nothing and forwards "far" to b; b checks a against its CRL
    let a_config = federation::node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}",
            federation::http_service("far", &[], ""),
            federation::peer("b", "eu-1", pb, &["far"])
        ),
    );
    // node_config wrote a's files; a known serial replaces them, for b to revoke
    pki.rotate_node_cert("a", 3001);
    let crl = d.join("b-crl.pem");
    std::fs::write(&crl, pki.authority.crl(&[]).unwrap()).unwrap();
    let b_config = federation::node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            federation::http_service("far", &[up.url(Proto::H2c)], ""),
            federation::peer("a", "eu-1", pa, &[])
        ),
    )
    .replace(
        "[admin]",
        &format!("crl = \"{}\"\n\n[admin]", crl.display()),
    );
    let b = Fedport::start(&b_config);
    let a = Fedport::start(&a_config);
    wait_until("a call through a to b", Duration::from_secs(10), || {
        federation::get(&pki, pa, "far", &[]).0 == 200
    });

    // a's certificate is rotated on disk, with no SIGHUP: the file watch swaps it in
    pki.rotate_node_cert("a", 3002);
    wait_until("a's TLS reload", Duration::from_secs(10), || {
        reloads(&a, "ok") >= 1.0
    });

    // b now revokes a's old certificate and restarts, so a must connect anew: the
    // handshakes a makes to b (probe and data connections) must present the new one
    std::fs::write(&crl, pki.authority.crl(&[3001]).unwrap()).unwrap();
    drop(b);
    let b = Fedport::start(&b_config);
    wait_until(
        "a call through a to the restarted b",
        Duration::from_secs(20),
        || federation::get(&pki, pa, "far", &[]).0 == 200,
    );
    assert_eq!(
        b.metric(r#"fedport_tls_handshake_failures_total{listener="internal",reason="revoked"}"#),
        0.0,
        "a presented its old, revoked certificate to b:\n{}",
        a.log_text()
    );
    assert!(
        a.log_text()
            .contains("new connections to peers and endpoints use it"),
        "{}",
        a.log_text()
    );
}

/// A node checks the peers it dials against its CRL as it checks callers: a peer whose
/// certificate the CRL lists is refused, and nothing is sent to it. A CRL from another
/// issuer (a second CA during a rotation) refuses nobody the federation CA issued.
#[test]
fn a_peer_whose_certificate_is_revoked_is_not_dialled() {
    let pki = Pki::new();
    let d = pki.path();
    let (pa, pb) = (free_port(), free_port());
    let up = upstream::start(Proto::H2c);
    let b_config = federation::node_config(
        &pki,
        "b",
        "eu-1",
        pb,
        &format!(
            "{}{}",
            federation::http_service("far", &[up.url(Proto::H2c)], ""),
            federation::peer("a", "eu-1", pa, &[])
        ),
    );
    // b's certificate with a known serial
    pki.rotate_node_cert("b", 5001);
    let _b = Fedport::start(&b_config);
    let crl = d.join("a-crl.pem");
    let a_config = federation::node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}",
            federation::http_service("far", &[], ""),
            federation::peer("b", "eu-1", pb, &["far"])
        ),
    )
    .replace(
        "[admin]",
        &format!("crl = \"{}\"\n\n[admin]", crl.display()),
    );

    // a CRL of another CA: unknown to these certificates, it refuses none of them
    let other = fedport::identity::pki::Authority::new("other.test").unwrap();
    std::fs::write(&crl, other.crl(&[5001]).unwrap()).unwrap();
    let a = Fedport::start(&a_config);
    wait_until("a call through a to b", Duration::from_secs(10), || {
        federation::get(&pki, pa, "far", &[]).0 == 200
    });
    drop(a);

    // the federation CA's CRL listing b: a refuses b's certificate when it dials b
    std::fs::write(&crl, pki.authority.crl(&[5001]).unwrap()).unwrap();
    let hits = up.hits();
    let a = Fedport::start(&a_config);
    for _ in 0..5 {
        assert_eq!(federation::get(&pki, pa, "far", &[]).0, 503);
    }
    assert_eq!(
        up.hits(),
        hits,
        "nothing reached the revoked peer's service"
    );
    wait_until("b down at a", Duration::from_secs(5), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 0.0
    });
}
