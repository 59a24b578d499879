//! Bundle exchange (SPIFFE federation) between two organisations with their own CAs
//! (rcgen): the federation's node (`fed.test`) serves its bundle; organisation B's node
//! (`b.example`) fetches it, admits `fed.test` callers by it, follows its rotation
//! within the refresh hint, and keeps the last good bundle through an outage and a
//! restart. Bundles are also read and written by py-spiffe, PyJWT and `cryptography`.

use crate::support::upstream::{self, Proto};
use crate::support::{curl, node_config, node_config_with_rules, wait_until, Fedport, Pki};
use fedport::identity::pki::{Authority, IssuedFiles, LeafSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Organisation B: its CA and its node's certificate (`spiffe://b.example/node/b`).
struct OrgB {
    ca: PathBuf,
    node: IssuedFiles,
}

fn org_b(pki: &Pki) -> OrgB {
    let b = Authority::new("b.example CA").unwrap();
    let ca = b.write_ca(pki.path(), "b-ca").unwrap();
    let node = b
        .issue(&LeafSpec {
            common_name: "b".into(),
            spiffe: Some("spiffe://b.example/node/b".into()),
            dns: vec!["localhost".into()],
            ips: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), "b-node")
        .unwrap();
    OrgB { ca, node }
}

/// B's node: its own `[tls]`, a service, `fed.test` callers allowed, and `domain` (a
/// `[[trust_domain]]` for `fed.test`).
fn b_config(pki: &Pki, b: &OrgB, up: &upstream::Upstream, domain: &str) -> String {
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        b.node.cert.display(),
        b.node.key.display(),
        b.ca.display()
    );
    node_config_with_rules(
        pki,
        &format!(
            "[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{}\"]\n{domain}",
            up.url(Proto::H2c)
        ),
        "[[allow]]\nfrom = \"spiffe://fed.test/client/*\"\nto = \"up\"\n",
    )
    .replace(&pki.tls_section(), &tls)
}

/// A `fed.test` caller's call to B's node: (HTTP status, curl's exit code).
fn call_b(b: &OrgB, who: &IssuedFiles, port: u16) -> (u16, i32) {
    let url = format!("https://localhost:{port}/x");
    let (status, _, rc) =
        crate::support::curl_tls(&b.ca, &who.cert, &who.key, &["-H", "fed-service: up", &url]);
    (status, rc)
}

fn py(args: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/spiffe_bundle.py");
    Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap()
}

/// Reads a bundle with PyJWT, `cryptography` and py-spiffe: what they saw.
fn read_with_libraries(file: &Path, domain: &str) -> serde_json::Value {
    let out = py(&["check", &file.display().to_string(), domain]);
    assert!(
        out.status.success(),
        "the libraries refused the bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The federation's node serves its bundle; B's node fetches it over https_spiffe
/// (bootstrapped once, by hand, from what curl fetched), admits the federation's
/// callers by it, takes a rotation within the refresh hint, and keeps the last good
/// bundle through the server's outage and its own restart.
#[test]
fn a_served_bundle_is_fetched_rotated_and_kept_through_an_outage() {
    let pki = Pki::new();
    let b = org_b(&pki);
    let a_cfg = format!(
        "{}\n[bundle_endpoint]\nbind = \"127.0.0.1:0\"\nrefresh_hint = \"2s\"\n",
        node_config(&pki, "")
    );
    let a = Fedport::start(&a_cfg);
    let bundle_port = a.port("bundle_endpoint");
    let url = format!("https://localhost:{bundle_port}/");

    // what a stranger fetches: no client certificate asked for, the node's certificate
    // shown; read by libraries nobody here wrote
    let first = pki.path().join("fetched.json");
    let ca = pki.ca.display().to_string();
    let (status, body, rc) = curl(&["--cacert", &ca, &url]);
    assert_eq!((status, rc), (200, 0), "{body}");
    std::fs::write(&first, &body).unwrap();
    let seen = read_with_libraries(&first, "fed.test");
    assert_eq!(seen["keys"], 1, "{seen}");
    assert_eq!(seen["refresh_hint"], 2, "{seen}");
    assert_eq!(seen["authorities"][0], "CN=fedport test CA", "{seen}");
    let (status, _, _) = curl(&["--cacert", &ca, &format!("{url}other")]);
    assert_eq!(status, 404);

    // B bootstraps once from that, then fetches by itself
    let kept = pki.path().join("fed-bundle.json");
    std::fs::write(&kept, &body).unwrap();
    let up = upstream::start(Proto::H2c);
    let domain = format!(
        "[[trust_domain]]\nname = \"fed.test\"\nbundle = \"{}\"\n\
         bundle_endpoint = {{ url = \"{url}\", profile = \"https_spiffe\", spiffe_id = \"spiffe://fed.test/node/a\" }}\n",
        kept.display()
    );
    let b_cfg = b_config(&pki, &b, &up, &domain);
    let fb = Fedport::start(&b_cfg);
    let port = fb.port("internal");
    assert_eq!(call_b(&b, &pki.client, port).0, 200, "{}", fb.log_text());
    let fetched =
        r#"fedport_trust_bundle_fetches_total{trust_domain="fed.test",result="unchanged"}"#;
    wait_until("a fetch", Duration::from_secs(10), || {
        fb.metric(fetched) >= 1.0
    });

    // the federation rotates its CA: the new one is added to [tls] ca
    std::thread::sleep(Duration::from_millis(1100)); // a later modification second
    let next = Authority::new("fedport test CA 2").unwrap();
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&pki.ca).unwrap(),
        next.cert_pem()
    );
    let newcomer = next
        .issue(&LeafSpec {
            common_name: "nina".into(),
            spiffe: Some("spiffe://fed.test/client/nina".into()),
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), "nina")
        .unwrap();
    let (status, rc) = call_b(&b, &newcomer, port);
    assert!(status == 0 && rc != 0, "not before the rotation reaches B");
    std::fs::write(&pki.ca, both).unwrap();
    let rotated = Instant::now();
    wait_until("the rotation reaches B", Duration::from_secs(20), || {
        call_b(&b, &newcomer, port).0 == 200
    });
    let took = rotated.elapsed();
    eprintln!("the rotation reached B after {took:?} (refresh hint 2 s)");
    // within the hint, B's TLS reload (1 s) and slack for a loaded machine; the default
    // without a hint would be 5 minutes
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(call_b(&b, &pki.client, port).0, 200);
    assert_eq!(read_with_libraries(&kept, "fed.test")["keys"], 2);
    let v: serde_json::Value = serde_json::from_str(&fb.admin_get("/readyz?verbose")).unwrap();
    let st = &v["trust_bundles"]["fed.test"];
    assert_eq!(st["profile"], "https_spiffe", "{v}");
    assert_eq!(st["authorities"], 2, "{v}");
    assert_eq!(st["stale"], false, "{v}");
    assert!(
        fb.metric(
            r#"fedport_trust_bundle_fetches_total{trust_domain="fed.test",result="updated"}"#
        ) >= 1.0
    );

    // the server goes away: the last good bundle keeps admitting, and B says so
    drop(a);
    let unreachable =
        r#"fedport_trust_bundle_fetches_total{trust_domain="fed.test",result="unreachable"}"#;
    wait_until("a failed fetch", Duration::from_secs(10), || {
        fb.metric(unreachable) >= 1.0
    });
    assert_eq!(
        fb.metric(r#"fedport_trust_bundle_stale{trust_domain="fed.test"}"#),
        1.0
    );
    let v: serde_json::Value = serde_json::from_str(&fb.admin_get("/readyz?verbose")).unwrap();
    let st = &v["trust_bundles"]["fed.test"];
    assert_eq!(st["stale"], true, "{v}");
    assert!(
        st["last_error"].as_str().unwrap().contains("connect"),
        "{v}"
    );
    assert_eq!(
        v["ready"], true,
        "an outage of the endpoint does not unready the node"
    );
    assert_eq!(call_b(&b, &newcomer, port).0, 200);
    assert_eq!(call_b(&b, &pki.client, port).0, 200);
    // and through B's restart: the bundle is kept in its file
    drop(fb);
    let fb = Fedport::start(&b_cfg);
    let port = fb.port("internal");
    assert_eq!(call_b(&b, &newcomer, port).0, 200, "{}", fb.log_text());
    // a stranger's certificate is still refused
    let (status, rc) = call_b(&b, &pki.stranger, port);
    assert!(status == 0 && rc != 0);
}

/// An https_web endpoint (a Web PKI certificate, checked against the system's roots:
/// here SSL_CERT_FILE) serving a bundle another implementation wrote, with a jwt-svid
/// key beside the X.509 ones. A bundle with an older spiffe_sequence than the one held
/// is refused, and one that is not a bundle too; the held one keeps serving.
#[test]
fn an_https_web_endpoint_is_followed_and_an_older_sequence_refused() {
    let pki = Pki::new();
    let b = org_b(&pki);
    let web = Authority::new("web root").unwrap();
    let web_root = web.write_ca(pki.path(), "web-root").unwrap();
    let site = web
        .issue(&LeafSpec {
            common_name: "localhost".into(),
            dns: vec!["localhost".into()],
            ..Default::default()
        })
        .unwrap()
        .write(pki.path(), "web-site")
        .unwrap();
    let served = pki.path().join("served.json");
    let make = |seq: &str, cas: &[&Path]| {
        let mut args = vec![
            "make".to_owned(),
            served.display().to_string(),
            seq.to_owned(),
            "1".to_owned(),
        ];
        args.extend(cas.iter().map(|c| c.display().to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(py(&refs).status.success());
    };
    make("5", &[&pki.ca]);
    let (cert, key, file) = (
        site.cert.display().to_string(),
        site.key.display().to_string(),
        served.display().to_string(),
    );
    let server =
        crate::support::PyServer::start("spiffe_bundle.py", &["serve", &cert, &key, &file]);
    let web_port = server.port;

    let kept = pki.path().join("fed-bundle.json");
    let up = upstream::start(Proto::H2c);
    let domain = format!(
        "[[trust_domain]]\nname = \"fed.test\"\nbundle = \"{}\"\n\
         bundle_endpoint = {{ url = \"https://localhost:{web_port}/bundle\", profile = \"https_web\" }}\n",
        kept.display()
    );
    let mut cmd = Command::new("env");
    cmd.arg(format!("SSL_CERT_FILE={}", web_root.display()))
        .arg(crate::support::bin());
    // no bundle yet: `check` warns, and the domain is refused until the first fetch
    let fb = Fedport::start_by(cmd, &b_config(&pki, &b, &up, &domain));
    let port = fb.port("internal");
    wait_until("the first fetch", Duration::from_secs(10), || {
        call_b(&b, &pki.client, port).0 == 200
    });
    let seq = r#"fedport_trust_bundle_sequence{trust_domain="fed.test"}"#;
    assert_eq!(fb.metric(seq), 5.0);

    // an older sequence, naming another CA: refused, the held bundle kept
    let other = Authority::new("rogue CA").unwrap();
    let rogue = other.write_ca(pki.path(), "rogue").unwrap();
    make("4", &[&rogue]);
    let older =
        r#"fedport_trust_bundle_fetches_total{trust_domain="fed.test",result="older_sequence"}"#;
    wait_until("the older bundle refused", Duration::from_secs(10), || {
        fb.metric(older) >= 1.0
    });
    assert!(
        fb.log_text().contains("older than the 5 held"),
        "{}",
        fb.log_text()
    );
    assert_eq!(call_b(&b, &pki.client, port).0, 200);
    assert_eq!(fb.metric(seq), 5.0);
    // a newer bundle that holds B's own CA (public: B serves it) would let fed.test
    // vouch for B's identities: refused as invalid
    make("7", &[&pki.ca, &b.ca]);
    let invalid = r#"fedport_trust_bundle_fetches_total{trust_domain="fed.test",result="invalid"}"#;
    wait_until(
        "the bundle holding B's CA refused",
        Duration::from_secs(10),
        || fb.metric(invalid) >= 1.0,
    );
    assert_eq!(fb.metric(seq), 5.0);
    // not a bundle at all: refused as invalid
    std::fs::write(&served, "{\"keys\": []}").unwrap();
    wait_until("the empty bundle refused", Duration::from_secs(10), || {
        fb.metric(invalid) >= 2.0
    });
    let v: serde_json::Value = serde_json::from_str(&fb.admin_get("/readyz?verbose")).unwrap();
    assert!(
        v["trust_bundles"]["fed.test"]["last_error"]
            .as_str()
            .unwrap()
            .contains("x509-svid"),
        "{v}"
    );
    assert_eq!(call_b(&b, &pki.client, port).0, 200);
}

/// `check` refuses a `[[trust_domain]]` with both `ca` and `bundle`, a bundle endpoint
/// without a bundle file, one that is not https, an https_spiffe one without its
/// spiffe_id or whose own domain's first bundle is missing, an unknown profile, a
/// bundle file that is no bundle, and `[bundle_endpoint]` without [tls].
#[test]
fn check_refuses_malformed_bundle_exchange() {
    let pki = Pki::new();
    let dir = pki.path();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        "{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"AAAA\"]}]}",
    )
    .unwrap();
    let ca = dir.join("b.pem");
    Authority::new("b CA").unwrap().write_ca(dir, "b").unwrap();
    let missing = dir.join("missing.json");
    let td = |rest: &str| format!("[[trust_domain]]\nname = \"b.example\"\n{rest}\n");
    let cases = [
        (
            td(&format!("ca = \"{}\"\nbundle = \"{}\"", ca.display(), bad.display())),
            "has both ca and bundle",
        ),
        (
            td(&format!("ca = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\", profile = \"https_web\" }}", ca.display())),
            "has no bundle file to keep it in",
        ),
        (
            td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"http://b.example/\", profile = \"https_web\" }}", missing.display())),
            "is not an https:// URL",
        ),
        (
            td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\" }}", missing.display())),
            "needs the spiffe_id it presents",
        ),
        (
            td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\", spiffe_id = \"spiffe://b.example/node/x\" }}", missing.display())),
            "serves its own bundle over https_spiffe",
        ),
        (
            td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\", profile = \"https\" }}", missing.display())),
            "is neither https_spiffe nor https_web",
        ),
        (
            td(&format!("bundle = \"{}\"", bad.display())),
            "x5c[0] is not an X.509 certificate",
        ),
        (
            format!(
                "{}[[trust_domain]]\nname = \"c.example\"\nbundle = \"{}\"\nbundle_endpoint = {{ url = \"https://c.example/\", profile = \"https_web\" }}\n",
                td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\", profile = \"https_web\" }}", missing.display())),
                dir.join(".").join("missing.json").display()
            ),
            "names the bundle file of trust domain \"b.example\"",
        ),
    ];
    for (extra, want) in cases {
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, format!("{}\n{extra}", node_config(&pki, ""))).unwrap();
        let (code, err) = crate::support::check(&cfg);
        assert_eq!(code, Some(1), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains("c.toml:"), "with its position: {err}");
    }
    // an https_web endpoint's bundle may come with the first fetch: a warning
    let cfg = dir.join("w.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n{}",
            node_config(&pki, ""),
            td(&format!("bundle = \"{}\"\nbundle_endpoint = {{ url = \"https://b.example/\", profile = \"https_web\" }}", missing.display()))
        ),
    )
    .unwrap();
    let (code, err) = crate::support::check(&cfg);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("until the first fetch"), "{err}");
    // [bundle_endpoint] without [tls]
    let cfg = dir.join("n.toml");
    std::fs::write(
        &cfg,
        "[node]\nname = \"n\"\nregion = \"r\"\n[bundle_endpoint]\nbind = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (code, err) = crate::support::check(&cfg);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no [tls] section"), "{err}");
}
