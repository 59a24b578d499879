//! The `fedport` command line: one file per subcommand, each returning an exit code.

pub mod certs;
pub mod check;
pub mod notify;
pub mod reload;
pub mod run;
pub mod sandbox;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "fedport", version, about = "The internal port of a federation")]
pub struct Cli {
    /// Log lines as `text` or `json` (one object per line); default: FEDPORT_LOG_FORMAT, else text.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(run::RunArgs),
    /// Check a config file; print every problem as file:line:col with a hint.
    Check(check::CheckArgs),
    /// Check the file, send the node SIGHUP, and wait until it has applied the file
    /// (exit 0) or refused it (exit 1; 2 when the file does not check): the unit's
    /// ExecReload.
    Reload(reload::ReloadArgs),
    /// A federation on loopback in one command: CA, certificates, demo services, three nodes.
    Sandbox(sandbox::SandboxArgs),
    /// Certificates: a federation CA, node and client certificates with SPIFFE IDs and
    /// DNS/IP SANs, another organisation's CA; prints the config lines to paste.
    Certs(certs::CertsArgs),
    /// A live view of a running node from its admin port: rates, errors, latency, spikes.
    Top(TopArgs),
    /// The port manifest: every port, protocol, TLS mode, allowlist, who may reach
    /// which services and methods, and the limits (Markdown, or JSON).
    Describe(DescribeArgs),
    /// What changing OLD to NEW does to access, ports, allowlists, limits and schemas;
    /// exit 0 when nothing, 2 when something changes.
    Plan(PlanArgs),
    /// Load generator: HTTP/2 or gRPC over mutual TLS (or h2c), closed loop by
    /// concurrency or open loop at a fixed rate, HdrHistogram latency.
    Bench(BenchArgs),
    /// Print the host firewall rules that open this config's ports to its peers and
    /// allowed ranges only (nftables, or iptables-restore input).
    Firewall(FirewallArgs),
}

#[derive(Debug, clap::Args)]
pub struct DescribeArgs {
    /// The config file.
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    pub old: PathBuf,
    pub new: PathBuf,
    #[arg(long)]
    pub json: bool,
    /// A JSON access log (`fedport --log-format json run`, `access_log` on): every
    /// request in it is decided under both configurations, and what changes is listed.
    #[arg(long)]
    pub replay: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// https://host:port/path (mTLS with --cert/--key/--ca) or http://host:port/path (h2c).
    pub url: String,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 4)]
    pub connections: usize,
    /// Concurrent streams per connection (closed loop).
    #[arg(short = 'm', long, default_value_t = 16)]
    pub streams: usize,
    /// Seconds to measure (after the warm-up).
    #[arg(short = 'd', long)]
    pub duration: Option<f64>,
    /// Requests to send in all (instead of a duration).
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Open loop: requests per second in all, latency counted from when each was due.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of traffic not measured first.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Seconds a request may take before it counts as `error:timeout`.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// The request body, from a file.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Send gRPC: the body (from --data) is one message, framed; POST with gRPC headers.
    #[arg(long)]
    pub grpc: bool,
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct FirewallArgs {
    /// The config file.
    pub file: PathBuf,
    #[arg(long, default_value = "nft", value_parser = ["nft", "iptables", "ip6tables"])]
    pub format: String,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The node's admin address (`[admin] bind`).
    #[arg(long)]
    pub admin: std::net::SocketAddr,
    /// How often to scrape, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Load(#[from] crate::config::LoadError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Pki(#[from] crate::identity::pki::PkiError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Top(crate::top::TopError),
    #[error(transparent)]
    Bench(crate::bench::BenchError),
    #[error(transparent)]
    Etcd(#[from] crate::sandbox::EtcdError),
    #[error(transparent)]
    Firewall(#[from] crate::firewall::FirewallError),
    #[error(transparent)]
    Upgrade(#[from] crate::handover::UpgradeError),
}

fn bench(a: BenchArgs) -> Result<i32, CliError> {
    let tls = match (a.cert, a.key, a.ca) {
        (Some(cert), Some(key), Some(ca)) => Some(crate::identity::TlsFiles { cert, key, ca }),
        _ => None,
    };
    let body = match &a.data {
        Some(p) => std::fs::read(p).map_err(|e| CliError::Io(p.display().to_string(), e))?,
        None => Vec::new(),
    };
    let headers = a
        .headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let method = if a.grpc { "POST" } else { a.method.as_str() };
    let plan = crate::bench::Plan {
        url: a.url,
        connections: a.connections,
        streams: a.streams,
        duration: a.duration.map(std::time::Duration::from_secs_f64),
        requests: a.requests.or(if a.duration.is_none() {
            Some(1000)
        } else {
            None
        }),
        rate: a.rate,
        warmup: std::time::Duration::from_secs_f64(a.warmup),
        timeout: std::time::Duration::from_secs_f64(a.timeout.max(0.001)),
        method: method.parse().unwrap_or(http::Method::GET),
        headers,
        body: body.into(),
        grpc: a.grpc,
        tls,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let s = crate::bench::run(plan).map_err(CliError::Bench)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        print!("{}", crate::bench::text(&s));
    }
    Ok(0)
}

/// Runs a parsed command line and returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<i32, CliError> {
    match cli.command {
        Command::Run(a) => run::run(&a),
        Command::Check(a) => Ok(check::check(&a)),
        Command::Reload(a) => reload::reload(&a),
        Command::Sandbox(a) => sandbox::sandbox(&a),
        Command::Certs(a) => certs::certs(&a),
        Command::Describe(a) => {
            let (cfg, _) = crate::config::load(&a.file)?;
            let m = crate::manifest::manifest(&cfg);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
            } else {
                print!("{}", crate::manifest::markdown(&m));
            }
            Ok(0)
        }
        Command::Plan(a) => {
            let (old, _) = crate::config::load(&a.old)?;
            let (new, _) = crate::config::load(&a.new)?;
            let changes = crate::manifest::plan(
                &crate::manifest::manifest(&old),
                &crate::manifest::manifest(&new),
            );
            let replay = match &a.replay {
                Some(p) => {
                    let f = std::fs::File::open(p)
                        .map_err(|e| CliError::Io(p.display().to_string(), e))?;
                    Some(
                        crate::manifest::replay::replay(
                            std::sync::Arc::new(old),
                            std::sync::Arc::new(new),
                            std::io::BufReader::new(f),
                        )
                        .map_err(|e| CliError::Io(p.display().to_string(), e))?,
                    )
                }
                None => None,
            };
            if let (Some(r), Some(p)) = (&replay, &a.replay) {
                // nothing read is no evidence that nothing changes
                if r.requests == 0 {
                    eprintln!("{}: no access line of fedport's JSON log (run with --log-format json and [node] access_log on)", p.display());
                    return Ok(1);
                }
            }
            if a.json {
                let mut v = serde_json::json!({ "changes": changes, "count": changes.len() });
                if let Some(r) = &replay {
                    v["replay"] = serde_json::to_value(r).unwrap_or_default();
                }
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", crate::manifest::plan_text(&changes));
                if let Some(r) = &replay {
                    print!("{}", crate::manifest::replay::replay_text(r));
                }
            }
            let shifted = replay.as_ref().is_some_and(|r| !r.shifts.is_empty());
            Ok(if changes.is_empty() && !shifted { 0 } else { 2 })
        }
        Command::Bench(a) => bench(a),
        Command::Firewall(a) => {
            let (cfg, _) = crate::config::load(&a.file)?;
            let out = match a.format.as_str() {
                "iptables" => crate::firewall::iptables(&cfg, false),
                "ip6tables" => crate::firewall::iptables(&cfg, true),
                _ => crate::firewall::nftables(&cfg),
            }?;
            print!("{out}");
            Ok(0)
        }
        Command::Top(a) => {
            crate::top::run(a.admin, std::time::Duration::from_millis(a.interval_ms))
                .map(|()| 0)
                .map_err(CliError::Top)
        }
    }
}

/// Where a ready daemon writes its bound addresses (for scripts and tests).
pub fn write_ready_file(
    path: &PathBuf,
    bound: &[(String, std::net::SocketAddr)],
    admin: Option<std::net::SocketAddr>,
) -> Result<(), CliError> {
    let listeners: serde_json::Map<String, serde_json::Value> = bound
        .iter()
        .map(|(n, a)| (n.clone(), serde_json::Value::String(a.to_string())))
        .collect();
    let body = serde_json::json!({
        "pid": std::process::id(),
        "listeners": listeners,
        "admin": admin.map(|a| a.to_string()),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string())
        .map_err(|e| CliError::Io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| CliError::Io(path.display().to_string(), e))
}
