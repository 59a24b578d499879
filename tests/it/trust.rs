//! Trust domains: each organisation's CA vouches only for its own domain's identities.
//! Certificates from two CAs (rcgen): the federation's (`fed.test`, the node's own
//! domain, `[tls] ca`) and organisation B's (`b.example`, a `[[trust_domain]]`).

use crate::support::upstream::{self, Proto};
use crate::support::{bin, curl_as, node_config, Fedport, Pki};
use fedport::identity::pki::{Authority, IssuedFiles, LeafSpec};
use std::process::Command;

fn issue(pki: &Pki, by: &Authority, file: &str, spiffe: &str) -> IssuedFiles {
    by.issue(&LeafSpec {
        common_name: file.into(),
        spiffe: Some(spiffe.into()),
        ..Default::default()
    })
    .unwrap()
    .write(pki.path(), file)
    .unwrap()
}

fn trust_domain(name: &str, ca: &std::path::Path) -> String {
    format!(
        "[[trust_domain]]\nname = \"{name}\"\nca = \"{}\"\n",
        ca.display()
    )
}

/// B's callers are served with B's certificates; B's CA cannot mint an identity of the
/// node's own domain, the federation's CA cannot mint one of B's, and a domain with no
/// bundle here is refused: each fails the handshake, counted as `trust_domain`.
/// Without the `[[trust_domain]]`, B's callers are refused too.
#[test]
fn each_trust_domain_vouches_only_for_its_own_identities() {
    let pki = Pki::new();
    let b = Authority::new("b.example CA").unwrap();
    let b_ca = b.write_ca(pki.path(), "b-ca").unwrap();
    let c = Authority::new("c.example CA").unwrap();
    let b_alice = issue(&pki, &b, "b-alice", "spiffe://b.example/client/alice");
    let b_forger = issue(&pki, &b, "b-forger", "spiffe://fed.test/client/admin");
    let own_forger = issue(
        &pki,
        &pki.authority,
        "a-forger",
        "spiffe://b.example/client/bob",
    );
    let c_carol = issue(&pki, &c, "c-carol", "spiffe://c.example/client/carol");
    let up = upstream::start(Proto::H2c);
    let service = format!(
        "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
        up.url(Proto::H2c)
    );
    let fp = Fedport::start(&format!(
        "{}\n{}",
        node_config(&pki, &service),
        trust_domain("b.example", &b_ca)
    ));
    let port = fp.port("internal");
    let call = |who: &IssuedFiles| curl_as(&pki, &who.cert, &who.key, port);

    assert_eq!(call(&pki.client).0, 200, "the node's own domain");
    let (status, body, _) = call(&b_alice);
    assert_eq!(status, 200, "B's caller, with B's certificate: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["headers"]["fed-caller"][0], "spiffe://b.example/client/alice",
        "{v}"
    );
    let hits = up.hits();
    for (who, what) in [
        (&b_forger, "B's CA naming a fed.test identity"),
        (
            &own_forger,
            "the federation's CA naming a b.example identity",
        ),
        (&c_carol, "a domain with no bundle here"),
    ] {
        let (status, body, rc) = call(who);
        assert!(
            rc != 0 && status == 0,
            "{what}: {status} {body} (curl {rc})"
        );
    }
    assert_eq!(up.hits(), hits, "nothing of theirs reached the service");
    let refused =
        r#"fedport_tls_handshake_failures_total{listener="internal",reason="trust_domain"}"#;
    assert_eq!(fp.metric(refused), 3.0);
    drop(fp);

    // today's config, without the [[trust_domain]]: B's CA vouches for nothing here
    let fp = Fedport::start(&node_config(&pki, &service));
    let port = fp.port("internal");
    let (status, _, rc) = curl_as(&pki, &b_alice.cert, &b_alice.key, port);
    assert!(rc != 0 && status == 0, "B's caller without B's bundle");
    assert_eq!(
        curl_as(&pki, &pki.client.cert, &pki.client.key, port).0,
        200
    );
}

/// `check` refuses a `[[trust_domain]]` that is the node's own domain, one configured
/// twice, a malformed name (a trailing dot too), a DNS name two domains would vouch for
/// (also through a wildcard) or one of the node's own, a CA that another bundle holds as well, and a peer whose
/// domain has no bundle, each with its line and a hint.
#[test]
fn check_refuses_overlapping_or_malformed_trust_domains() {
    let pki = Pki::new();
    let b = Authority::new("b.example CA").unwrap();
    let b_ca = b.write_ca(pki.path(), "b-ca").unwrap();
    let c_ca = Authority::new("c.example CA")
        .unwrap()
        .write_ca(pki.path(), "c-ca")
        .unwrap();
    let cases = [
        (
            trust_domain("fed.test", &b_ca),
            "is this node's own trust domain",
        ),
        (
            format!(
                "{}{}",
                trust_domain("b.example", &b_ca),
                trust_domain("b.example", &c_ca)
            ),
            "configured twice",
        ),
        (
            trust_domain("spiffe://B.example", &b_ca),
            "is not a SPIFFE trust domain",
        ),
        (
            format!(
                "{}dns_names = [\"db.shared.example\"]\n{}dns_names = [\"db.shared.example\"]\n",
                trust_domain("b.example", &b_ca),
                trust_domain("c.example", &c_ca)
            ),
            "is vouched for by trust domain \"b.example\" as well",
        ),
        (
            format!(
                "{}dns_names = [\"*.svc.shared.example\"]\n{}dns_names = [\"api.svc.shared.example\"]\n",
                trust_domain("b.example", &b_ca),
                trust_domain("c.example", &c_ca)
            ),
            "is vouched for by trust domain \"b.example\" as well",
        ),
        (trust_domain("b.example.", &b_ca), "is not a SPIFFE trust domain"),
        (
            // the node's certificate names *.fed.test
            format!("{}dns_names = [\"api.fed.test\"]\n", trust_domain("b.example", &b_ca)),
            "covers a DNS name of this node's own certificate",
        ),
        (
            trust_domain("b.example", &pki.ca),
            "holds a CA that [tls] ca holds too",
        ),
        (
            "[[peer]]\nname = \"z\"\nregion = \"r\"\naddress = \"127.0.0.1:1\"\n\
             identity = \"spiffe://z.example/node/z\"\nservices = []\n"
                .to_owned(),
            "for which this node has no bundle",
        ),
    ];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let path = pki.path().join(format!("check-{i}.toml"));
        std::fs::write(&path, format!("{}\n{extra}", node_config(&pki, ""))).unwrap();
        let out = Command::new(bin())
            .args(["check", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(err.contains(want), "case {i}: {err}");
        assert!(
            err.contains(&format!("check-{i}.toml:")),
            "file:line:col: {err}"
        );
    }
}

/// Two organisations federate, each with its own CA: node a (`fed.test`) names B's
/// domain with B's bundle, node b (`b.example`) names a's with a's. a's caller reaches
/// b's service through a, a verifying b's certificate against B's bundle and b verifying
/// a's against a's. A node presenting `spiffe://b.example/node/b` from a's own CA is not
/// dialled: the call is refused, and nothing reaches that node's service.
#[test]
fn two_organisations_federate_each_with_its_own_ca() {
    use crate::federation;
    let pki = Pki::new();
    let b = Authority::new("b.example CA").unwrap();
    let b_ca = b.write_ca(pki.path(), "b-ca").unwrap();
    let node_b = |by: &Authority, file: &str| {
        by.issue(&LeafSpec {
            common_name: "b".into(),
            spiffe: Some("spiffe://b.example/node/b".into()),
            dns: vec!["localhost".into()],
            ips: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), file)
        .unwrap()
    };
    let peer_b = |port: u16| {
        format!(
            "[[peer]]\nname = \"b\"\nregion = \"eu-2\"\naddress = \"127.0.0.1:{port}\"\n\
             identity = \"spiffe://b.example/node/b\"\nservices = [\"far\"]\n"
        )
    };
    let b_node = |files: &IssuedFiles, ca: &std::path::Path, port: u16, up: &upstream::Upstream| {
        let a_cert = pki.node_cert("b-placeholder");
        federation::node_config(
            &pki,
            "b-placeholder",
            "eu-2",
            port,
            &format!(
                "{}{}",
                federation::http_service("far", &[up.url(Proto::H2c)], ""),
                trust_domain("fed.test", &pki.ca)
            ),
        )
        .replace("name = \"b-placeholder\"", "name = \"b\"")
        .replace(
            &a_cert.cert.display().to_string(),
            &files.cert.display().to_string(),
        )
        .replace(
            &a_cert.key.display().to_string(),
            &files.key.display().to_string(),
        )
        .replace(
            &format!("ca = \"{}\"\n\n[admin]", pki.ca.display()),
            &format!("ca = \"{}\"\n\n[admin]", ca.display()),
        )
    };
    let (pa, pb) = (crate::support::free_port(), crate::support::free_port());
    let up = upstream::start(Proto::H2c);
    let genuine = node_b(&b, "node-b-genuine");
    let cfg_b = b_node(&genuine, &b_ca, pb, &up);
    assert!(cfg_b.contains(&b_ca.display().to_string()), "{cfg_b}");
    let _b = Fedport::start(&cfg_b);
    let a_cfg = federation::node_config(
        &pki,
        "a",
        "eu-1",
        pa,
        &format!(
            "{}{}{}",
            federation::http_service("far", &[], ""),
            peer_b(pb),
            trust_domain("b.example", &b_ca)
        ),
    );
    let a = Fedport::start(&a_cfg);
    crate::support::wait_until("b up at a", std::time::Duration::from_secs(10), || {
        a.metric(r#"fedport_peer_up{peer="b"}"#) == 1.0
    });
    let (code, v) = federation::get(&pki, pa, "far", &[]);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["headers"]["fed-peer"][0], "spiffe://fed.test/node/a",
        "{v}"
    );
    assert_eq!(up.hits(), 1);
    drop(a);
    drop(_b);

    // the same node's identity, certified by a's own CA: a does not dial it
    let forged = node_b(&pki.authority, "node-b-forged");
    let cfg_forged = b_node(&forged, &pki.ca, pb, &up);
    // (in TLS 1.3 the client checks the server's certificate before it presents its
    // own: a refuses the forged node before that node sees a's certificate)
    let _forged = Fedport::start(&cfg_forged.replace(&trust_domain("fed.test", &pki.ca), ""));
    let a = Fedport::start(&a_cfg);
    // a peer is taken as up until a's first probe of it fails
    crate::support::wait_until(
        "a's probe refuses the forged node",
        std::time::Duration::from_secs(10),
        || a.metric(r#"fedport_peer_up{peer="b"}"#) == 0.0,
    );
    let (code, v) = federation::get(&pki, pa, "far", &[]);
    assert_eq!(code, 503, "{v}");
    assert_eq!(up.hits(), 1, "nothing reached the forged node's service");
    let log = a.log_text();
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "a refused the forged node's certificate itself: {log}"
    );
}

/// Each domain's bundle rotates on its own, without a restart: C's bundle, rotated to a
/// new CA, takes effect for C's callers while B's file is broken. B's callers are
/// refused meanwhile (a bundle or CRL that no longer loads must not leave an older one
/// admitting what may since have been revoked), and admitted again once B's file is
/// whole; the node's own callers are served throughout.
#[test]
fn each_domains_bundle_rotates_on_its_own() {
    let pki = Pki::new();
    let b = Authority::new("b.example CA").unwrap();
    let b_ca = b.write_ca(pki.path(), "b-ca").unwrap();
    let c1 = Authority::new("c.example CA 1").unwrap();
    let c2 = Authority::new("c.example CA 2").unwrap();
    let c_ca = c1.write_ca(pki.path(), "c-ca").unwrap();
    let b_alice = issue(&pki, &b, "b-alice", "spiffe://b.example/client/alice");
    let c_old = issue(&pki, &c1, "c-old", "spiffe://c.example/client/carol");
    let c_new = issue(&pki, &c2, "c-new", "spiffe://c.example/client/carol");
    let up = upstream::start(Proto::H2c);
    let service = format!(
        "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n",
        up.url(Proto::H2c)
    );
    let fp = Fedport::start(&format!(
        "{}\n{}{}",
        node_config(&pki, &service),
        trust_domain("b.example", &b_ca),
        trust_domain("c.example", &c_ca)
    ));
    let port = fp.port("internal");
    let status = |who: &IssuedFiles| curl_as(&pki, &who.cert, &who.key, port).0;
    assert_eq!(
        (status(&b_alice), status(&c_old), status(&c_new)),
        (200, 200, 0)
    );

    // B's file broken, C's rotated to its new CA
    std::fs::write(&b_ca, "not a certificate\n").unwrap();
    std::fs::write(&c_ca, c2.cert_pem()).unwrap();
    crate::support::wait_until(
        "C's new CA in use",
        std::time::Duration::from_secs(10),
        || status(&c_new) == 200,
    );
    assert_eq!(status(&c_old), 0, "C's old CA no longer vouches");
    assert_eq!(status(&b_alice), 0, "B's broken bundle vouches for nothing");
    assert_eq!(status(&pki.client), 200);
    std::fs::write(&b_ca, b.cert_pem()).unwrap();
    crate::support::wait_until(
        "B's bundle whole again",
        std::time::Duration::from_secs(10),
        || status(&b_alice) == 200,
    );
    assert_eq!(status(&c_new), 200);
}
