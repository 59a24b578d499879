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
            if a.deny_warnings && !report.warnings.is_empty() {
                eprintln!(
                    "{}: {} warning(s), denied",
                    a.file.display(),
                    report.warnings.len()
                );
                return 1;
            }
            println!(
                "{}: ok ({} listeners, {} services, {} peers, {} rules; {} warnings)",
                a.file.display(),
                cfg.listeners.len(),
                cfg.services.len(),
                cfg.peers.len(),
                cfg.rules.len(),
                report.warnings.len()
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
