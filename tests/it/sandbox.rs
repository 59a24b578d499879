//! `fedport sandbox` as a new user runs it: one command, then the commands it prints
//! work as printed (curl with a client certificate, plain curl on the local port, the
//! grpcio call, a call that crosses regions, stopping instances to watch traffic fail
//! over and come back), and the one without a certificate is refused.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_sandbox_starts_alone_and_its_printed_commands_work() {
    sandbox(&[]);
}

/// The same with `--registry etcd`: the nodes' files list no peers; they find each other
/// through a local etcd the sandbox starts, and every printed command works the same.
#[test]
fn the_sandbox_on_a_registry_works_the_same() {
    sandbox(&["--registry", "etcd"]);
}

fn sandbox(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(crate::support::bin())
        .arg("sandbox")
        .args(args)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("sandbox.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    // the reader stays alive to the end: the sandbox's stdout stays open
    let mut reader = BufReader::new(stdout);
    for line in (&mut reader).lines() {
        let line = line.unwrap();
        let done = line.starts_with("Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    let start = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no ready file; printed:\n{}\nlog:\n{}",
            lines.join("\n"),
            std::fs::read_to_string(dir.path().join("sandbox.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let commands: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("  curl") || l.starts_with("  python3"))
        .collect();
    assert!(commands.len() >= 5, "printed:\n{}", lines.join("\n"));
    let run = |cmd: &str| {
        Command::new("bash")
            .args(["-c", &format!("{} --max-time 20 -s -S", cmd.trim())])
            .output()
            .unwrap()
    };
    // 1: JSON over mTLS, routed by host name, the service sees the client's identity
    let out = run(commands[0]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"seen_peer\":\"spiffe://fed.sandbox/client/demo\""),
        "{}: {body}",
        commands[0]
    );
    // 2: without a client certificate the handshake is refused
    let out = run(commands[1]);
    assert!(!out.status.success(), "{} must fail", commands[1]);
    // 3: unknown service, 404 with a JSON reason
    let out = run(commands[2]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"reason\":\"unknown_service\""));
    // 4: the local port, plain HTTP, identity `local`
    let out = run(commands[3]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"seen_peer\":\"local\""));
    // 5: the gRPC call, routed by the services of the generated demo.proto
    let py = commands[4].trim();
    let out = Command::new("bash").args(["-c", py]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "b'\\n\\x05hello'",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 6: pricing lives only in region us: eu-a forwards it, one hop (with a registry,
    // once the nodes have found each other)
    let pricing = || {
        let out = run(commands[5]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    crate::support::wait_until("pricing through us-a", Duration::from_secs(15), || {
        pricing()["served_by"] == "pricing@us-a"
    });
    let v = pricing();
    assert_eq!(v["served_by"], "pricing@us-a", "{v}");
    assert_eq!(v["fed_hops"], "1", "{v}");
    // 7-10: failover as printed — eu-a's inventory stops, eu-b (same region) serves;
    // eu-b's stops too, us-a serves; eu-a's starts again and serves again
    let served_by = || {
        let out = run(commands[0]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["served_by"].as_str().unwrap_or("").to_owned()
    };
    assert_eq!(served_by(), "inventory@eu-a");
    for (cmd, then) in [
        (commands[6], "inventory@eu-b"),
        (commands[7], "inventory@us-a"),
        (commands[8], "inventory@eu-a"),
    ] {
        assert!(run(cmd).status.success(), "{cmd}");
        crate::support::wait_until(then, Duration::from_secs(10), || served_by() == then);
    }
    // the second organisation, with its own CA and trust domain: the inventory, and
    // nothing else
    let partner: Vec<&&String> = commands
        .iter()
        .filter(|c| c.contains("partner-client.pem"))
        .collect();
    assert_eq!(partner.len(), 2, "printed:\n{}", lines.join("\n"));
    let out = run(partner[0]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"seen_peer\":\"spiffe://partner.example/client/demo\""),
        "{}: {body}",
        partner[0]
    );
    let out = run(partner[1]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("\"reason\":\"denied\""),
        "{}: {body}",
        partner[1]
    );
    // zones, as printed: 200 catalog calls split about 80/20 between the instance in
    // eu-a's zone and the other
    let zones = lines
        .iter()
        .find(|l| l.starts_with("  for i in") && l.contains("catalog"))
        .expect("the zones command");
    let out = Command::new("bash")
        .args(["-c", zones.trim()])
        .output()
        .unwrap();
    let counts = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |who: &str| -> u32 {
        counts
            .lines()
            .find(|l| l.ends_with(who))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (a, b) = (count("catalog@eu-1a"), count("catalog@eu-1b"));
    assert_eq!(a + b, 200, "{counts}");
    assert!(
        (140..=180).contains(&a),
        "about 160 of 200 in eu-a's zone: {counts}"
    );
    // the TCP service, as printed: redis-cli on eu-a's local port reaches the key-value
    // store on us-a, carried over the peer link
    let bash = |cmd: &str| {
        let out = Command::new("bash")
            .args(["-c", cmd.trim()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let redis: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("  redis-cli"))
        .collect();
    assert_eq!(redis.len(), 2, "printed:\n{}", lines.join("\n"));
    crate::support::wait_until("kv through us-a", Duration::from_secs(15), || {
        bash(redis[0]) == "OK"
    });
    let info = bash(redis[1]);
    assert!(info.contains("served_by:kv@us-a"), "{info}");
    // without a registry eu-b dials eu-a (a reverse link), as printed; eu-b's inventory
    // was reached over it above
    let reverse: Vec<&&String> = commands.iter().filter(|c| c.contains("readyz")).collect();
    if args.is_empty() {
        assert_eq!(reverse.len(), 1, "printed:\n{}", lines.join("\n"));
        let out = bash(reverse[0]);
        assert!(out.contains("\"this_node\": \"accepts\""), "{out}");
    } else {
        assert!(reverse.is_empty());
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    drop(reader);
    assert_eq!(status.code(), Some(0), "Ctrl-C stops the sandbox cleanly");
}
