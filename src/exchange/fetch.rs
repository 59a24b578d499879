//! Fetching other trust domains' bundles from their bundle endpoints: one task per
//! domain, asking again after the bundle's `spiffe_refresh_hint` (5 minutes without
//! one; between 1 s and a day), sooner after a failure. A bundle is taken only if it
//! parses, holds X.509 authorities, and its `spiffe_sequence` is not older than the one
//! held; it is then written atomically in place of the domain's `bundle` file. Through
//! an outage the file keeps the last good bundle.

use super::Status;
use crate::config::Config;
use crate::identity::bundle::{self, Bundle, BundleError};
use crate::identity::domains::{DomainSpec, Profile};
use crate::identity::{PeerTls, TlsFiles};
use crate::telemetry::Metrics;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Without a refresh hint, a bundle is fetched again after this.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(86_400);
/// A fetch (connect, TLS, answer) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failure, asked again after at most this.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("spiffe_sequence {got} is older than the {held} held: refused")]
    Older { got: u64, held: u64 },
    #[error("cannot keep the bundle in {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

impl FetchError {
    /// The metric's `result` label.
    fn result(&self) -> &'static str {
        match self {
            Self::Bundle(_) => "invalid",
            Self::Older { .. } => "older_sequence",
            Self::Write(..) => "write_error",
            _ => "unreachable",
        }
    }
}

/// The fetch tasks of the running configuration: restarted when what they fetch
/// changes on a reload, and left alone otherwise.
#[derive(Default)]
pub struct Fetchers {
    running: Vec<(DomainSpec, tokio::task::JoinHandle<()>)>,
    /// What the tasks were started with, to tell when a reload changes it.
    key: Option<(TlsFiles, Option<PathBuf>, Vec<DomainSpec>)>,
    /// The domains whose gauges are set.
    labelled: Vec<String>,
}

impl Fetchers {
    pub fn apply(&mut self, cfg: &Config, status: &Arc<Status>, metrics: &Arc<Metrics>) {
        let key = cfg
            .tls
            .as_ref()
            .map(|t| (t.files.clone(), t.crl.clone(), t.trust_domains.clone()));
        if key == self.key {
            return;
        }
        for (_, task) in self.running.drain(..) {
            task.abort();
        }
        self.key = key;
        let (files, crl, domains) = self.key.clone().unwrap_or_else(|| {
            (
                TlsFiles {
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                    ca: PathBuf::new(),
                },
                None,
                Vec::new(),
            )
        });
        let fetched: Vec<String> = domains
            .iter()
            .filter(|d| d.endpoint.is_some())
            .map(|d| d.name.clone())
            .collect();
        status.forget_others(&fetched);
        // a domain no longer fetched leaves no series behind (its stale alert with it)
        for gone in std::mem::take(&mut self.labelled) {
            if !fetched.contains(&gone) {
                let l = crate::telemetry::DomainLabels { trust_domain: gone };
                metrics.bundle_stale.remove(&l);
                metrics.bundle_sequence.remove(&l);
                metrics.bundle_last_success.remove(&l);
            }
        }
        self.labelled = fetched.clone();
        for d in domains.iter().filter(|d| d.endpoint.is_some()) {
            let task = tokio::spawn(run(
                d.clone(),
                Ctx {
                    files: files.clone(),
                    crl: crl.clone(),
                    domains: domains.clone(),
                    status: status.clone(),
                    metrics: metrics.clone(),
                },
            ));
            self.running.push((d.clone(), task));
        }
    }
}

impl Drop for Fetchers {
    fn drop(&mut self) {
        for (_, task) in self.running.drain(..) {
            task.abort();
        }
    }
}

struct Ctx {
    files: TlsFiles,
    crl: Option<PathBuf>,
    domains: Vec<DomainSpec>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// The bundle the domain's file holds now, if it holds one.
fn held(path: &Path) -> Option<(Bytes, Bundle)> {
    let bytes = std::fs::read(path).ok()?;
    let b = bundle::parse(&bytes).ok()?;
    Some((bytes.into(), b))
}

fn clamp(d: Duration) -> Duration {
    d.clamp(MIN_REFRESH, MAX_REFRESH)
}

async fn run(domain: DomainSpec, cx: Ctx) {
    let Some(endpoint) = domain.endpoint.clone() else {
        return;
    };
    let path = domain.authorities.path().to_owned();
    let label = crate::telemetry::DomainLabels {
        trust_domain: domain.name.clone(),
    };
    let now_held = held(&path);
    cx.status.update(&domain.name, |s| {
        s.url = endpoint.url.clone();
        s.profile = endpoint.profile.name();
        s.sequence = now_held.as_ref().and_then(|h| h.1.sequence);
        s.authorities = now_held.as_ref().map_or(0, |h| h.1.authorities.len());
    });
    loop {
        let attempt =
            tokio::time::timeout(FETCH_TIMEOUT, get(&endpoint.url, &endpoint.profile, &cx));
        let result = match attempt.await {
            Ok(Ok(bytes)) => {
                // file reads, the write and its fsync: off the control loop's thread
                let (path, others) = (path.clone(), others_of(&domain, &cx));
                tokio::task::spawn_blocking(move || take(&path, bytes, &others))
                    .await
                    .unwrap_or_else(|e| Err(FetchError::Http(e.to_string())))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FetchError::Timeout),
        };
        let held_now = held(&path);
        let refresh = clamp(
            held_now
                .as_ref()
                .and_then(|h| h.1.refresh_hint)
                .unwrap_or(DEFAULT_REFRESH),
        );
        let next = match &result {
            Ok(changed) => {
                let r = if *changed { "updated" } else { "unchanged" };
                cx.metrics
                    .bundle_fetches
                    .get_or_create(&crate::telemetry::DomainResultLabels {
                        trust_domain: domain.name.clone(),
                        result: r.to_owned(),
                    })
                    .inc();
                if *changed {
                    tracing::info!(trust_domain = %domain.name, url = %endpoint.url, sequence = ?held_now.as_ref().and_then(|h| h.1.sequence), "trust bundle fetched: the domain's new authorities are loaded on the next TLS reload");
                }
                let now = SystemTime::now();
                cx.metrics.bundle_last_success.get_or_create(&label).set(
                    now.duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                );
                if let Some(seq) = held_now.as_ref().and_then(|h| h.1.sequence) {
                    cx.metrics
                        .bundle_sequence
                        .get_or_create(&label)
                        .set(seq as i64);
                }
                cx.metrics.bundle_stale.get_or_create(&label).set(0);
                cx.status.update(&domain.name, |s| {
                    s.last_success = Some(now);
                    s.last_attempt = Some(now);
                    s.failures = 0;
                    s.sequence = held_now.as_ref().and_then(|h| h.1.sequence);
                    s.authorities = held_now.as_ref().map_or(0, |h| h.1.authorities.len());
                    s.refresh = refresh;
                });
                refresh
            }
            Err(e) => {
                cx.metrics
                    .bundle_fetches
                    .get_or_create(&crate::telemetry::DomainResultLabels {
                        trust_domain: domain.name.clone(),
                        result: e.result().to_owned(),
                    })
                    .inc();
                cx.metrics.bundle_stale.get_or_create(&label).set(1);
                let mut first = false;
                cx.status.update(&domain.name, |s| {
                    s.last_attempt = Some(SystemTime::now());
                    first = s.failures == 0;
                    s.failures += 1;
                    s.last_error = Some(e.to_string());
                    s.refresh = refresh;
                });
                // logged when fetches start failing, not on every retry
                if first {
                    tracing::warn!(trust_domain = %domain.name, url = %endpoint.url, error = %e, held = held_now.is_some(), "trust bundle fetch failed: the last good bundle keeps serving");
                }
                refresh.min(RETRY_AFTER_FAILURE)
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// Every CA certificate another bundle here holds: `[tls] ca`'s and the other
/// domains'. A fetched bundle holding one is refused: it would let that domain vouch
/// for another's identities, and `check` refuses such a configuration at every reload.
fn others_of(domain: &DomainSpec, cx: &Ctx) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let mut out = crate::identity::load_certs(&cx.files.ca).unwrap_or_default();
    for d in cx.domains.iter().filter(|d| d.name != domain.name) {
        out.extend(d.authorities.load().unwrap_or_default());
    }
    out
}

/// Takes a fetched document: `Ok(true)` when it replaced the held bundle.
fn take(
    path: &Path,
    bytes: Bytes,
    others: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<bool, FetchError> {
    let got = bundle::parse(&bytes)?;
    if got.authorities.iter().any(|c| others.contains(c)) {
        return Err(FetchError::Bundle(BundleError::Shared));
    }
    let current = held(path);
    if let Some((old_bytes, old)) = &current {
        if *old_bytes == bytes || old.authorities == got.authorities && got.sequence <= old.sequence
        {
            return Ok(false);
        }
        // a bundle without a sequence cannot roll one back that has one
        match (got.sequence, old.sequence) {
            (Some(g), Some(h)) if g < h => return Err(FetchError::Older { got: g, held: h }),
            (None, Some(h)) => return Err(FetchError::Older { got: 0, held: h }),
            _ => {}
        }
    }
    write_atomically(path, &bytes).map_err(|e| FetchError::Write(path.to_owned(), e))?;
    Ok(true)
}

/// Writes beside the file and renames over it: a reader sees the old bundle or the new
/// one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    // a bundle is public: readable as a file the operator wrote would be
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // the rename itself survives a crash once the directory is synced
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    Ok(())
}

/// One GET of the endpoint, its answer read to at most `bundle::MAX_BYTES`.
async fn get(url: &str, profile: &Profile, cx: &Ctx) -> Result<Bytes, FetchError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| FetchError::Url(format!("{url}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| FetchError::Url(format!("{url} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tls = match profile {
        Profile::Web => web_config()?,
        // the bundle files as they are now: for a domain serving its own bundle, the
        // last one fetched vouches for the endpoint
        Profile::Spiffe(id) => PeerTls::load(&cx.files, cx.crl.as_deref(), &cx.domains)
            .and_then(|t| t.config(id, &[b"http/1.1"]))
            .map_err(|e| FetchError::Tls(e.to_string()))?,
    };
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| FetchError::Url(format!("{url}: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(FetchError::Connect)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| FetchError::Tls(e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or(host);
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    if resp.status() != http::StatusCode::OK {
        return Err(FetchError::Status(resp.status()));
    }
    let body = Limited::new(resp.into_body(), bundle::MAX_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::Bundle(BundleError::TooLarge)
            } else {
                FetchError::Http(e.to_string())
            }
        })?;
    Ok(body.to_bytes())
}

/// `https_web`: the system's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured),
/// the URL's host name checked as a browser would.
fn web_config() -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(FetchError::Tls(format!(
            "no system root certificates could be read ({} errors)",
            found.errors.len()
        )));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(crate::identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
