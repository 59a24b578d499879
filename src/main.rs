//! The `fedport` binary: parse the command line, start logging, dispatch, exit.

use clap::Parser;

/// mimalloc: a request's state (several KiB) is allocated and freed per request on every
/// worker thread; glibc's malloc serves sizes above its thread cache from shared bins
/// and spent ~12% of fedport's CPU there (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // a binary upgrade's handed sockets and pipe, out of the environment before any
    // thread starts
    fedport::handover::capture_env();
    let cli = fedport::cli::Cli::parse();
    fedport::telemetry::init_logging_as(cli.log_format.as_deref());
    let code = fedport::cli::dispatch(cli)?;
    std::process::exit(code)
}
