//! `plan OLD NEW --replay FILE`: every request of a JSON access log (`fedport run
//! --log-format json` with `access_log` on) decided under both configurations
//! (`proxy::replay`), and what changes grouped by identity, service and method, with
//! counts and the first and last time seen.

use crate::config::Config;
use crate::proxy::replay::{Judge, Outcome, Recorded};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::Arc;

/// Groups listed at most (identity × service × call); the rest count as "(other calls)".
const MAX_GROUPS: usize = 10_000;
/// An access line is far shorter; a longer line is skipped.
const MAX_LINE: usize = 64 << 10;

/// A group of recorded requests whose decision changes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Shift {
    /// `lose` (served before, not after), `gain` (the reverse) or `change` (another
    /// refusal, or audited ↔ allowed).
    pub kind: &'static str,
    pub identity: String,
    pub service: String,
    pub method: String,
    pub old: &'static str,
    pub new: &'static str,
    pub requests: u64,
    pub first_seen: String,
    pub last_seen: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Replay {
    /// Access log lines read as requests.
    pub requests: u64,
    /// Lines that are not access lines of fedport's JSON log, or lack a field.
    pub skipped: u64,
    pub shifts: Vec<Shift>,
}

/// A JSON log line as an access record and its time.
fn record(line: &str) -> Option<(Recorded, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["target"] != "fedport::access" {
        return None;
    }
    let f = &v["fields"];
    let s = |k: &str| f[k].as_str().map(str::to_owned);
    // fields the log writes quoted (as the caller sent them): their text
    let q = |k: &str| {
        s(k).map(|v| {
            if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                serde_json::from_str::<String>(&v).unwrap_or(v)
            } else {
                v
            }
        })
    };
    Some((
        Recorded {
            listener: s("listener")?,
            identity: s("identity")?,
            method: s("method")?,
            path: s("path")?,
            authority: q("authority").unwrap_or_default(),
            fed_service: q("fed_service").unwrap_or_default(),
            content_type: q("content_type").unwrap_or_default(),
        },
        v["timestamp"].as_str().unwrap_or("").to_owned(),
    ))
}

/// Decides every access line of `log` under `old` and `new`.
pub fn replay(old: Arc<Config>, new: Arc<Config>, log: impl BufRead) -> std::io::Result<Replay> {
    let (a, b) = (Judge::new(old), Judge::new(new));
    let mut out = Replay::default();
    type Key = (String, String, String, Outcome, Outcome);
    let mut groups: BTreeMap<Key, (u64, String, String)> = BTreeMap::new();
    let mut log = log;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if log.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        // a line that is not text, or longer than any access line, is no request
        let Some(line) = std::str::from_utf8(&buf)
            .ok()
            .filter(|l| l.len() <= MAX_LINE)
        else {
            out.skipped += 1;
            continue;
        };
        let Some((r, at)) = record(line) else {
            // other log lines are not requests; an access line missing a field is
            if line.contains("\"fedport::access\"") {
                out.skipped += 1;
            }
            continue;
        };
        out.requests += 1;
        let (va, vb) = (a.judge(&r), b.judge(&r));
        if va.outcome == vb.outcome {
            continue;
        }
        let service = match (va.service, vb.service) {
            (Some(a), Some(b)) if a != b => format!("{a} → {b}"),
            (a, b) => b.or(a).unwrap_or_else(|| "-".into()),
        };
        let method = if vb.method == va.method {
            vb.method
        } else {
            va.method
        };
        let mut key = (r.identity, service, method, va.outcome, vb.outcome);
        // bounded: past MAX_GROUPS, a new group's calls count under "(other calls)"
        if groups.len() >= MAX_GROUPS && !groups.contains_key(&key) {
            key.2 = "(other calls)".into();
        }
        let g = groups
            .entry(key)
            .or_insert_with(|| (0, at.clone(), at.clone()));
        g.0 += 1;
        if at < g.1 {
            g.1 = at.clone();
        }
        if at > g.2 {
            g.2 = at;
        }
    }
    out.shifts = groups
        .into_iter()
        .map(
            |((identity, service, method, o, n), (requests, first, last))| Shift {
                kind: match (o.served(), n.served()) {
                    (true, false) => "lose",
                    (false, true) => "gain",
                    _ => "change",
                },
                identity,
                service,
                method,
                old: o.label(),
                new: n.label(),
                requests,
                first_seen: first,
                last_seen: last,
            },
        )
        .collect();
    Ok(out)
}

/// The replay as text, losses first.
pub fn replay_text(r: &Replay) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "\nReplayed {} recorded request(s){}:\n",
        r.requests,
        if r.skipped > 0 {
            format!(" ({} access line(s) unreadable, skipped)", r.skipped)
        } else {
            String::new()
        }
    );
    if r.shifts.is_empty() {
        s.push_str("  every one is decided the same way\n");
        return s;
    }
    for kind in ["lose", "gain", "change"] {
        for x in r.shifts.iter().filter(|x| x.kind == kind) {
            let (mark, verb) = match kind {
                "lose" => ('-', "loses"),
                "gain" => ('+', "gains"),
                _ => ('~', "is decided otherwise for"),
            };
            let _ = writeln!(
                s,
                "{mark} {} {verb} {} {}: {} request(s), {} → {}, first {} last {}",
                x.identity,
                x.service,
                x.method,
                x.requests,
                x.old,
                x.new,
                x.first_seen,
                x.last_seen
            );
        }
    }
    s
}
