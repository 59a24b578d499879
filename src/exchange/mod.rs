//! Bundle exchange (SPIFFE federation): this node serves its own trust domain's bundle
//! (`[bundle_endpoint]`, `serve`), and fetches each other domain's from the endpoint its
//! `[[trust_domain]]` names (`fetch`). A fetched bundle is checked, then written in
//! place of the domain's `bundle` file, which the TLS rotation loads like any rotated
//! file; the file keeps the last good bundle through outages and restarts. What each
//! fetch did is in `Status` (`/readyz?verbose`) and in the metrics.

pub mod fetch;
pub mod serve;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// The state of each fetched domain's bundle, for `/readyz?verbose`.
#[derive(Default)]
pub struct Status {
    domains: Mutex<BTreeMap<String, DomainStatus>>,
}

#[derive(Default, Clone)]
struct DomainStatus {
    url: String,
    profile: &'static str,
    sequence: Option<u64>,
    authorities: usize,
    refresh: Duration,
    last_success: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
    failures: u32,
}

impl Status {
    pub fn detail(&self) -> serde_json::Value {
        let Ok(d) = self.domains.lock() else {
            return serde_json::Value::Null;
        };
        let ago = |t: Option<SystemTime>| {
            t.and_then(|t| SystemTime::now().duration_since(t).ok())
                .map(|d| d.as_secs())
        };
        d.iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "url": s.url,
                        "profile": s.profile,
                        "sequence": s.sequence,
                        "authorities": s.authorities,
                        "refresh_seconds": s.refresh.as_secs(),
                        "last_success_seconds_ago": ago(s.last_success),
                        "last_attempt_seconds_ago": ago(s.last_attempt),
                        "last_error": s.last_error,
                        "failures_in_a_row": s.failures,
                        // the last good bundle keeps serving through a failed fetch
                        "stale": s.failures > 0,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    fn update(&self, domain: &str, f: impl FnOnce(&mut DomainStatus)) {
        if let Ok(mut d) = self.domains.lock() {
            f(d.entry(domain.to_owned()).or_default());
        }
    }

    fn forget_others(&self, keep: &[String]) {
        if let Ok(mut d) = self.domains.lock() {
            d.retain(|k, _| keep.contains(k));
        }
    }
}

/// The running exchange: the fetch tasks and the served bundle's listener, following
/// the configuration as it is reloaded.
#[derive(Default)]
pub struct Exchange {
    fetchers: fetch::Fetchers,
    served: Option<Served>,
    /// The bundle endpoint's socket as the process before this one handed it over.
    inherited: Option<std::net::TcpListener>,
}

struct Served {
    cfg: crate::config::ServeBundle,
    files: crate::identity::TlsFiles,
    /// Kept open across reloads that keep the address: a reload never refuses a fetch.
    socket: std::net::TcpListener,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Exchange {
    /// Follows `cfg`: starts, restarts or stops what it names. A bundle endpoint that
    /// cannot bind is logged; the rest of the configuration serves on.
    pub fn apply(
        &mut self,
        cfg: &crate::config::Config,
        status: &std::sync::Arc<Status>,
        metrics: &std::sync::Arc<crate::telemetry::Metrics>,
    ) -> Result<(), std::io::Error> {
        self.fetchers.apply(cfg, status, metrics);
        let want = cfg
            .tls
            .as_ref()
            .and_then(|t| t.serve_bundle.clone().map(|s| (s, t.files.clone())));
        let Some((want, files)) = want else {
            self.served = None;
            return Ok(());
        };
        if let Some(s) = &self.served {
            if s.cfg == want && s.files == files {
                return Ok(());
            }
        }
        // a new address is bound before the old one is let go: if it cannot be, the
        // old one serves on
        let socket = match &self.served {
            Some(s) if s.cfg.bind == want.bind => s.socket.try_clone()?,
            _ => {
                let handed = self.inherited.take().filter(|s| {
                    s.local_addr().is_ok_and(|a| {
                        a.ip() == want.bind.ip()
                            && (want.bind.port() == 0 || a.port() == want.bind.port())
                    })
                });
                let s = match handed {
                    Some(s) => s,
                    None => std::net::TcpListener::bind(want.bind)?,
                };
                s.set_nonblocking(true)?;
                s
            }
        };
        self.served = None;
        let listener = tokio::net::TcpListener::from_std(socket.try_clone()?)?;
        let task = tokio::spawn(serve::serve(
            listener,
            want.clone(),
            files.clone(),
            metrics.clone(),
        ));
        self.served = Some(Served {
            cfg: want,
            files,
            socket,
            task,
        });
        Ok(())
    }

    /// Takes the bundle endpoint's socket the process before this one handed over: the
    /// next [`Exchange::apply`] serves on it instead of binding.
    pub fn inherit(&mut self, socket: std::net::TcpListener) {
        self.inherited = Some(socket);
    }

    /// The bundle endpoint's socket, for a binary upgrade to hand over.
    pub fn socket(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.served.as_ref().map(|s| s.socket.as_raw_fd())
    }

    /// The bound address of the bundle endpoint, when one is served.
    pub fn bound(&self) -> Option<std::net::SocketAddr> {
        self.served
            .as_ref()
            .and_then(|s| s.socket.local_addr().ok())
    }
}
