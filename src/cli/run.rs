//! `fedport run -c FILE`: the daemon, until SIGTERM or SIGINT drains it.

use super::CliError;
use crate::config::{self, Config, LoadError};
use crate::server::Server;
use crate::telemetry::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The config file.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Once serving, write the bound addresses here as JSON.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

pub fn run(a: &RunArgs) -> Result<i32, CliError> {
    let cfg = match config::load(&a.config) {
        Ok((cfg, report)) => {
            for w in &report.warnings {
                tracing::warn!("{w}");
            }
            cfg
        }
        Err(LoadError::Invalid(report)) => {
            eprint!("{report}");
            eprintln!(
                "{}: refused, {} error(s)",
                a.config.display(),
                report.errors.len()
            );
            return Ok(2);
        }
        Err(e) => return Err(e.into()),
    };
    let ready_file = a.ready_file.clone();
    serve(Arc::new(cfg), move |bound, admin| match &ready_file {
        Some(p) => super::write_ready_file(p, bound, admin),
        None => Ok(()),
    })?;
    Ok(0)
}

/// Starts a node, calls `on_ready` with the bound addresses once it serves, and runs
/// until SIGTERM or SIGINT, then drains.
pub fn serve<F>(cfg: Arc<Config>, on_ready: F) -> Result<(), CliError>
where
    F: FnOnce(&[(String, SocketAddr)], Option<SocketAddr>) -> Result<(), CliError>,
{
    // the binary and arguments a SIGUSR2 upgrade starts again, read before the file
    // may be replaced
    let started = crate::handover::Started::now();
    let metrics = Metrics::new(&cfg.node.name, &cfg.hash);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io("runtime".into(), e))?;
    rt.block_on(async move {
        // every signal is listened for first, before anything that takes time, and by
        // one stream kept for the whole loop: a SIGHUP, SIGUSR1 (logrotate) or SIGUSR2
        // whose handler did not exist yet would end the process, and a stream made
        // anew per loop turn (as `tokio::signal::ctrl_c()` is) misses a signal that
        // lands between turns
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind| signal(kind).map_err(|e| CliError::Io("signal".into(), e));
        let (mut term, mut int, mut hup, mut usr1, mut usr2) = (
            listen(SignalKind::terminate())?,
            listen(SignalKind::interrupt())?,
            listen(SignalKind::hangup())?,
            listen(SignalKind::user_defined1())?,
            listen(SignalKind::user_defined2())?,
        );
        let server = Server::start(cfg.clone(), metrics)?;
        let io = |addr: SocketAddr| move |e| CliError::Io(format!("admin bind {addr}"), e);
        // the admin port, and a copy of its socket for an upgrade to hand over
        let mut admin_port = None;
        let (admin, admin_copy) = match cfg.admin {
            Some(addr) => {
                let l = match server.take_inherited("admin") {
                    Some(s) => s,
                    None => std::net::TcpListener::bind(addr).map_err(io(addr))?,
                };
                l.set_nonblocking(true).map_err(io(addr))?;
                let copy = l.try_clone().ok();
                let l = tokio::net::TcpListener::from_std(l).map_err(io(addr))?;
                let bound = l.local_addr().ok();
                admin_port = Some(l);
                (bound, copy)
            }
            None => (None, None),
        };
        // trust bundles: this node's served, other domains' fetched
        let mut exchange = crate::exchange::Exchange::default();
        if let Some(s) = server.take_inherited("bundle_endpoint") {
            exchange.inherit(s);
        }
        exchange
            .apply(&cfg, &server.state.bundles, &server.state.metrics)
            .map_err(|e| CliError::Io("bundle endpoint".into(), e))?;
        let mut bound = server.bound();
        if let Some(a) = exchange.bound() {
            bound.push(("bundle_endpoint".to_owned(), a));
        }
        on_ready(&bound, admin)?;
        // nothing fallible is left: accept (connections that came meanwhile waited in
        // the kernel's queue), then say so
        server.open();
        // the admin port too: a probe never meets a new binary that is not ready yet
        let mut admin_task =
            admin_port.map(|l| tokio::spawn(crate::admin::serve(l, server.state.clone())));
        for (name, addr) in &server.bound() {
            tracing::info!(listener = %name, %addr, "listening");
        }
        tracing::info!(node = %cfg.node.name, workers = cfg.node.workers, admin = ?admin, "fedport ready");
        if crate::handover::is_upgrade() {
            // started by an upgrade: the process before says so to systemd, with this
            // process's pid, once it lets go
            crate::handover::tell_parent_ready();
        } else {
            super::notify::notify("READY=1\nSTATUS=serving");
        }
        let mut upgrading: Option<crate::handover::Readiness> = None;
        let mut handed_over = false;
        // the config and certificate files are watched by polling: cheap, and it
        // survives editors' rename-and-replace and mounted-secret symlink swaps alike
        let mut poll = tokio::time::interval(std::time::Duration::from_millis(250));
        let mut watch = Watch::new(&cfg);
        let mut ticks = 0u32;
        // membership from the registry, merged into the file's configuration
        let mut file_cfg = cfg.clone();
        let (members_tx, mut members) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        let mut registry_on = false;
        let (registry_stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut registry_task = None;
        if let Some(reg) = &cfg.registry {
            match crate::registry::me(&cfg, &server.bound()) {
                Some(me) => {
                    let status = Arc::new(crate::registry::Status::default());
                    let _ = server.state.registry.set(status.clone());
                    registry_task = Some(tokio::spawn(crate::registry::run(
                        reg.clone(),
                        me,
                        members_tx,
                        status,
                        server.state.metrics.clone(),
                        stop_rx,
                    )));
                    registry_on = true;
                }
                None => tracing::error!("registry: cannot tell this node's address or identity (a peer listener and [tls] are needed); not registering"),
            }
        }
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining");
                    super::notify::notify("STOPPING=1\nSTATUS=draining");
                    break
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining");
                    super::notify::notify("STOPPING=1\nSTATUS=draining");
                    break
                }
                _ = usr2.recv() => {
                    if upgrading.is_some() {
                        tracing::warn!("SIGUSR2: an upgrade is under way already");
                        continue;
                    }
                    let mut sockets = server.listening();
                    if let Some(a) = &admin_copy {
                        use std::os::fd::AsRawFd;
                        sockets.push(("admin".to_owned(), a.as_raw_fd()));
                    }
                    if let Some(fd) = exchange.socket() {
                        sockets.push(("bundle_endpoint".to_owned(), fd));
                    }
                    tracing::info!(exe = %started_exe(&started), sockets = sockets.len(), "SIGUSR2: starting the new binary, handing it every listening socket");
                    match crate::handover::spawn(&started, &sockets) {
                        Ok(p) => upgrading = Some(Box::pin(p.ready())),
                        Err(e) => tracing::error!(error = %e, "upgrade failed; this process serves on"),
                    }
                }
                r = async { upgrading.as_mut().expect("guarded by is_some").await }, if upgrading.is_some() => {
                    upgrading = None;
                    match r {
                        Ok(pid) => {
                            tracing::info!(new_pid = pid, "upgrade: the new process is ready; this one stops accepting and drains");
                            super::notify::notify(&format!("MAINPID={pid}\nSTATUS=handed over to pid {pid}"));
                            // the admin port is the new process's alone: a probe of it
                            // never meets this draining one
                            if let Some(t) = admin_task.take() {
                                t.abort();
                            }
                            handed_over = true;
                            break;
                        }
                        Err(e) => tracing::error!(error = %e, "upgrade failed; this process serves on"),
                    }
                }
                _ = usr1.recv() => {
                    if server.reopen_access_log() {
                        tracing::info!("SIGUSR1: reopening the access log file");
                    }
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration and TLS material");
                    super::notify::reloading();
                    // asked for by hand: a refusal is reported again, even the same
                    watch.refused = None;
                    let reloaded = reload(&server, &cfg.path, &mut watch, &members.borrow());
                    let rebuilt = reloaded.is_some();
                    if let Some(c) = reloaded {
                        file_cfg = c;
                        follow(&mut exchange, &server);
                    }
                    let tls = server.reload_tls(true, !rebuilt);
                    // the text this pass read: a `fedport reload` whose SIGHUP merged
                    // into one already being handled waits for the pass that read its
                    let attempted = match (&watch.refused, rebuilt) {
                        (_, true) => watch.applied.clone(),
                        (Some((h, _, _)), false) => h.clone(),
                        (None, false) => String::new(),
                    };
                    if let Ok(mut h) = server.state.hup.lock() {
                        h.seq += 1;
                        h.config = if rebuilt { "ok" } else { "error" };
                        h.tls = tls;
                        h.attempted = attempted;
                        h.hash = file_cfg.hash.clone();
                    }
                    // the file refused or taken, the node serves: ready again
                    super::notify::notify("READY=1\nSTATUS=serving");
                }
                r = members.changed(), if registry_on => {
                    if r.is_err() {
                        registry_on = false;
                        continue;
                    }
                    // a burst of registrations is applied once
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let now = members.borrow_and_update().clone();
                    let started = std::time::Instant::now();
                    let merged = crate::registry::merge(&file_cfg, &now);
                    match server.reload(Arc::new(merged)) {
                        Ok(()) => {
                            server.state.metrics.registry_updates.inc();
                            tracing::info!(members = now.len(), took_ms = started.elapsed().as_secs_f64() * 1e3, "registry: membership applied");
                        }
                        Err(e) => tracing::error!(error = %e, "registry: membership could not be applied; the running one keeps serving"),
                    }
                }
                _ = poll.tick() => {
                    if watch.changed(&cfg.path) {
                        if let Some(c) = reload(&server, &cfg.path, &mut watch, &members.borrow()) {
                            file_cfg = c;
                            follow(&mut exchange, &server);
                        }
                    }
                    ticks += 1;
                    if ticks.is_multiple_of(4) {
                        server.reload_tls(false, true);
                    }
                }
            }
        }
        // leave the registry first, so that the other nodes stop sending new work
        // here now rather than when the lease runs out; then drain what is in flight.
        // Handed over, the lease is left to run out instead: the new process puts the
        // same key under a lease of its own, and revoking this one first would take the
        // node out of the federation in between
        if let Some(task) = registry_task {
            if handed_over {
                task.abort();
            } else {
                let _ = registry_stop.send(true);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
            }
        }
        let ender = server.ender();
        if handed_over {
            // connections end as they go idle, busy ones serve on for up to
            // upgrade_drain_timeout; SIGTERM or SIGINT meanwhile drains them at once
            server.hand_over();
        } else {
            server.drain();
        }
        let mut joined = tokio::task::spawn_blocking(move || server.join());
        loop {
            tokio::select! {
                _ = &mut joined => break,
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining the connections still open");
                    ender.drain();
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining the connections still open");
                    ender.drain();
                }
            }
        }
        tracing::info!("drained; bye");
        Ok(())
    })
}

fn started_exe(s: &crate::handover::Started) -> String {
    s.exe().display().to_string()
}

/// Notices that the config file changed, once it has stayed the same for 500 ms (an
/// editor writing in steps is read once, whole).
struct Watch {
    /// Hash of the file text now running.
    applied: String,
    /// A new text seen, and since when it has stayed the same.
    pending: Option<(String, std::time::Instant)>,
    /// A text that was refused, why, and when it was last tried.
    refused: Option<(String, String, std::time::Instant)>,
}

/// A refused file is tried again this often: what refused it may pass (a certificate
/// and key caught mid-rotation, a port briefly busy). The same refusal is not logged
/// or counted twice.
const RETRY_REFUSED: std::time::Duration = std::time::Duration::from_secs(5);

impl Watch {
    fn new(cfg: &Config) -> Self {
        Self {
            applied: cfg.hash.clone(),
            pending: None,
            refused: None,
        }
    }

    fn changed(&mut self, path: &std::path::Path) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else {
            return false;
        };
        let hash = config::text_hash(&text);
        if hash == self.applied {
            self.pending = None;
            self.refused = None;
            return false;
        }
        if let Some((h, _, tried)) = &self.refused {
            if *h == hash {
                return tried.elapsed() >= RETRY_REFUSED;
            }
        }
        match &self.pending {
            Some((h, since)) if *h == hash => {
                since.elapsed() >= std::time::Duration::from_millis(500)
            }
            _ => {
                self.pending = Some((hash, std::time::Instant::now()));
                false
            }
        }
    }

    /// Notes a refusal of the text with `hash`; whether it is news (a new text, or a
    /// new reason), to be logged and counted.
    fn refuse(&mut self, hash: String, why: &str) -> bool {
        self.pending = None;
        let news = !matches!(&self.refused, Some((h, w, _)) if *h == hash && w == why);
        self.refused = Some((hash, why.to_owned(), std::time::Instant::now()));
        news
    }
}

/// Reads, checks and swaps in the config file. A file that does not check is refused
/// with the same `file:line:col` messages as `fedport check`, counted, and the running
/// configuration keeps serving.
/// The bundle exchange follows a reloaded configuration; a bundle endpoint that cannot
/// bind is logged, and the rest serves on.
fn follow(exchange: &mut crate::exchange::Exchange, server: &Server) {
    let cfg = server.state.config.load_full();
    if let Err(e) = exchange.apply(&cfg, &server.state.bundles, &server.state.metrics) {
        tracing::error!(error = %e, "bundle endpoint cannot be served as reconfigured");
    }
}

fn reload(
    server: &Server,
    path: &std::path::Path,
    watch: &mut Watch,
    members: &[crate::registry::Member],
) -> Option<Arc<Config>> {
    let count = |result: &str| {
        server
            .state
            .metrics
            .config_reloads
            .get_or_create(&crate::telemetry::ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    };
    let started = std::time::Instant::now();
    // the text checked is the text whose hash is noted, even if the file changes
    // meanwhile
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            count("error");
            tracing::error!(error = %e, path = %path.display(), "configuration cannot be read; the running one keeps serving");
            return None;
        }
    };
    let hash = config::text_hash(&text);
    let why = match config::compile(path, &text) {
        Ok((cfg, report)) => {
            for w in &report.warnings {
                tracing::warn!("{w}");
            }
            let file = Arc::new(cfg);
            let merged = if file.registry.is_some() {
                Arc::new(crate::registry::merge(&file, members))
            } else {
                file.clone()
            };
            match server.reload(merged) {
                Ok(()) => {
                    watch.applied = hash.clone();
                    watch.pending = None;
                    watch.refused = None;
                    count("ok");
                    tracing::info!(
                        hash = %file.hash,
                        took_ms = started.elapsed().as_secs_f64() * 1e3,
                        "configuration reloaded: new connections and requests use it"
                    );
                    return Some(file);
                }
                Err(e) => e.to_string(),
            }
        }
        Err(report) => report.to_string(),
    };
    if watch.refuse(hash, &why) {
        count("error");
        tracing::error!(
            "configuration refused; the running one keeps serving (tried again every {} s):\n{}",
            RETRY_REFUSED.as_secs(),
            why.trim_end()
        );
    }
    None
}
