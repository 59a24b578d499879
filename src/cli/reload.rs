//! `fedport reload -c FILE --pid PID`: a reload that reports how it ended, for the
//! unit's `ExecReload=` (so that `systemctl reload` returns once the node has applied
//! the file or refused it, and fails when it refused it). The file is checked first: a
//! file that does not check is refused here with `file:line:col` and the node is not
//! signalled. Otherwise the node is sent SIGHUP, and its admin port is watched until its
//! count of reloads moves; the reload took if the node then runs this file's hash.

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
    #[arg(long)]
    pub pid: i32,
    /// The node's admin port; default: the file's `[admin] bind`. Without one the
    /// node is signalled and the outcome is not waited for.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// How long to wait for the node to have reloaded.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// The node's count of reloads (both outcomes), from its metrics.
fn reloads(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fedport_config_reloads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn running_hash(admin: SocketAddr) -> Result<String, CliError> {
    let body = crate::top::fetch(admin, "/config").map_err(CliError::Top)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    Ok(v["hash"].as_str().unwrap_or_default().to_owned())
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
    let before = match admin {
        Some(addr) => Some(reloads(&crate::top::scrape(addr).map_err(CliError::Top)?)),
        None => None,
    };
    // SAFETY: kill(2) with a pid and a signal number; no memory is shared
    if unsafe { libc::kill(a.pid, libc::SIGHUP) } != 0 {
        return Err(CliError::Io(
            format!("signal pid {}", a.pid),
            std::io::Error::last_os_error(),
        ));
    }
    let (Some(addr), Some(before)) = (admin, before) else {
        println!(
            "{}: checked; SIGHUP sent to {} (no admin port: its outcome is in the node's log)",
            a.config.display(),
            a.pid
        );
        return Ok(0);
    };
    let deadline = Instant::now() + Duration::from_secs(a.timeout_s);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = crate::top::scrape(addr).map(|m| reloads(&m));
        if now.is_ok_and(|n| n > before) {
            break;
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
    }
    let hash = running_hash(addr)?;
    if hash == cfg.hash {
        println!(
            "{}: reloaded; the node runs it (hash {hash})",
            a.config.display()
        );
        Ok(0)
    } else {
        eprintln!(
            "{}: the node refused it (why is in its log and in fedport_config_reloads_total{{result=\"error\"}}); it serves on with hash {hash}",
            a.config.display()
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
        assert_eq!(super::reloads(m), 5.0);
    }
}
