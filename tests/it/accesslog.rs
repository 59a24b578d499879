//! `access_log_file` with Debian's logrotate: JSON lines, one per request, with the
//! fields the JSON log has; rotated under load in `create` mode (SIGUSR1 reopens it)
//! with no line lost or written twice, and in `copytruncate` mode with no hole and no
//! line written twice; a writer that cannot keep up (a FIFO nobody reads, standing for
//! a stuck disk) drops lines and counts them while every request is still answered.

use crate::support::upstream::{self, Proto};
use crate::support::{wait_until, Fedport, Pki};
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn node(pki: &Pki, up: &str, log: &Path) -> Fedport {
    Fedport::start(
        &crate::support::node_config(
            pki,
            &format!("[[service]]\nname = \"up\"\nprotocol = \"http\"\nendpoints = [\"{up}\"]\n"),
        )
        .replace(
            "[node]\n",
            &format!("[node]\naccess_log_file = \"{}\"\n", log.display()),
        ),
    )
}

/// `fedport bench` through the node: `n` GETs at `rate` a second, started now.
fn load(fp: &Fedport, pki: &Pki, n: u64, rate: Option<u64>) -> std::process::Child {
    let mut c = crate::support::bench_up(fp, pki, n, (2, 4));
    if let Some(r) = rate {
        c.args(["--rate", &r.to_string()]);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(c: std::process::Child) -> serde_json::Value {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every line of the files: each must be a JSON access line; their request ids.
fn ids(files: &[std::path::PathBuf]) -> Vec<String> {
    let mut ids = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        assert!(!bytes.contains(&0), "{}: no hole of NULs", f.display());
        for line in String::from_utf8(bytes).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line}", f.display()));
            assert_eq!(v["target"], "fedport::access", "{line}");
            let fields = &v["fields"];
            for k in [
                "listener",
                "identity",
                "method",
                "path",
                "status",
                "duration_ms",
            ] {
                assert!(!fields[k].is_null(), "{k} in {line}");
            }
            ids.push(fields["request_id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

fn logrotate(dir: &Path, conf: &str) {
    let c = dir.join("logrotate.conf");
    std::fs::write(&c, conf).unwrap();
    let out = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(dir.join("logrotate.state"))
        .arg(&c)
        .output()
        .expect("logrotate (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rotated(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = (1..=5)
        .map(|i| dir.join(format!("access.log.{i}")))
        .collect();
    v.push(dir.join("access.log"));
    v
}

/// A node whose access lines go to `DIR/access.log`, with its service's upstream.
fn logging_node() -> (
    Pki,
    upstream::Upstream,
    std::path::PathBuf,
    std::path::PathBuf,
    Fedport,
) {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let dir = pki.path().join("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let fp = node(&pki, &up.url(Proto::H2c), &log);
    (pki, up, dir, log, fp)
}

#[test]
fn rotated_by_logrotate_create_no_line_is_lost_or_doubled() {
    let (pki, _up, dir, log, fp) = logging_node();
    let conf = format!(
        "{} {{\n  rotate 5\n  create 0640\n  missingok\n  postrotate\n    kill -USR1 {}\n  endscript\n}}\n",
        log.display(),
        fp.pid()
    );
    let bench = load(&fp, &pki, 3000, Some(600));
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        logrotate(&dir, &conf);
    }
    let v = finished(bench);
    assert_eq!(v["errors"], 0, "{v}");
    let answered = v["outcomes"]["200"].as_u64().unwrap();
    assert_eq!(answered, 3000, "{v}");
    wait_until("every line written", Duration::from_secs(5), || {
        ids(&rotated(&dir)).len() as u64 >= answered
    });
    std::thread::sleep(Duration::from_millis(500));
    let all = ids(&rotated(&dir));
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(
        all.len() as u64,
        answered,
        "one line per request, none lost"
    );
    assert_eq!(unique.len(), all.len(), "none written twice");
    assert!(dir.join("access.log.3").exists(), "three rotations");
    for f in &rotated(&dir)[..3] {
        assert!(
            ids(std::slice::from_ref(f)).len() > 100,
            "{} has lines of its own",
            f.display()
        );
    }
    assert!(fp
        .log_text()
        .contains("SIGUSR1: reopening the access log file"));
    assert_eq!(fp.metric("fedport_access_log_lines_total"), answered as f64);
    assert_eq!(fp.metric("fedport_access_log_lines_dropped_total"), 0.0);
}

#[test]
fn rotated_by_logrotate_copytruncate_no_hole_and_no_line_doubled() {
    let (pki, _up, dir, log, fp) = logging_node();
    let conf = format!(
        "{} {{\n  rotate 5\n  copytruncate\n  missingok\n}}\n",
        log.display()
    );
    // a quiet rotation: every line is in one file or the other, exactly once
    let v = finished(load(&fp, &pki, 500, None));
    assert_eq!(v["errors"], 0, "{v}");
    wait_until("500 lines", Duration::from_secs(5), || {
        ids(std::slice::from_ref(&log)).len() == 500
    });
    logrotate(&dir, &conf);
    let v = finished(load(&fp, &pki, 500, None));
    assert_eq!(v["errors"], 0, "{v}");
    wait_until("500 more", Duration::from_secs(5), || {
        ids(std::slice::from_ref(&log)).len() == 500
    });
    assert_eq!(ids(&[dir.join("access.log.1")]).len(), 500);
    // under load: the file is appended to, so lines after the truncation start at its
    // new end (no hole); a line written between logrotate's copy and its truncation is
    // lost, as with any program under copytruncate, but none is written twice
    let bench = load(&fp, &pki, 2000, Some(500));
    std::thread::sleep(Duration::from_secs(2));
    logrotate(&dir, &conf);
    let v = finished(bench);
    assert_eq!(v["errors"], 0, "{v}");
    std::thread::sleep(Duration::from_millis(700));
    let all = ids(&rotated(&dir));
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "none written twice");
    assert!(
        all.len() >= 2900,
        "at most the copy's window is lost: {}",
        all.len()
    );
    assert!(
        ids(std::slice::from_ref(&log)).len() > 100,
        "lines after the truncation"
    );
    // the file is what `plan --replay` reads, as the JSON log is
    let replay = Command::new(crate::support::bin())
        .arg("plan")
        .arg(&fp.config)
        .arg(&fp.config)
        .arg("--replay")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        replay.status.code(),
        Some(0),
        "read, and nothing changes: {}{}",
        String::from_utf8_lossy(&replay.stdout),
        String::from_utf8_lossy(&replay.stderr)
    );
}

#[test]
fn a_writer_that_falls_behind_drops_and_counts_lines_and_never_holds_a_request() {
    let pki = Pki::new();
    let up = upstream::start(Proto::H2c);
    let fifo = pki.path().join("access.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // a reader that holds the FIFO open and never reads: the writer's writes block once
    // the pipe's buffer is full, as on a disk that stopped answering
    let mut reader = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import os, time; fd = os.open('{}', os.O_RDONLY | os.O_NONBLOCK); print('open', flush=True); time.sleep(120)",
                fifo.display()
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(reader.stdout.as_mut().unwrap())
            .read_line(&mut l)
            .unwrap();
        assert_eq!(l.trim(), "open");
    }
    let fp = node(&pki, &up.url(Proto::H2c), &fifo);
    let v = finished(load(&fp, &pki, 20_000, None));
    assert_eq!(v["errors"], 0, "every request answered: {v}");
    assert_eq!(v["outcomes"]["200"], 20_000, "{v}");
    wait_until("dropped lines counted", Duration::from_secs(5), || {
        fp.metric("fedport_access_log_lines_dropped_total") >= 1000.0
    });
    let written = fp.metric("fedport_access_log_lines_total");
    let dropped = fp.metric("fedport_access_log_lines_dropped_total");
    assert!(written + dropped <= 20_000.0, "{written} + {dropped}");
    assert!(
        written < 17_000.0,
        "the queue holds 16,384 lines: {written} written"
    );
    let _ = reader.kill();
    let _ = reader.wait();
}
