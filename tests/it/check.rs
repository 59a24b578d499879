//! `fedport check` run as a user would: every broken fixture prints its expected
//! `file:line:col` messages and exits 1; the DESIGN.md config is accepted as written.

use crate::support::Pki;
use std::path::Path;
use std::process::Command;

fn check(file: &Path) -> (i32, String) {
    let out = Command::new(crate::support::bin())
        .arg("check")
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_broken_fixture_is_refused_with_its_positions_and_hints() {
    let pki = Pki::new();
    let dir = pki.path();
    std::fs::write(
        dir.join("broken.proto"),
        "syntax = \"proto3\";\nmessage A { string x = 1 }\n",
    )
    .unwrap();
    std::fs::write(dir.join("broken.json"), "{\n  \"type\": \"object\",\n}\n").unwrap();
    std::fs::write(
        dir.join("bad-schema.json"),
        "{\n  \"properties\": {\n    \"sku\": { \"type\": 5 }\n  }\n}\n",
    )
    .unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check");
    let mut seen = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("{DIR}", &dir.display().to_string());
        let target = dir.join(&name);
        std::fs::write(&target, &text).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expects.is_empty(), "{name} has no # expect: line");
        let (code, stderr) = check(&target);
        assert_eq!(code, 1, "{name} must be refused:\n{stderr}");
        for e in &expects {
            let want = format!("{}:{e}", target.display());
            assert!(
                stderr.contains(&want),
                "{name}: expected\n  {want}\nin:\n{stderr}"
            );
        }
        let errors = stderr.lines().filter(|l| l.contains(": error: ")).count();
        assert_eq!(
            errors,
            expects.len(),
            "{name}: every error is expected:\n{stderr}"
        );
        assert_eq!(
            stderr.matches("\n  hint: ").count() + usize::from(stderr.starts_with("  hint: ")),
            stderr
                .lines()
                .filter(|l| l.contains(": error: ") || l.contains(": warning: "))
                .count(),
            "{name}: every problem has a hint:\n{stderr}"
        );
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} fixtures");
}

#[test]
fn the_design_config_is_accepted_as_written() {
    let pki = Pki::new();
    let dir = pki.path();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    std::fs::create_dir_all(dir.join("protos")).unwrap();
    std::fs::create_dir_all(dir.join("schemas")).unwrap();
    // the node of the design's own trust domain, as its peers are
    let node = pki
        .authority
        .issue(&fedport::identity::pki::LeafSpec {
            common_name: "eu-west-a".into(),
            spiffe: Some("spiffe://fed.example/node/eu-west-a".into()),
            dns: vec!["localhost".into()],
            ..Default::default()
        })
        .unwrap()
        .write(dir, "eu-west-a")
        .unwrap();
    std::fs::copy(&node.cert, dir.join("certs/eu-west-a.pem")).unwrap();
    std::fs::copy(&node.key, dir.join("certs/eu-west-a.key")).unwrap();
    std::fs::copy(&pki.ca, dir.join("certs/federation-ca.pem")).unwrap();
    std::fs::copy(
        examples.join("protos/orders.proto"),
        dir.join("protos/orders.proto"),
    )
    .unwrap();
    std::fs::copy(
        examples.join("schemas/reserve.json"),
        dir.join("schemas/reserve.json"),
    )
    .unwrap();
    let cfg = dir.join("fedport.toml");
    std::fs::copy(examples.join("fedport.toml"), &cfg).unwrap();
    let out = Command::new(crate::support::bin())
        .arg("check")
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("ok (3 listeners, 2 services, 1 peers, 1 rules"));

    // the same file, one key misspelt: refused with the position of the key
    let bad = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("timeout   = \"2s\"", "timout = \"2s\"");
    std::fs::write(&cfg, bad).unwrap();
    let (code, stderr) = check(&cfg);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("fedport.toml:36:1: error: unknown field `timout`"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_broken_config_with_the_same_positions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[node]\nname = \"a\"\nregion = \"r\"\nworkers = 0\n").unwrap();
    let out = Command::new(crate::support::bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:4:11: error: workers must be between 1 and 1024"),
        "{stderr}"
    );
}

#[test]
fn a_wildcard_allowlist_on_a_peer_listener_is_a_warning() {
    let pki = Pki::new();
    let cfg = pki.path().join("wide.toml");
    let text = format!(
        "[node]\nname = \"a\"\nregion = \"r\"\n{}\n[[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:7443\"\nallow = [\"10.0.0.0/8\", \"0.0.0.0/0\"]\n",
        pki.tls_section()
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, stderr) = check(&cfg);
    assert_eq!(code, 0, "a warning does not refuse: {stderr}");
    assert!(
        stderr.contains(
            "wide.toml:12:24: warning: peer listener \"internal\" admits every address (0.0.0.0/0)"
        ),
        "{stderr}"
    );
    let out = Command::new(crate::support::bin())
        .args(["check", "--deny-warnings"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "--deny-warnings refuses it");
}

/// Rules and `idempotent` entries whose meaning changed when paths came to be matched
/// at `/` boundaries and verbs case-sensitively: `check` names each one.
#[test]
fn check_names_what_changed_in_a_rules_meaning() {
    let pki = Pki::new();
    let dir = pki.path();
    std::fs::write(dir.join("item.json"), "{\"type\": \"object\"}\n").unwrap();
    let cfg = dir.join("old.toml");
    let text = format!(
        "[node]\nname = \"a\"\nregion = \"r\"\n{}\n[[listener]]\nname = \"internal\"\nbind = \"127.0.0.1:7443\"\n\
         [[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"http://127.0.0.1:8080\"]\n\
         schema = {{ json = {{ \"POST /v1/items/{{id}}\" = \"{}/item.json\" }} }}\n\
         idempotent = [\"POST /v1/item\", \"post /v1/search\"]\n\
         [[allow]]\nfrom = \"spiffe://fed.test/client/*\"\nto = \"orders\"\nmethods = [\"POST /v1/item\", \"POST /v1/items\", \"get /v1/x\"]\n",
        pki.tls_section(),
        dir.display()
    );
    std::fs::write(&cfg, &text).unwrap();
    let (code, stderr) = check(&cfg);
    assert_eq!(code, 0, "warnings only: {stderr}");
    let line = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let (idem, rule) = (line("idempotent = "), line("methods = "));
    for want in [
        format!("old.toml:{idem}:15: warning: this idempotent entry used to match \"POST /v1/items/{{id}}\" as a prefix of its path"),
        format!("old.toml:{idem}:32: warning: this idempotent entry matches nothing: methods are case-sensitive"),
        format!("old.toml:{rule}:12: warning: this rule entry used to match \"POST /v1/items/{{id}}\" as a prefix of its path"),
        format!("old.toml:{rule}:47: warning: this rule entry matches nothing: methods are case-sensitive"),
    ] {
        assert!(stderr.contains(&want), "expected\n  {want}\nin:\n{stderr}");
    }
    // `POST /v1/items` covers the route at a boundary: nothing to say of it
    assert_eq!(stderr.matches("used to match").count(), 2, "{stderr}");
    // a partial wildcard, as a glob would have been written, is refused
    std::fs::write(&cfg, text.replace("POST /v1/items\"", "POST /v1/item*\"")).unwrap();
    let (code, stderr) = check(&cfg);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("old.toml:{rule}:29: error: ")),
        "{stderr}"
    );
}

/// Every key the config accepts (a field of a `Raw*` struct in src/config/raw.rs) is
/// named in docs/config.md: adding a key without documenting it fails here.
#[test]
fn every_config_key_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let raw = std::fs::read_to_string(root.join("src/config/raw.rs")).unwrap();
    let docs = std::fs::read_to_string(root.join("docs/config.md")).unwrap();
    let mut keys = Vec::new();
    let mut in_raw = false;
    for line in raw.lines() {
        if line.starts_with("pub struct Raw") {
            in_raw = true;
        } else if line.starts_with('}') {
            in_raw = false;
        } else if in_raw {
            if let Some(rest) = line.trim().strip_prefix("pub ") {
                if let Some((name, _)) = rest.split_once(':') {
                    keys.push(name.trim().to_owned());
                }
            }
        }
    }
    assert!(keys.len() > 40, "found {} keys", keys.len());
    let word = |k: &str| {
        docs.match_indices(k).any(|(i, _)| {
            let before = docs[..i].chars().last().unwrap_or(' ');
            let after = docs[i + k.len()..].chars().next().unwrap_or(' ');
            let part = |c: char| c.is_alphanumeric() || c == '_';
            !part(before) && !part(after)
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !word(k)).collect();
    assert!(
        missing.is_empty(),
        "keys missing from docs/config.md: {missing:?}"
    );
}
