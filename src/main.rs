//! The `fedport` binary: parse the command line, start logging, dispatch, exit.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = fedport::cli::Cli::parse();
    fedport::telemetry::init_logging_as(cli.log_format.as_deref());
    let code = fedport::cli::dispatch(cli)?;
    std::process::exit(code)
}
