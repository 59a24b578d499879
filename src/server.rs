//! The daemon's shape: one thread per worker, each a single-threaded tokio runtime with
//! its own SO_REUSEPORT socket per listener and its own upstream connections; shared
//! state is read-only. Drain: sockets close, connections finish within the timeout.

use crate::config::{Config, Role};
use crate::identity;
use crate::listen::{self, Accepting, ListenError};
use crate::proxy::Worker;
use crate::telemetry::Metrics;
use crate::upstream;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("cannot start worker: {0}")]
    Worker(std::io::Error),
}

/// What the admin port and the CLI see of a running node.
pub struct State {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Health of endpoints and peers, for `/readyz?verbose`.
    pub fleet: Arc<crate::federation::Fleet>,
    ready: AtomicBool,
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

/// A started node.
pub struct Server {
    pub state: Arc<State>,
    /// Each listener's name and bound address (the real port when the config said 0).
    pub bound: Vec<(String, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    tls: Option<Arc<identity::rotate::Rotating>>,
}

impl Server {
    /// Binds every listener and starts the workers. Not ready until [`State::set_ready`].
    pub fn start(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        let tls = match &config.tls {
            Some(t) if config.listeners.iter().any(|l| l.role == Role::Peer) => Some((
                Arc::new(identity::rotate::Rotating::new(
                    t.files.clone(),
                    t.crl.clone(),
                    &[b"h2", b"http/1.1"],
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
        };
        // connections to peers verify the peer's own identity, and PING as often as
        // the peer probes do, so a blackholed link is noticed on them as well
        let mut peer_settings = Vec::new();
        for p in &config.peers {
            let tls = match &config.tls {
                Some(t) => Some(identity::peer_client_config(
                    &t.files,
                    &p.identity,
                    &[b"h2"],
                )?),
                None => None,
            };
            peer_settings.push(upstream::Settings {
                tls,
                keepalive: (
                    config.node.peer_ping_interval,
                    config.node.peer_ping_timeout,
                ),
                ..settings.clone()
            });
        }
        let fleet = crate::federation::Fleet::new(&config, metrics.clone());
        let traffic = crate::telemetry::spike::Traffic::new(&config);
        let detector = crate::telemetry::spike::Detector::new(&config, traffic.clone(), &metrics);
        crate::telemetry::record_certificates(&config, &metrics);
        let (spans, exporter) =
            match crate::telemetry::otlp::channel(&config.tracing, &config.node.name, &metrics) {
                Some((s, e)) => (Some(s), Some(e)),
                None => (None, None),
            };
        // The first socket of each listener resolves port 0; the other workers bind
        // the same address beside it.
        let mut first = Vec::new();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let s = listen::bind_reuseport(&l.name, l.bind)?;
            let addr = s
                .local_addr()
                .map_err(|e| ListenError::Bind(l.name.clone(), l.bind, e))?;
            bound.push((l.name.clone(), addr));
            first.push(Some(s));
        }
        let mut sockets: Vec<Vec<std::net::TcpListener>> = Vec::new();
        for w in 0..config.node.workers {
            let mut mine = Vec::new();
            for (i, l) in config.listeners.iter().enumerate() {
                let s = match first[i].take() {
                    Some(s) if w == 0 => s,
                    other => {
                        first[i] = other;
                        listen::bind_reuseport(&l.name, bound[i].1)?
                    }
                };
                mine.push(s);
            }
            sockets.push(mine);
        }

        let state = Arc::new(State {
            config: config.clone(),
            metrics: metrics.clone(),
            fleet: fleet.clone(),
            ready: AtomicBool::new(false),
        });
        let (shutdown, _) = watch::channel(false);
        let open: Vec<Arc<std::sync::atomic::AtomicUsize>> =
            config.listeners.iter().map(|_| Arc::default()).collect();
        let mut threads = Vec::new();
        for (w, mine) in sockets.into_iter().enumerate() {
            let open = open.clone();
            let config = config.clone();
            let metrics = metrics.clone();
            let settings = settings.clone();
            let shared = (
                crate::proxy::Shared {
                    fleet: fleet.clone(),
                    traffic: traffic.clone(),
                    spans: spans.clone(),
                },
                peer_settings.clone(),
            );
            let tls = tls.clone();
            let rx = shutdown.subscribe();
            let t = std::thread::Builder::new()
                .name(format!("fedport-w{w}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "worker runtime failed to start");
                            return;
                        }
                    };
                    rt.block_on(worker_main(
                        config, metrics, settings, shared, tls, mine, open, rx,
                    ));
                })
                .map_err(ServerError::Worker)?;
            threads.push(t);
        }
        threads.push(
            crate::federation::control::spawn(
                config.clone(),
                fleet,
                settings.clone(),
                (detector, exporter),
                shutdown.subscribe(),
            )
            .map_err(ServerError::Worker)?,
        );
        Ok(Self {
            tls: tls.map(|(r, _)| r),
            state,
            bound,
            shutdown,
            threads,
        })
    }

    /// Reloads the TLS material if a file changed (or always, when `force`: SIGHUP).
    /// A failure is logged and counted; the old material keeps serving.
    pub fn reload_tls(&self, force: bool) {
        let Some(tls) = &self.tls else { return };
        let result = match tls.reload(force) {
            Ok(identity::rotate::Reloaded::Unchanged) => return,
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
    }

    /// Starts draining: readiness false, sockets closed, connections told to finish.
    pub fn drain(&self) {
        self.state.set_ready(false);
        let _ = self.shutdown.send(true);
    }

    /// Waits for every worker to finish draining (each bounded by the drain timeout).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker_main(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    settings: upstream::Settings,
    (shared, peer_settings): (crate::proxy::Shared, Vec<upstream::Settings>),
    tls: Option<(Arc<identity::rotate::Rotating>, std::time::Duration)>,
    sockets: Vec<std::net::TcpListener>,
    open: Vec<Arc<std::sync::atomic::AtomicUsize>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let worker = Arc::new(Worker::new(
        config.clone(),
        metrics.clone(),
        &settings,
        shared,
        &peer_settings,
    ));
    let live = Arc::new(());
    let mut loops = Vec::new();
    let builder = listen::http_builder();
    for (index, (spec, sock)) in config.listeners.iter().zip(sockets).enumerate() {
        let listener = match tokio::net::TcpListener::from_std(sock) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = %spec.name, error = %e, "cannot register socket");
                continue;
            }
        };
        let labels = crate::telemetry::ListenerLabels {
            listener: spec.name.clone(),
        };
        let acc = Arc::new(Accepting {
            open: open[index].clone(),
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
            builder: builder.clone(),
        });
        loops.push(tokio::spawn(listen::accept_loop(
            listener,
            acc,
            listen::Drain {
                signal: shutdown.clone(),
                live: live.clone(),
            },
        )));
    }
    let _ = shutdown.wait_for(|s| *s).await;
    for l in loops {
        let _ = l.await;
    }
    let drain = config.node.drain_timeout;
    // every connection task holds a clone of `live`: wait for them to end
    let all_done = async {
        while Arc::strong_count(&live) > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(drain, all_done).await.is_err() {
        tracing::warn!(
            timeout_ms = drain.as_millis() as u64,
            "drain timeout passed; closing the remaining connections"
        );
    }
}
