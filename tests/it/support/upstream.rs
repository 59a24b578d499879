//! Real upstream services on loopback for the tests (hyper, HTTP/1.1 or h2c):
//! `/slow?ms=N` waits, `/count` reads the body and answers its length, `/status/N`
//! answers N, `/big?n=BYTES` answers that many bytes, anything else answers the request's method, path and headers as JSON.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    Http1,
    H2c,
}

pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests whose head reached this upstream.
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted.
    pub conns: Arc<AtomicUsize>,
    /// Requests in progress now, and the most ever at once.
    pub inflight: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    /// The headers of every request that arrived (the last 10,000), in order.
    pub seen: Arc<Mutex<Vec<http::HeaderMap>>>,
    running: tokio::sync::watch::Sender<bool>,
    /// Serves TLS (`https://localhost:PORT`).
    tls: bool,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn url(&self, proto: Proto) -> String {
        match proto {
            _ if self.tls => format!("https://localhost:{}", self.addr.port()),
            Proto::Http1 => format!("http://{}", self.addr),
            Proto::H2c => format!("h2c://{}", self.addr),
        }
    }

    /// Stops as a crashed process would: the port refuses connections and every open
    /// connection is cut, requests in flight included.
    pub fn stop(&self) {
        self.running.send_replace(false);
        crate::support::wait_until("the upstream port to close", Duration::from_secs(5), || {
            std::net::TcpStream::connect(self.addr).is_err()
        });
    }

    /// Listens on the same address again.
    pub fn restart(&self) {
        self.running.send_replace(true);
        crate::support::wait_until("the upstream port to open", Duration::from_secs(5), || {
            std::net::TcpStream::connect(self.addr).is_ok()
        });
    }

    /// A header of every request seen so far, in arrival order.
    pub fn seen_header(&self, name: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|h| {
                h.get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }
}

/// Starts an upstream on its own thread; it lives until the test process ends.
/// Besides `/slow?ms=N`, a request header `x-sleep-ms: N` makes it wait before answering,
/// and `x-reply-fed-refused: V` makes it answer 503 with `fed-refused: V`.
pub fn start(proto: Proto) -> Upstream {
    start_with(proto, None)
}

/// [`start`] behind TLS with `files` (offering only `proto` by ALPN: h2 for
/// [`Proto::H2c`], http/1.1 for [`Proto::Http1`]); clients must present a certificate
/// of the same CA.
pub fn start_tls(proto: Proto, files: &fedport::identity::TlsFiles) -> Upstream {
    let alpn: &[&[u8]] = match proto {
        Proto::H2c => &[b"h2"],
        Proto::Http1 => &[b"http/1.1"],
    };
    let cfg = fedport::identity::server_config(files, alpn, false, None, &[]).unwrap();
    start_with(proto, Some(tokio_rustls::TlsAcceptor::from(cfg)))
}

fn start_with(proto: Proto, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    let is_tls = tls.is_some();
    let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_l.set_nonblocking(true).unwrap();
    let addr = std_l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let inflight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (running, mut run_rx) = tokio::sync::watch::channel(true);
    let (h, c, inf, pk, sn) = (
        hits.clone(),
        conns.clone(),
        inflight.clone(),
        peak.clone(),
        seen.clone(),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut std_l = Some(std_l);
            loop {
                let l = match std_l.take() {
                    Some(l) => tokio::net::TcpListener::from_std(l).unwrap(),
                    None => tokio::net::TcpListener::bind(addr).await.unwrap(),
                };
                let mut tasks = tokio::task::JoinSet::new();
                loop {
                    let (s, _) = tokio::select! {
                        r = l.accept() => r.unwrap(),
                        stop = run_rx.wait_for(|r| !*r) => {
                            if stop.is_err() {
                                // the test is over
                                tasks.abort_all();
                                return;
                            }
                            break;
                        }
                    };
                    s.set_nodelay(true).unwrap();
                    c.fetch_add(1, Ordering::SeqCst);
                    let (h, inf, pk, sn) = (h.clone(), inf.clone(), pk.clone(), sn.clone());
                    let tls = tls.clone();
                    tasks.spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            h.fetch_add(1, Ordering::SeqCst);
                            {
                                let mut seen = sn.lock().unwrap();
                                if seen.len() < 10_000 {
                                    seen.push(req.headers().clone());
                                }
                            }
                            let now = inf.fetch_add(1, Ordering::SeqCst) + 1;
                            pk.fetch_max(now, Ordering::SeqCst);
                            let inf = inf.clone();
                            async move {
                                let r = answer(req).await;
                                inf.fetch_sub(1, Ordering::SeqCst);
                                r
                            }
                        });
                        let io: Box<dyn Io> = match &tls {
                            Some(acceptor) => match acceptor.accept(s).await {
                                Ok(t) => Box::new(t),
                                Err(_) => return,
                            },
                            None => Box::new(s),
                        };
                        let io = TokioIo::new(io);
                        match proto {
                            Proto::Http1 => {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(io, svc)
                                    .await;
                            }
                            Proto::H2c => {
                                let _ =
                                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                        .max_concurrent_streams(4096)
                                        .serve_connection(io, svc)
                                        .await;
                            }
                        }
                    });
                }
                // stopped: the port closes and every connection is cut
                drop(l);
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                if run_rx.wait_for(|r| *r).await.is_err() {
                    return;
                }
            }
        });
    });
    Upstream {
        addr,
        hits,
        conns,
        inflight,
        peak,
        seen,
        running,
        tls: is_tls,
    }
}

/// A connection's byte stream, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn json(status: u16, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(ms) = req
        .headers()
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(ms) = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // a service that reads the whole request before it answers, as a gRPC unary
    // handler does (an error reading it is its answer)
    if req.headers().contains_key("x-read-body") {
        let (parts, body) = req.into_parts();
        let collected = match body.collect().await {
            Ok(c) => c,
            Err(e) => return Ok(json(500, serde_json::json!({ "error": e.to_string() }))),
        };
        let mut headers = serde_json::Map::new();
        for (k, v) in &parts.headers {
            headers.insert(
                k.as_str().to_owned(),
                serde_json::json!([v.to_str().unwrap_or("?")]),
            );
        }
        let mut trailers = serde_json::Map::new();
        for (k, v) in collected.trailers().into_iter().flatten() {
            trailers.insert(
                k.as_str().to_owned(),
                serde_json::json!(v.to_str().unwrap_or("?")),
            );
        }
        return Ok(json(
            200,
            serde_json::json!({ "path": path, "headers": headers, "trailers": trailers }),
        ));
    }
    // a large answer: `/big?n=BYTES`
    if path == "/big" {
        let n: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("n="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20);
        let mut r = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
        r.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return Ok(r);
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut n: u64 = 0;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(e) => return Ok(json(500, serde_json::json!({ "error": e.to_string() }))),
            }
        }
        return Ok(json(200, serde_json::json!({ "bytes": n })));
    }
    // a service that claims fedport's own refusal header, as a peer's node would
    if let Some(v) = req.headers().get("x-reply-fed-refused") {
        let mut r = json(503, serde_json::json!({ "status": 503 }));
        r.headers_mut().insert("fed-refused", v.clone());
        return Ok(r);
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        return Ok(json(code, serde_json::json!({ "status": code })));
    }
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let e = headers
            .entry(k.as_str().to_owned())
            .or_insert_with(|| serde_json::json!([]));
        e.as_array_mut().unwrap().push(serde_json::Value::String(
            v.to_str().unwrap_or("?").to_owned(),
        ));
    }
    let body = json(
        200,
        serde_json::json!({
            "method": req.method().as_str(),
            "path": path,
            "version": format!("{:?}", req.version()),
            // the authority the request was for: HTTP/2's :authority, else Host
            "authority": req.uri().authority().map(|a| a.to_string())
                .or_else(|| req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_owned)),
            "headers": headers,
        }),
    );
    Ok(body)
}
