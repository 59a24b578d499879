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

/// The node's last SIGHUP reload, from `/config`: (number, config outcome, TLS
/// outcome, hash running after it).
fn last_reload(admin: SocketAddr) -> Result<(u64, String, String, String), CliError> {
    let body = crate::top::fetch(admin, "/config").map_err(CliError::Top)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let r = &v["reload"];
    let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    Ok((
        r["seq"].as_u64().unwrap_or(0),
        text("config"),
        text("tls"),
        text("hash"),
    ))
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
    // what the node said of its last SIGHUP before this one; without it (no admin port,
    // or one that does not answer) the node is signalled all the same, unconfirmed
    let before = admin.and_then(|addr| last_reload(addr).ok().map(|r| (addr, r.0)));
    // SAFETY: kill(2) with a pid (at least 1: never a process group) and a signal number
    if unsafe { libc::kill(a.pid, libc::SIGHUP) } != 0 {
        return Err(CliError::Io(
            format!("signal pid {}", a.pid),
            std::io::Error::last_os_error(),
        ));
    }
    let Some((addr, seq)) = before else {
        eprintln!(
            "{}: checked; SIGHUP sent to {}, its outcome unconfirmed (no admin port answered: it is in the node's log)",
            a.config.display(),
            a.pid
        );
        return Ok(0);
    };
    // this SIGHUP's outcome: the node numbers each, so that a reload its file watcher
    // made meanwhile is not taken for it
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    let (config, tls, hash) = loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok((n, config, tls, hash)) = last_reload(addr) {
            if n > seq {
                break (config, tls, hash);
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "{}: SIGHUP sent to {}, but the node at {addr} has not reloaded within {} s",
                a.config.display(),
                a.pid,
                a.timeout_s
            );
            return Ok(1);
        }
    };
    if config == "ok" && tls != "error" && hash == cfg.hash {
        println!(
            "{}: reloaded; the node runs it (hash {hash}; TLS material {tls})",
            a.config.display()
        );
        Ok(0)
    } else {
        eprintln!(
            "{}: the node refused it (configuration {config}, TLS material {tls}; why is in its log); it serves on with hash {hash}",
            a.config.display()
        );
        Ok(1)
    }
}
