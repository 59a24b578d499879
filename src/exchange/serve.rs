//! Serving this node's own trust domain's bundle (`[bundle_endpoint]`): the CAs of
//! `[tls] ca` as a SPIFFE bundle, at `/`, over TLS with the node's certificate (the
//! `https_spiffe` profile: fetchers check the node's SPIFFE ID) and no client
//! certificate asked for, as the SPIFFE federation specification says. Its
//! `spiffe_sequence` is the newest CA's notBefore (seconds since 1970), so that nodes
//! serving the same CAs agree and a rotation raises it; the document and the TLS
//! material are built again when the files change. The port is open to strangers: one
//! request per connection, the handshake within 3 s and the whole exchange within 5 s,
//! at most 256 connections at once and 8 from one address.

use crate::config::ServeBundle;
use crate::identity::{bundle, load_certified_key, TlsFiles};
use crate::reason::Reason;
use crate::telemetry::Metrics;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const MAX_CONNECTIONS: usize = 256;
const PER_SOURCE: usize = 8;
const HANDSHAKE: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(5);

/// A place of one source address's, given back when dropped.
struct Source(
    Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    std::net::IpAddr,
);

impl Source {
    fn take(
        map: &Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        let mut m = map.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Self(map.clone(), ip))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.1);
                }
            }
        }
    }
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// What one version of the files gives: the TLS material and the document.
struct Material {
    stamp: Stamp,
    tls: Arc<rustls::ServerConfig>,
    doc: Bytes,
}

struct Served {
    files: TlsFiles,
    refresh_hint: Duration,
    current: Mutex<Option<Arc<Material>>>,
    /// The files' stamp when they last failed to load.
    failed: Mutex<Option<Stamp>>,
}

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl Served {
    /// The material for the files as they are now: built again when one changed; the
    /// last that loaded when the new files do not.
    fn material(&self) -> Option<Arc<Material>> {
        let now = stamp(&self.files);
        let mut cur = self.current.lock().ok()?;
        if let Some(m) = cur.as_ref().filter(|m| m.stamp == now) {
            return Some(m.clone());
        }
        if self.failed.lock().ok()?.as_ref() == Some(&now) {
            return cur.clone();
        }
        match self.build(now.clone()) {
            Ok(m) => {
                let m = Arc::new(m);
                *cur = Some(m.clone());
                Some(m)
            }
            Err(e) => {
                // not tried again, nor logged again, until the files change once more
                let mut failed = self.failed.lock().ok()?;
                if failed.as_ref() != Some(&now) {
                    tracing::error!(error = %e, "bundle endpoint: the node's files do not load; the last bundle that did keeps being served");
                    *failed = Some(now.clone());
                }
                cur.clone()
            }
        }
    }

    fn build(&self, stamp: Stamp) -> Result<Material, String> {
        // checked to be a pair, then given to rustls as files
        load_certified_key(&self.files).map_err(|e| e.to_string())?;
        let chain = crate::identity::load_certs(&self.files.cert).map_err(|e| e.to_string())?;
        let key = crate::identity::load_key(&self.files.key).map_err(|e| e.to_string())?;
        let cas = crate::identity::load_certs(&self.files.ca).map_err(|e| e.to_string())?;
        // from the contents, so that replicas serving the same CAs agree: the newest
        // CA's notBefore, which a rotation (adding a newer CA) raises
        let sequence = cas
            .iter()
            .filter_map(|c| crate::identity::validity(c, &self.files.ca).ok())
            .filter_map(|(from, _)| from.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .max()
            .unwrap_or(0);
        let doc = bundle::render(&cas, sequence, self.refresh_hint).map_err(|e| e.to_string())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::identity::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Material {
            stamp,
            tls: Arc::new(tls),
            doc: doc.into(),
        })
    }
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves until the listener's task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServeBundle,
    files: TlsFiles,
    metrics: Arc<Metrics>,
) {
    let served = Arc::new(Served {
        files,
        refresh_hint: cfg.refresh_hint,
        current: Mutex::new(None),
        failed: Mutex::new(None),
    });
    let per_source: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
    let _ = served.material();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.reject("bundle_endpoint", Reason::MaxConnections);
            continue;
        };
        // no one source holds more than a few of the places
        let ip = remote.ip().to_canonical();
        let Some(source) = Source::take(&per_source, ip) else {
            metrics.reject("bundle_endpoint", Reason::MaxConnections);
            continue;
        };
        let Some(m) = served.material() else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let (_slot, _source) = (slot, source);
            let acceptor = tokio_rustls::TlsAcceptor::from(m.tls.clone());
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await else {
                metrics.reject("bundle_endpoint", Reason::Tls);
                return;
            };
            let doc = m.doc.clone();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let doc = doc.clone();
                let metrics = metrics.clone();
                async move {
                    let r = match (req.method(), req.uri().path()) {
                        (&http::Method::GET | &http::Method::HEAD, "/") => {
                            answer(StatusCode::OK, doc)
                        }
                        (_, "/") => {
                            metrics.reject("bundle_endpoint", Reason::BadRequest);
                            answer(
                            StatusCode::METHOD_NOT_ALLOWED,
                            Bytes::from_static(br#"{"error":{"reason":"bad_request","message":"the bundle endpoint answers GET /"}}"#),
                        )
                        }
                        _ => {
                            metrics.reject("bundle_endpoint", Reason::UnknownService);
                            answer(
                                StatusCode::NOT_FOUND,
                                Bytes::from_static(br#"{"error":{"reason":"unknown_service","message":"the bundle endpoint answers GET / only"}}"#),
                            )
                        }
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tls), svc);
            // the whole exchange within one deadline: a reader too slow for a bundle
            // gives its place back
            let _ = tokio::time::timeout(TIMEOUT, conn).await;
        });
    }
}
