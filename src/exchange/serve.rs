//! Serving this node's own trust domain's bundle (`[bundle_endpoint]`): the CAs of
//! `[tls] ca` as a SPIFFE bundle, at `/`, over TLS with the node's certificate (the
//! `https_spiffe` profile: fetchers check the node's SPIFFE ID) and no client
//! certificate asked for, as the SPIFFE federation specification says. Its
//! `spiffe_sequence` is the CA file's modification time in seconds, so that it only
//! grows as the file is replaced; the document and the TLS material are built again
//! when the files change. The port is open to strangers: one request per connection, a
//! handshake and a request within 10 s each, at most 256 connections at once.

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
const TIMEOUT: Duration = Duration::from_secs(10);

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
        match self.build(now) {
            Ok(m) => {
                let m = Arc::new(m);
                *cur = Some(m.clone());
                Some(m)
            }
            Err(e) => {
                tracing::error!(error = %e, "bundle endpoint: the node's files do not load; the last bundle that did keeps being served");
                // not tried again until the files change once more
                if let Some(old) = cur.take() {
                    let kept = Arc::new(Material {
                        stamp: stamp(&self.files),
                        tls: old.tls.clone(),
                        doc: old.doc.clone(),
                    });
                    *cur = Some(kept.clone());
                    return Some(kept);
                }
                None
            }
        }
    }

    fn build(&self, stamp: Stamp) -> Result<Material, String> {
        // checked to be a pair, then given to rustls as files
        load_certified_key(&self.files).map_err(|e| e.to_string())?;
        let chain = crate::identity::load_certs(&self.files.cert).map_err(|e| e.to_string())?;
        let key = crate::identity::load_key(&self.files.key).map_err(|e| e.to_string())?;
        let cas = crate::identity::load_certs(&self.files.ca).map_err(|e| e.to_string())?;
        let sequence = std::fs::metadata(&self.files.ca)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
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
    });
    let _ = served.material();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.reject("bundle_endpoint", Reason::MaxConnections);
            continue;
        };
        let Some(m) = served.material() else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let acceptor = tokio_rustls::TlsAcceptor::from(m.tls.clone());
            let Ok(Ok(tls)) = tokio::time::timeout(TIMEOUT, acceptor.accept(tcp)).await else {
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
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
