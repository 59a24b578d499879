//! `fedport reload -c FILE --pid PID`: a reload that reports how it ended, for the
//! unit's `ExecReload=` (so that `systemctl reload` returns once the node has applied
//! the file or refused it, and fails when it refused it). The file is checked first: a
//! file that does not check is refused here with `file:line:col` and the node is not
//! signalled. Otherwise the node is sent SIGHUP, and its admin port (`/config`, whose
//! `reload` numbers each SIGHUP reload and says how it went) is watched until this one
//! is done; it took if the configuration and TLS material did and the node runs this
//! file's hash.

use super::CliError;
use crate::config::{self, LoadError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// The config file the node runs.
    #[arg(short, long)]
    pub config: PathBuf,
    /// The node's process (under systemd: `$MAINPID`).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: i32,
    /// The node's admin port; default: the file's `[admin] bind`. Without one the
    /// node is signalled and the outcome is not waited for.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// How long to wait for the node to have reloaded.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// What a node says of its reloads on its admin port.
struct Seen {
    /// The number of its last SIGHUP reload; from a binary that numbers none (one
    /// before `fedport reload`, still running until upgraded), its count of reloads.
    seq: u64,
    numbered: bool,
    config: String,
    tls: String,
    /// The hash of the file text that reload read.
    attempted: String,
    /// The hash of the configuration running.
    hash: String,
}

fn seen(admin: SocketAddr) -> Result<Seen, CliError> {
    let body = crate::top::fetch(admin, "/config").map_err(CliError::Top)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let r = &v["reload"];
    let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    if r.is_object() {
        return Ok(Seen {
            seq: r["seq"].as_u64().unwrap_or(0),
            numbered: true,
            config: text("config"),
            tls: text("tls"),
            attempted: text("attempted"),
            hash: text("hash"),
        });
    }
    let metrics = crate::top::scrape(admin).map_err(CliError::Top)?;
    Ok(Seen {
        seq: reloads(&metrics),
        numbered: false,
        config: String::new(),
        tls: String::new(),
        attempted: String::new(),
        hash: v["hash"].as_str().unwrap_or_default().to_owned(),
    })
}

/// A node's count of reloads (both outcomes, SIGHUP's and its file watcher's).
fn reloads(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fedport_config_reloads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub fn reload(a: &ReloadArgs) -> Result<i32, CliError> {
    let cfg = match config::load(&a.config) {
        Ok((cfg, _)) => cfg,
        Err(LoadError::Invalid(report)) => {
            eprint!("{report}");
            eprintln!(
                "{}: refused, {} error(s); the node was not signalled and serves on as it was",
                a.config.display(),
                report.errors.len()
            );
            return Ok(2);
        }
        Err(e) => return Err(e.into()),
    };
    let admin = a.admin.or(cfg.admin);
    // what the node said before this SIGHUP; a node whose admin port does not answer is
    // signalled all the same
    let before = admin.map(|addr| (addr, seen(addr)));
    // SAFETY: kill(2) with a pid (at least 1: never a process group) and a signal number
    if unsafe { libc::kill(a.pid, libc::SIGHUP) } != 0 {
        return Err(CliError::Io(
            format!("signal pid {}", a.pid),
            std::io::Error::last_os_error(),
        ));
    }
    let (addr, before) = match before {
        None => {
            eprintln!(
                "{}: checked; SIGHUP sent to {}, its outcome unconfirmed (no admin port: it is in the node's log)",
                a.config.display(),
                a.pid
            );
            return Ok(0);
        }
        Some((_, Err(e))) => {
            eprintln!(
                "{}: checked; SIGHUP sent to {}, but its outcome is unconfirmed: {e}",
                a.config.display(),
                a.pid
            );
            return Ok(1);
        }
        Some((addr, Ok(s))) => (addr, s),
    };
    // this SIGHUP's outcome: the reload after the one seen before that read this text
    // (a reload the file watcher made meanwhile, or a SIGHUP of another's that this one
    // merged into, is not taken for it)
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let done = loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(s) = seen(addr) {
            if s.seq > before.seq && (!s.numbered || s.attempted == cfg.hash) {
                break s;
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "{}: SIGHUP sent to {}, but the node at {addr} has not reloaded this file within {} s",
                a.config.display(),
                a.pid,
                a.timeout_s
            );
            return Ok(1);
        }
    };
    let took =
        done.hash == cfg.hash && (!done.numbered || (done.config == "ok" && done.tls != "error"));
    if took {
        println!(
            "{}: reloaded; the node runs it (hash {}{})",
            a.config.display(),
            done.hash,
            if done.numbered {
                format!("; TLS material {}", done.tls)
            } else {
                String::new()
            }
        );
        Ok(0)
    } else {
        eprintln!(
            "{}: the node refused it (configuration {}, TLS material {}; why is in its log); it serves on with hash {}",
            a.config.display(),
            done.config,
            done.tls,
            done.hash
        );
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reloads_are_counted_over_both_outcomes() {
        let m = "# TYPE fedport_config_reloads counter\n\
                 fedport_config_reloads_total{node=\"a\",result=\"ok\"} 3\n\
                 fedport_config_reloads_total{node=\"a\",result=\"error\"} 2\n\
                 fedport_config_reloads_created{node=\"a\",result=\"ok\"} 1.7e9\n\
                 fedport_tls_reloads_total{node=\"a\",result=\"ok\"} 9\n";
        assert_eq!(super::reloads(m), 5);
    }
}
