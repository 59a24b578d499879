//! The daemon's shape: one thread per worker, each a single-threaded tokio runtime with
//! its own SO_REUSEPORT socket per listener and its own upstream connections; shared
//! state is read-only. A configuration is a generation: everything it needs (TLS,
//! schemas, rules, routes, pools, health) is built off the request path and handed to
//! the workers, which swap it in atomically — new connections and new requests use it,
//! requests in flight finish under the one they started with, unchanged listeners keep
//! their sockets, removed ones stop accepting and drain. Drain on SIGTERM: sockets
//! close, connections finish within the timeout.

use crate::config::{Config, Role};
use crate::identity;
use crate::listen::{self, Accepting, ListenError};
use crate::proxy::Worker;
use crate::runtime::runtime_thread;
use crate::telemetry::Metrics;
use crate::upstream;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot start worker: {0}")]
    Worker(std::io::Error),
    #[error("a lock was poisoned")]
    Poisoned,
    #[error("cannot open the access log {0}: {1}")]
    AccessLog(std::path::PathBuf, std::io::Error),
}

/// What the admin port and the CLI see of a running node.
pub struct State {
    pub config: ArcSwap<Config>,
    pub metrics: Arc<Metrics>,
    /// Health of endpoints and peers, for `/readyz?verbose`.
    pub fleet: ArcSwap<crate::federation::Fleet>,
    /// The etcd registry's state, when one is configured.
    pub registry: std::sync::OnceLock<Arc<crate::registry::Status>>,
    /// Each fetched trust bundle's state (`exchange`).
    pub bundles: Arc<crate::exchange::Status>,
    /// The file-descriptor limits, once raised at start.
    pub nofile: std::sync::OnceLock<crate::limits::nofile::Nofile>,
    /// The last reload SIGHUP asked for, for `fedport reload` to read on `/config`.
    pub hup: Mutex<HupReload>,
    ready: AtomicBool,
}

/// How the last SIGHUP reload went: its number since start, the configuration's
/// outcome (`ok`, `error`), the TLS material's (`ok`, `error`, `unchanged`), the hash
/// of the file text it read, and that of the configuration running after it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HupReload {
    pub seq: u64,
    pub config: &'static str,
    pub tls: &'static str,
    pub attempted: String,
    pub hash: String,
}

impl State {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.metrics.ready.set(ready as i64);
    }
}

/// One configuration, built and ready to be swapped in by a worker.
struct Generation {
    config: Arc<Config>,
    settings: upstream::Settings,
    peer_settings: Vec<upstream::Settings>,
    shared: crate::proxy::Shared,
    tls: Option<(Arc<identity::rotate::Rotating>, std::time::Duration)>,
    /// Open-connection counters by listener (index in `config`), shared by all workers.
    opens: Vec<Arc<AtomicUsize>>,
    /// This worker's sockets for listeners that are new or moved.
    sockets: HashMap<String, std::net::TcpListener>,
}

/// What a generation needs besides sockets, built once for all workers.
struct Prepared {
    settings: upstream::Settings,
    peer_settings: Vec<upstream::Settings>,
    shared: crate::proxy::Shared,
    tls: Option<(Arc<identity::rotate::Rotating>, std::time::Duration)>,
    detector: crate::telemetry::spike::Detector,
    exporter: Option<crate::telemetry::otlp::Exporter>,
}

/// Builds a generation for `config`. `running` is the current generation's shared
/// state, whose health, peer, limit and spike state carries over where it still fits.
fn prepare(
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    running: Option<&crate::proxy::Shared>,
) -> Result<Prepared, ServerError> {
    let tls = match &config.tls {
        Some(t) if config.listeners.iter().any(|l| l.role == Role::Peer) => Some((
            Arc::new(identity::rotate::Rotating::new(
                t.files.clone(),
                t.crl.clone(),
                t.trust_domains.clone(),
                &[b"h2", b"http/1.1", crate::upstream::reverse::ALPN],
                t.allow_tls12,
            )?),
            t.handshake_timeout,
        )),
        _ => None,
    };
    let client_tls = match &config.tls {
        Some(t) => Some(identity::client_config(&t.files, &[b"h2", b"http/1.1"])?),
        None => None,
    };
    let settings = upstream::Settings {
        max_requests: config.node.upstream_max_requests,
        h2_connections: config.node.upstream_connections,
        tls: client_tls,
        metrics: Some(metrics.clone()),
        keepalive: upstream::KEEPALIVE,
        stream_window: upstream::STREAM_WINDOW,
        reverse: None,
    };
    // connections to peers verify the peer's own identity, and PING as often as the
    // peer probes do, so a blackholed link is noticed on them as well
    let mut peer_settings = Vec::new();
    let peer_tls = match &config.tls {
        Some(t) if !config.peers.is_empty() => Some(identity::PeerTls::load(
            &t.files,
            t.crl.as_deref(),
            &t.trust_domains,
        )?),
        _ => None,
    };
    let fleet = crate::federation::Fleet::new(config, metrics.clone(), running.map(|r| &*r.fleet));
    for p in &config.peers {
        let tls = match &peer_tls {
            Some(t) => Some(t.config(&p.identity, &[b"h2"])?),
            None => None,
        };
        peer_settings.push(upstream::Settings {
            tls,
            keepalive: (
                config.node.peer_ping_interval,
                config.node.peer_ping_timeout,
            ),
            stream_window: upstream::PEER_STREAM_WINDOW,
            reverse: p
                .accepts_reverse()
                .then(|| (fleet.links.clone(), p.name.clone(), p.identity.clone())),
            ..settings.clone()
        });
    }
    let traffic = crate::telemetry::spike::Traffic::new(config);
    let detector = crate::telemetry::spike::Detector::new(config, traffic.clone(), metrics);
    crate::telemetry::record_certificates(config, metrics);
    let (spans, exporter) =
        match crate::telemetry::otlp::channel(&config.tracing, &config.node.name, metrics) {
            Some((s, e)) => (Some(s), Some(e)),
            None => (None, None),
        };
    Ok(Prepared {
        settings,
        peer_settings,
        shared: crate::proxy::Shared {
            limits: crate::limits::Limiter::new(config, running.map(|r| &*r.limits)),
            // what callers hold carries over a reload, with the identities' shares
            memory: running
                .map(|r| r.memory.clone())
                .filter(|m| m.max() == config.node.memory_budget)
                .unwrap_or_else(|| {
                    crate::memory::Node::new(metrics.memory_held.clone(), config.node.memory_budget)
                }),
            // a reload does not give a caller a fresh allowance
            resets: running.map(|r| r.resets.clone()).unwrap_or_default(),
            fleet,
            traffic,
            spans,
            // the same file keeps its writer (and what it has queued) across a reload
            access_file: match &config.node.access_log_file {
                None => None,
                Some(path) => match running.and_then(|r| r.access_file.clone()) {
                    Some(f) if &f.path == path => Some(f),
                    _ => Some(
                        crate::telemetry::accesslog::AccessFile::start(path, metrics)
                            .map_err(|e| ServerError::AccessLog(path.clone(), e))?,
                    ),
                },
            },
        },
        tls,
        detector,
        exporter,
    })
}

/// Drains a node at once from outside the thread that waits in [`Server::join`]: a
/// handed-over node told SIGTERM while its busy connections serve on.
pub struct Ender(watch::Sender<bool>);

impl Ender {
    /// Tells every worker to drain now, as SIGTERM does: GOAWAY, or close once the
    /// request in flight is answered, within `drain_timeout`.
    pub fn drain(&self) {
        let _ = self.0.send(true);
    }
}

/// A started node.
pub struct Server {
    pub state: Arc<State>,
    /// Each listener's name and bound address (the real port when the config said 0).
    bound: Mutex<Vec<(String, SocketAddr)>>,
    shutdown: watch::Sender<bool>,
    /// Starting (bound, not accepting), serving, or handed over to the next process.
    phase: watch::Sender<listen::Phase>,
    threads: Vec<JoinHandle<()>>,
    tls: ArcSwap<Option<Arc<identity::rotate::Rotating>>>,
    workers: Vec<mpsc::UnboundedSender<Generation>>,
    /// The control thread of the running generation, and how to stop it.
    control: Mutex<Option<(watch::Sender<bool>, JoinHandle<()>)>>,
    opens: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    metrics: Arc<Metrics>,
    /// The running generation's shared state and spike detector, for the next one to
    /// carry on from.
    running: Mutex<Option<Running>>,
    /// Sockets bound by the caller, by listener name: taken instead of binding.
    given: Mutex<HashMap<String, std::net::TcpListener>>,
    /// Sockets the process before this one handed over (SIGUSR2), by listener name:
    /// taken by the listener of that name and address instead of binding.
    inherited: Mutex<HashMap<String, Vec<std::net::TcpListener>>>,
    /// A copy of every listening socket the workers accept on, by listener name: what a
    /// binary upgrade hands the next process.
    listening: Mutex<HashMap<String, Vec<std::net::TcpListener>>>,
}

type Running = (
    crate::proxy::Shared,
    Arc<Mutex<crate::telemetry::spike::Detector>>,
);

impl Server {
    /// Binds every listener and starts the workers. Not ready until [`State::set_ready`].
    pub fn start(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        Self::start_with(config, metrics, HashMap::new())
    }

    /// [`Server::start`] on sockets already bound, by listener name (the others are
    /// bound as usual): the workers share each given socket's accept queue.
    pub fn start_with(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        given: HashMap<String, std::net::TcpListener>,
    ) -> Result<Self, ServerError> {
        Self::start_on(config, metrics, given, false).map(|(server, _)| server)
    }

    /// [`Server::start_with`], with `inline` set: the first worker is not given a
    /// thread of its own but returned as a future for the caller to run on its runtime
    /// (so that a test's paused clock drives its timers).
    fn start_on(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        given: HashMap<String, std::net::TcpListener>,
        inline: bool,
    ) -> Result<(Self, Option<WorkerMain>), ServerError> {
        // before any socket: the soft limit on file descriptors up to the hard one
        let nofile = crate::limits::nofile::raise();
        let p = prepare(&config, &metrics, None)?;
        let state = Arc::new(State {
            config: ArcSwap::new(config.clone()),
            metrics: metrics.clone(),
            fleet: ArcSwap::new(p.shared.fleet.clone()),
            registry: std::sync::OnceLock::new(),
            bundles: Arc::default(),
            nofile: std::sync::OnceLock::new(),
            hup: Mutex::default(),
            ready: AtomicBool::new(false),
        });
        let (shutdown, _) = watch::channel(false);
        let (phase, _) = watch::channel(listen::Phase::Starting);
        let mut threads = Vec::new();
        let mut workers = Vec::new();
        let mut here = None;
        for w in 0..config.node.workers {
            let (tx, rx) = mpsc::unbounded_channel();
            let metrics = metrics.clone();
            let stop = shutdown.subscribe();
            let seen = phase.subscribe();
            if w == 0 && inline {
                here = Some(Box::pin(worker_main(metrics, rx, stop, seen)) as WorkerMain);
                workers.push(tx);
                continue;
            }
            let t = runtime_thread(format!("fedport-w{w}"), move || {
                worker_main(metrics, rx, stop, seen)
            })
            .map_err(ServerError::Worker)?;
            threads.push(t);
            workers.push(tx);
        }
        let server = Self {
            state,
            bound: Mutex::new(Vec::new()),
            shutdown,
            phase,
            threads,
            tls: ArcSwap::new(Arc::new(None)),
            workers,
            control: Mutex::new(None),
            opens: Mutex::new(HashMap::new()),
            metrics,
            running: Mutex::new(None),
            given: Mutex::new(given),
            inherited: Mutex::new(crate::handover::inherited()),
            listening: Mutex::new(HashMap::new()),
        };
        match nofile {
            Ok(n) => {
                tracing::info!(
                    soft = n.soft,
                    hard = n.hard,
                    "file descriptors (RLIMIT_NOFILE)"
                );
                let _ = server.state.nofile.set(n);
            }
            Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
        }
        server.warn_nofile(&config);
        server.install(config, None, p)?;
        Ok((server, here))
    }

    /// Each listener's name and bound address.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.bound.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Warns when the configuration may hold more file descriptors than the process
    /// may open.
    fn warn_nofile(&self, config: &Config) {
        let needed = crate::limits::nofile::needed(config);
        if let Some(n) = self.state.nofile.get().filter(|n| needed > n.soft) {
            tracing::warn!(
                needed,
                soft = n.soft,
                hard = n.hard,
                "the listeners' max_connections and the upstream connections may need more file descriptors than RLIMIT_NOFILE allows: past it, connections are refused; raise the hard limit (LimitNOFILE= under systemd) or lower max_connections"
            );
        }
    }

    /// Swaps in a new configuration, built completely before anything changes; on an
    /// error nothing has changed.
    pub fn reload(&self, config: Arc<Config>) -> Result<(), ServerError> {
        self.warn_nofile(&config);
        let old = self.state.config.load_full();
        let running = self.running.lock().ok().and_then(|r| r.clone());
        let p = prepare(&config, &self.metrics, running.as_ref().map(|r| &r.0))?;
        self.install(config, Some(&old), p)
    }

    fn install(
        &self,
        config: Arc<Config>,
        old: Option<&Config>,
        p: Prepared,
    ) -> Result<(), ServerError> {
        // sockets: a listener keeps its socket while its bind is as before; new and
        // moved listeners get new ones (the first resolves port 0, the other workers
        // bind beside it)
        let current = self.bound();
        let workers = self.workers.len();
        let mut per_worker: Vec<HashMap<String, std::net::TcpListener>> =
            (0..workers).map(|_| HashMap::new()).collect();
        let mut bound = Vec::new();
        // copies of the sockets made here, kept for an upgrade once all of them were made
        let mut copies: HashMap<String, Vec<std::net::TcpListener>> = HashMap::new();
        for l in &config.listeners {
            let same = old.and_then(|o| o.listeners.iter().find(|x| x.name == l.name));
            let kept = same
                .filter(|x| x.bind == l.bind)
                .and_then(|_| current.iter().find(|(n, _)| *n == l.name));
            if let Some((_, addr)) = kept {
                bound.push((l.name.clone(), *addr));
                continue;
            }
            let given = self.given.lock().ok().and_then(|mut g| g.remove(&l.name));
            let is_given = given.is_some();
            // handed over by the process before this one: every socket of the listener,
            // so that no connection waiting in one's queue is lost
            let mut handed: Vec<std::net::TcpListener> = self
                .inherited
                .lock()
                .ok()
                .and_then(|mut h| h.remove(&l.name))
                .unwrap_or_default()
                .into_iter()
                .filter(|s| {
                    s.local_addr().is_ok_and(|a| {
                        a.ip() == l.bind.ip() && (l.bind.port() == 0 || a.port() == l.bind.port())
                    })
                })
                .collect();
            let given = given.or_else(|| handed.pop());
            let first = match given {
                Some(s) => {
                    s.set_nonblocking(true)
                        .map_err(|e| ListenError::Bind(l.name.clone(), l.bind, e))?;
                    s
                }
                None => listen::bind_reuseport(&l.name, l.bind)?,
            };
            let addr = first
                .local_addr()
                .map_err(|e| ListenError::Bind(l.name.clone(), l.bind, e))?;
            bound.push((l.name.clone(), addr));
            for mine in per_worker.iter_mut().skip(1) {
                // a given socket is shared (it may not allow SO_REUSEPORT beside it)
                let s = if let Some(h) = handed.pop() {
                    h.set_nonblocking(true)
                        .map_err(|e| ListenError::Bind(l.name.clone(), addr, e))?;
                    h
                } else if is_given {
                    first
                        .try_clone()
                        .map_err(|e| ListenError::Bind(l.name.clone(), addr, e))?
                } else {
                    listen::bind_reuseport(&l.name, addr)?
                };
                mine.insert(l.name.clone(), s);
            }
            if !handed.is_empty() {
                // more than this node has workers: each goes on in a worker beside its own
                tracing::warn!(listener = %l.name, extra = handed.len(), "more sockets were handed over than there are workers; the extra ones are closed");
            }
            per_worker[0].insert(l.name.clone(), first);
            copies.insert(
                l.name.clone(),
                per_worker
                    .iter()
                    .filter_map(|m| m.get(&l.name).and_then(|s| s.try_clone().ok()))
                    .collect(),
            );
        }
        let opens: Vec<Arc<AtomicUsize>> = {
            let mut o = self.opens.lock().map_err(|_| ServerError::Poisoned)?;
            config
                .listeners
                .iter()
                .map(|l| o.entry(l.name.clone()).or_default().clone())
                .collect()
        };
        for (tx, sockets) in self.workers.iter().zip(per_worker) {
            let _ = tx.send(Generation {
                config: config.clone(),
                settings: p.settings.clone(),
                peer_settings: p.peer_settings.clone(),
                shared: p.shared.clone(),
                tls: p.tls.clone(),
                opens: opens.clone(),
                sockets,
            });
        }
        // the workers have the new sockets: their copies are kept from now
        if let Ok(mut k) = self.listening.lock() {
            // a removed listener's sockets close with its accept loops
            k.retain(|name, _| config.listeners.iter().any(|l| &l.name == name));
            k.extend(copies);
        }
        if let Ok(mut h) = self.inherited.lock() {
            // sockets handed over for listeners this config does not have are closed,
            // so that their ports refuse rather than queue what nobody accepts
            h.retain(|name, _| name == "admin" || name == "bundle_endpoint");
        }
        // the old control thread (health checks, PINGs, spike detection) gives way
        let (stop, rx) = watch::channel(false);
        let detector = Arc::new(Mutex::new(p.detector));
        let handle = crate::federation::control::spawn(
            config.clone(),
            p.shared.fleet.clone(),
            p.settings.clone(),
            (detector.clone(), p.exporter),
            rx,
        )
        .map_err(ServerError::Worker)?;
        if let Ok(mut c) = self.control.lock() {
            if let Some((old_stop, old_handle)) = c.replace((stop, handle)) {
                let _ = old_stop.send(true);
                let _ = old_handle.join();
            }
        }
        // the old detector has stopped ticking: the new one carries on from it (its
        // first tick is a second away)
        let previous = self
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.replace((p.shared.clone(), detector.clone())));
        if let Some((_, old)) = previous {
            if let (Ok(mut new), Ok(mut old)) = (detector.lock(), old.lock()) {
                new.inherit(&mut old);
            }
        }
        self.tls.store(Arc::new(p.tls.map(|(r, _)| r)));
        self.state.fleet.store(p.shared.fleet);
        self.metrics.set_config(&config.node.name, &config.hash);
        self.state.config.store(config);
        if let Ok(mut b) = self.bound.lock() {
            *b = bound;
        }
        Ok(())
    }

    /// Reloads the TLS material if a file changed (or always, when `force`: SIGHUP).
    /// A failure is logged and counted; the old material keeps serving.
    ///
    /// The listeners' material swaps in place. The certificate this node presents to
    /// its peers and `https://` endpoints, and the CA it checks them against, live in
    /// the generation's pools and probes: with `clients`, a swap also rebuilds the
    /// running configuration's generation (as a reload does), so that new connections
    /// out present the new certificate too. A SIGHUP that has just reloaded the
    /// configuration has rebuilt them already and passes `false`. Says how it went:
    /// `ok`, `error`, or `unchanged` (also when the node has no TLS).
    pub fn reload_tls(&self, force: bool, clients: bool) -> &'static str {
        let tls = self.tls.load_full();
        let Some(tls) = tls.as_ref() else {
            return "unchanged";
        };
        let result = match tls.reload(force) {
            Ok(identity::rotate::Reloaded::Unchanged) => return "unchanged",
            Ok(identity::rotate::Reloaded::Swapped) if clients => {
                match self.reload(self.state.config.load_full()) {
                    Ok(()) => {
                        tracing::info!("TLS material reloaded: new handshakes and new connections to peers and endpoints use it");
                        "ok"
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS material reloaded for handshakes, but connections out could not be rebuilt; they keep the previous certificate");
                        "error"
                    }
                }
            }
            Ok(identity::rotate::Reloaded::Swapped) => {
                tracing::info!("TLS material reloaded: new handshakes use it");
                "ok"
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS material refused; the previous certificate, key, CA and CRL keep serving");
                "error"
            }
        };
        self.state
            .metrics
            .tls_reloads
            .get_or_create(&crate::telemetry::ResultLabels {
                result: result.to_owned(),
            })
            .inc();
        result
    }

    /// Every listening socket, by listener name (for a binary upgrade to hand over).
    pub fn listening(&self) -> Vec<(String, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.listening
            .lock()
            .map(|k| {
                k.iter()
                    .flat_map(|(n, v)| v.iter().map(move |s| (n.clone(), s.as_raw_fd())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A socket the process before this one handed over for `name` (the admin port).
    pub fn take_inherited(&self, name: &str) -> Option<std::net::TcpListener> {
        self.inherited.lock().ok()?.get_mut(name)?.pop()
    }

    /// Reopens `access_log_file` before its next line (SIGUSR1, after logrotate).
    pub fn reopen_access_log(&self) -> bool {
        let running = self.running.lock().ok();
        match running
            .as_ref()
            .and_then(|r| r.as_ref())
            .and_then(|r| r.0.access_file.as_ref())
        {
            Some(f) => {
                f.reopen();
                true
            }
            None => false,
        }
    }

    /// Starts accepting on every listener (until now connections wait in the kernel's
    /// queue) and says the node is ready.
    pub fn open(&self) {
        self.phase.send_if_modified(|p| {
            let was = *p == listen::Phase::Starting;
            if was {
                *p = listen::Phase::Serving;
            }
            was
        });
        self.state.set_ready(true);
    }

    /// After a binary upgrade's new process is ready: this one stops accepting (the
    /// new one accepts on the same sockets) and lets its connections end as they go
    /// idle; busy ones serve on for up to `upgrade_drain_timeout`, then drain as on
    /// SIGTERM. The workers end by themselves; [`Ender::drain`] drains at once.
    pub fn hand_over(&self) {
        self.state.set_ready(false);
        if let Ok(mut k) = self.listening.lock() {
            k.clear();
        }
        if let Ok(mut h) = self.inherited.lock() {
            h.clear();
        }
        let _ = self.phase.send(listen::Phase::HandedOver);
    }

    /// What drains the node while another thread waits in [`Server::join`].
    pub fn ender(&self) -> Ender {
        Ender(self.shutdown.clone())
    }

    /// Starts draining: readiness false, sockets closed, connections told to finish.
    pub fn drain(&self) {
        self.state.set_ready(false);
        // the copies kept for an upgrade go too: a draining node's ports refuse at once
        // (after a handover the new process holds its own)
        if let Ok(mut k) = self.listening.lock() {
            k.clear();
        }
        if let Ok(mut h) = self.inherited.lock() {
            h.clear();
        }
        let _ = self.shutdown.send(true);
    }

    /// Waits for every worker to finish draining (each bounded by the drain timeout).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
        if let Ok(mut c) = self.control.lock() {
            if let Some((stop, handle)) = c.take() {
                let _ = stop.send(true);
                let _ = handle.join();
            }
        }
    }
}

/// Runs a node until `shutdown` completes, then drains it, as mini-redis's
/// `server::run` does: the daemon a test can hold in-process. `listeners` are sockets
/// the caller bound (port 0, say), by listener name; the rest of the config's listeners
/// are bound as usual. Ready (`/readyz`) once it serves.
pub async fn run(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    listeners: HashMap<String, std::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start_with(config, metrics, listeners)?;
    server.open();
    shutdown.await;
    server.drain();
    let _ = tokio::task::spawn_blocking(move || server.join()).await;
    Ok(())
}

/// [`run`] with the node's first worker on the caller's runtime instead of a thread of
/// its own: under `#[tokio::test(start_paused = true)]` the test's clock drives that
/// worker's timers (deadlines, idle and drain timeouts), so a test of a five-minute
/// timeout takes no five minutes. Give it `workers = 1` so every connection lands on
/// that worker; the control loop keeps its own thread and real time.
pub async fn run_here(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    listeners: HashMap<String, std::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let (server, here) = Server::start_on(config, metrics, listeners, true)?;
    let Some(mut worker) = here else {
        return Err(ServerError::Worker(std::io::Error::other(
            "a node run here needs at least one worker",
        )));
    };
    server.open();
    let ended = tokio::select! {
        _ = shutdown => false,
        _ = &mut worker => true,
    };
    server.drain();
    if !ended {
        worker.await;
    }
    let _ = tokio::task::spawn_blocking(move || server.join()).await;
    Ok(())
}

/// A worker's loop, as a future rather than a thread (see [`run_here`]).
type WorkerMain = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One listener's accept loop in a worker.
struct Loop {
    bind: SocketAddr,
    accepting: Arc<ArcSwap<Accepting>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A reverse link this worker keeps up to a peer (this node dials out), served as a
/// connection of the listener whose accepting state it follows.
struct Dialer {
    accepting: Arc<ArcSwap<Accepting>>,
    /// The TLS it dials with, renewed by each generation (a rotated certificate).
    tls: Arc<ArcSwap<rustls::ClientConfig>>,
    stop: watch::Sender<bool>,
}

/// (peer name, address, identity, listener): what a dialer is for.
type DialerKey = (String, String, String, String);

/// Starts, keeps or stops this worker's reverse-link dialers for `config`: one per peer
/// this node dials (`[[peer]] reverse = true` with an address), served as connections of
/// its first peer listener that serves HTTP.
fn keep_dialers(
    dialers: &mut HashMap<DialerKey, Dialer>,
    config: &Config,
    peer_settings: &[upstream::Settings],
    loops: &HashMap<String, Loop>,
    (live, phase): (&Arc<()>, &watch::Receiver<listen::Phase>),
) {
    let listener = config
        .listeners
        .iter()
        .find(|l| l.role == Role::Peer && l.service.is_none())
        .map(|l| l.name.clone());
    let mut wanted = std::collections::HashSet::new();
    for (p, st) in config.peers.iter().zip(peer_settings) {
        let (Some(listener), Some(tls)) = (&listener, &st.tls) else {
            continue;
        };
        if !p.dials_reverse() {
            continue;
        }
        let Some(l) = loops.get(listener) else {
            continue;
        };
        let mut cfg = (**tls).clone();
        cfg.alpn_protocols = vec![crate::upstream::reverse::ALPN.to_vec()];
        let key = (
            p.name.clone(),
            p.address.clone(),
            p.identity.clone(),
            listener.clone(),
        );
        wanted.insert(key.clone());
        if let Some(d) = dialers.get(&key) {
            if Arc::ptr_eq(&d.accepting, &l.accepting) {
                d.tls.store(Arc::new(cfg));
                continue;
            }
        }
        let tls = Arc::new(ArcSwap::from_pointee(cfg));
        let (stop, signal) = watch::channel(false);
        tokio::spawn(listen::dial_reverse(
            p.clone(),
            tls.clone(),
            l.accepting.clone(),
            listen::Drain {
                signal,
                phase: phase.clone(),
                live: live.clone(),
            },
        ));
        if let Some(old) = dialers.insert(
            key,
            Dialer {
                accepting: l.accepting.clone(),
                tls,
                stop,
            },
        ) {
            let _ = old.stop.send(true);
        }
    }
    dialers.retain(|k, d| {
        let keep = wanted.contains(k);
        if !keep {
            let _ = d.stop.send(true);
        }
        keep
    });
}

/// Keeps this worker's connections open to the peers that are up and offer a service,
/// until the next generation replaces this one: requests moved to a peer find a
/// connection ready (see [`upstream::EndpointPool::warm`]). Each peer on its own, every
/// `peer_ping_interval` (jittered); a peer whose connections fail, or die before the
/// next look, is looked at half as often each time, down to every 30 s, so one that
/// takes connections and drops them sees no storm. Stops once the node drains or
/// hands over, so a process draining after an upgrade dials no peer.
async fn keep_peers_warm(
    w: Arc<Worker>,
    mut shutdown: watch::Receiver<bool>,
    mut phase: watch::Receiver<listen::Phase>,
) {
    const SLOWEST: std::time::Duration = std::time::Duration::from_secs(30);
    let every = w.config.node.peer_ping_interval;
    let mut peers = tokio::task::JoinSet::new();
    for (i, pool) in w.peer_pools.iter().enumerate() {
        let (Some(peer), Some(state)) = (w.config.peers.get(i), w.fleet.peers.get(i)) else {
            continue;
        };
        // a registry member that hosts none of this node's services is sent nothing
        if peer.services.is_empty() {
            continue;
        }
        let (pool, state) = (pool.clone(), state.clone());
        peers.spawn(async move {
            let (mut wait, mut reopened) = (every, false);
            loop {
                // a peer down is looked at every interval, so that it is warmed
                // within one once it is back up, not after the backoff
                if !state.is_up() {
                    (wait, reopened) = (every, false);
                } else {
                    match pool.warm().await {
                        Ok(0) => (wait, reopened) = (every, false),
                        Ok(_) => {
                            if reopened {
                                wait = (wait * 2).min(SLOWEST);
                            }
                            reopened = true;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %pool.label, error = %e, "could not open a connection ahead of requests");
                            wait = (wait * 2).min(SLOWEST);
                        }
                    }
                }
                tokio::time::sleep(crate::federation::control::jitter(wait)).await;
            }
        });
    }
    // the peers' tasks end with this one (the set aborts them when dropped)
    tokio::select! {
        _ = shutdown.wait_for(|s| *s) => {}
        _ = phase.wait_for(|p| *p == listen::Phase::HandedOver) => {}
    }
}

async fn worker_main(
    metrics: Arc<Metrics>,
    mut generations: mpsc::UnboundedReceiver<Generation>,
    mut shutdown: watch::Receiver<bool>,
    mut phase: watch::Receiver<listen::Phase>,
) {
    let live = Arc::new(());
    let mut loops: HashMap<String, Loop> = HashMap::new();
    let mut dialers: HashMap<DialerKey, Dialer> = HashMap::new();
    let mut drain = std::time::Duration::from_secs(30);
    let mut handover = std::time::Duration::from_secs(60);
    let mut warming: Option<(tokio::task::JoinHandle<()>, Arc<Worker>)> = None;
    loop {
        let g = tokio::select! {
            g = generations.recv() => match g { Some(g) => g, None => break },
            _ = shutdown.wait_for(|s| *s) => break,
            _ = phase.wait_for(|p| *p == listen::Phase::HandedOver) => break,
        };
        drain = g.config.node.drain_timeout;
        handover = g.config.node.upgrade_drain_timeout;
        let Generation {
            config,
            settings,
            peer_settings,
            shared,
            tls,
            opens,
            mut sockets,
        } = g;
        let worker = Arc::new(Worker::new(
            config.clone(),
            metrics.clone(),
            &settings,
            shared,
            &peer_settings,
        ));
        // the generation before stops warming and lets its peer connections go: its
        // pools take no new request
        let warm = tokio::spawn(keep_peers_warm(
            worker.clone(),
            shutdown.clone(),
            phase.clone(),
        ));
        if let Some((task, before)) = warming.replace((warm, worker.clone())) {
            task.abort();
            for pool in &before.peer_pools {
                pool.let_go();
            }
        }
        for (index, spec) in config.listeners.iter().enumerate() {
            let labels = crate::telemetry::ListenerLabels {
                listener: spec.name.clone(),
            };
            let acc = Arc::new(Accepting {
                open: opens[index].clone(),
                max_connections: spec.max_connections,
                spec: spec.clone(),
                index,
                connections_total: metrics.connections_total.get_or_create(&labels).clone(),
                connections_active: metrics.connections_active.get_or_create(&labels).clone(),
                streams: metrics.streams_active.get_or_create(&labels).clone(),
                name: Arc::from(spec.name.as_str()),
                tls: if spec.role == Role::Peer {
                    tls.clone()
                } else {
                    None
                },
                worker: worker.clone(),
                metrics: metrics.clone(),
                builder: listen::http_builder(spec.header_timeout),
            });
            match sockets.remove(&spec.name) {
                None => {
                    // kept: same socket, the new generation from the next connection on
                    if let Some(l) = loops.get(&spec.name) {
                        l.accepting.store(acc);
                    }
                }
                Some(sock) => {
                    if let Some(old) = loops.remove(&spec.name) {
                        let _ = old.stop.send(true);
                    }
                    let listener = match tokio::net::TcpListener::from_std(sock) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(listener = %spec.name, error = %e, "cannot register socket");
                            continue;
                        }
                    };
                    let bind = listener.local_addr().unwrap_or(spec.bind);
                    let accepting = Arc::new(ArcSwap::new(acc));
                    let (stop, signal) = watch::channel(false);
                    let task = tokio::spawn(listen::accept_loop(
                        listener,
                        accepting.clone(),
                        listen::Drain {
                            signal,
                            phase: phase.clone(),
                            live: live.clone(),
                        },
                    ));
                    loops.insert(
                        spec.name.clone(),
                        Loop {
                            bind,
                            accepting,
                            stop,
                            task,
                        },
                    );
                }
            }
        }
        keep_dialers(
            &mut dialers,
            &config,
            &peer_settings,
            &loops,
            (&live, &phase),
        );
        // listeners no longer configured stop accepting; their connections drain
        let gone: Vec<String> = loops
            .keys()
            .filter(|n| !config.listeners.iter().any(|l| &l.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(l) = loops.remove(&name) {
                tracing::info!(listener = %name, bind = %l.bind, "listener removed: draining its connections");
                let _ = l.stop.send(true);
            }
        }
    }
    if let Some((task, _)) = warming.take() {
        task.abort();
    }
    // every connection task holds a clone of `live`: wait for them to end
    let all_done = |live: &Arc<()>| {
        let live = live.clone();
        async move {
            while Arc::strong_count(&live) > 2 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    if *phase.borrow() == listen::Phase::HandedOver && !*shutdown.borrow() {
        // the accept loops and dialers have stopped by themselves, and connections end
        // as they go idle; until the busy ones end too, the upgrade's drain time passes,
        // or the node is told to drain now
        let settled = tokio::select! {
            r = tokio::time::timeout(handover, all_done(&live)) => r.is_ok(),
            _ = shutdown.wait_for(|s| *s) => false,
        };
        if !settled {
            tracing::info!(
                open = Arc::strong_count(&live).saturating_sub(1),
                "upgrade: connections still open are told to finish (GOAWAY, or close)"
            );
        }
    }
    for l in loops.values() {
        let _ = l.stop.send(true);
    }
    for d in dialers.values() {
        let _ = d.stop.send(true);
    }
    for (_, l) in loops {
        let _ = l.task.await;
    }
    if tokio::time::timeout(drain, all_done(&live)).await.is_err() {
        tracing::warn!(
            timeout_ms = drain.as_millis() as u64,
            "drain timeout passed; closing the remaining connections"
        );
    }
}
