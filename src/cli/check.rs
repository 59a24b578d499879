//! `fedport check FILE`: every error and warning at once, exit 0 only when all is well.

use crate::config::{self, LoadError};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The config file.
    pub file: PathBuf,
    /// Treat warnings as errors.
    #[arg(long)]
    pub deny_warnings: bool,
}

pub fn check(a: &CheckArgs) -> i32 {
    match config::load(&a.file) {
        Ok((cfg, report)) => {
            eprint!("{report}");
            let mut warnings = report.warnings.len();
            // what `run` would raise the soft limit to on this machine
            let needed = crate::limits::nofile::needed(&cfg);
            if let Some(n) = crate::limits::nofile::current()
                .ok()
                .map(|n| n.hard)
                .filter(|h| needed > *h)
            {
                warnings += 1;
                eprintln!(
                    "{}: warning: the listeners' max_connections and the upstream connections may need {needed} file descriptors; this machine allows {n} (RLIMIT_NOFILE)\n  hint: raise the hard limit (LimitNOFILE= under systemd) or lower max_connections",
                    a.file.display()
                );
            }
            if a.deny_warnings && warnings > 0 {
                eprintln!("{}: {} warning(s), denied", a.file.display(), warnings);
                return 1;
            }
            println!(
                "{}: ok ({} listeners, {} services, {} peers, {} rules; {} warnings)",
                a.file.display(),
                cfg.listeners.len(),
                cfg.services.len(),
                cfg.peers.len(),
                cfg.rules.len(),
                warnings
            );
            0
        }
        Err(LoadError::Invalid(report)) => {
            eprint!("{report}");
            eprintln!(
                "{}: {} error(s), {} warning(s)",
                a.file.display(),
                report.errors.len(),
                report.warnings.len()
            );
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
