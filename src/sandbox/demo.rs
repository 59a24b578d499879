//! The sandbox's demo services: a gRPC echo (`demo.Echo`, any method answers with the
//! messages it was sent; `Fail` answers NOT_FOUND) over h2c, and JSON HTTP/1.1
//! services that tell the caller which instance answered and which identity fedport
//! vouched for, and a TCP key-value store speaking enough of Redis's protocol (RESP:
//! PING, SET, GET, DEL, in arrays as redis-cli sends them or inline as `nc` does) for
//! redis-cli. Each instance can be stopped and started again (as a crash and a restart
//! would) through the sandbox's control port, to watch traffic move.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

/// One demo instance: its name (`inventory@eu-a`), address, and whether it runs.
pub struct Instance {
    pub name: String,
    pub addr: std::net::SocketAddr,
    running: tokio::sync::watch::Sender<bool>,
}

impl Instance {
    pub fn is_running(&self) -> bool {
        *self.running.borrow()
    }

    pub fn set_running(&self, on: bool) {
        self.running.send_replace(on);
    }
}

/// What an instance serves.
#[derive(Clone, Copy)]
pub enum Kind {
    GrpcEcho,
    Json,
    /// A TCP service: the key-value store.
    Kv,
}

/// Binds an instance on a free loopback port; [`run`] serves it.
pub fn instance(name: &str) -> std::io::Result<(Instance, std::net::TcpListener)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let (running, _) = tokio::sync::watch::channel(true);
    Ok((
        Instance {
            name: name.to_owned(),
            addr: l.local_addr()?,
            running,
        },
        l,
    ))
}

/// Serves an instance until the process ends: while stopped its port refuses
/// connections and its open connections are cut.
pub async fn run(inst: std::sync::Arc<Instance>, first: std::net::TcpListener, kind: Kind) {
    let mut rx = inst.running.subscribe();
    let mut first = Some(first);
    loop {
        let listener = match first.take() {
            Some(l) => TcpListener::from_std(l),
            None => TcpListener::bind(inst.addr).await,
        };
        let Ok(listener) = listener else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let s = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = rx.wait_for(|on| !*on) => break,
            };
            let _ = s.set_nodelay(true);
            let name = inst.name.clone();
            conns.spawn(serve_conn(s, kind, name));
        }
        drop(listener);
        conns.abort_all();
        if rx.wait_for(|on| *on).await.is_err() {
            return;
        }
    }
}

async fn serve_conn(s: tokio::net::TcpStream, kind: Kind, name: String) {
    if let Kind::Kv = kind {
        return kv(s, &name).await;
    }
    let io = TokioIo::new(s);
    match kind {
        Kind::Kv => {}
        Kind::GrpcEcho => {
            let svc =
                service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(echo(req)) });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        }
        Kind::Json => {
            let svc = service_fn(move |req: Request<Incoming>| {
                let name = name.clone();
                async move { Ok::<_, Infallible>(inventory(req, &name).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        }
    }
}

/// The key-value store's keys, shared by its connections (at most 10,000 keys of at
/// most 64 KiB each: a demo, not a cache).
static KV: std::sync::Mutex<Option<std::collections::HashMap<Vec<u8>, Vec<u8>>>> =
    std::sync::Mutex::new(None);

/// Serves one connection of the key-value store until the caller closes it.
async fn kv(s: tokio::net::TcpStream, name: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(70_000).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let head = String::from_utf8_lossy(&line).trim().to_owned();
        // a RESP array (`*N`, then N bulk strings), or an inline command
        let args: Vec<Vec<u8>> = match head.strip_prefix('*').map(str::parse::<usize>) {
            Some(Ok(n)) if n <= 8 => {
                let mut args = Vec::new();
                for _ in 0..n {
                    line.clear();
                    if (&mut r)
                        .take(100)
                        .read_until(b'\n', &mut line)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let len = String::from_utf8_lossy(&line)
                        .trim()
                        .strip_prefix('$')
                        .and_then(|l| l.parse::<usize>().ok());
                    let Some(len) = len.filter(|&l| l <= 64 << 10) else {
                        let _ = w
                            .write_all(b"-ERR bulk string too long or malformed\r\n")
                            .await;
                        return;
                    };
                    let mut arg = vec![0; len + 2];
                    if r.read_exact(&mut arg).await.is_err() {
                        return;
                    }
                    arg.truncate(len);
                    args.push(arg);
                }
                args
            }
            Some(_) => return,
            None => head
                .split_whitespace()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
        };
        let Some(cmd) = args.first().map(|c| c.to_ascii_uppercase()) else {
            continue;
        };
        if cmd == b"QUIT" {
            let _ = w.write_all(b"+OK\r\n").await;
            return;
        }
        let reply: Vec<u8> = {
            let mut g = KV.lock().unwrap_or_else(|e| e.into_inner());
            let map = g.get_or_insert_with(Default::default);
            match (cmd.as_slice(), &args[1..]) {
                (b"PING", []) => b"+PONG\r\n".to_vec(),
                (b"SET", [k, v]) if map.len() < 10_000 || map.contains_key(k) => {
                    map.insert(k.clone(), v.clone());
                    b"+OK\r\n".to_vec()
                }
                (b"SET", [_, _]) => b"-ERR the demo store is full\r\n".to_vec(),
                (b"GET", [k]) => match map.get(k) {
                    Some(v) => [format!("${}\r\n", v.len()).as_bytes(), v, b"\r\n"].concat(),
                    None => b"$-1\r\n".to_vec(),
                },
                (b"DEL", [k]) => format!(":{}\r\n", map.remove(k).is_some() as u8).into_bytes(),
                // redis-cli asks for its command table when it starts: none here
                (b"COMMAND", _) => b"*0\r\n".to_vec(),
                (b"INFO", _) => {
                    let text = format!("# Server\r\nserved_by:{name}\r\n");
                    format!("${}\r\n{text}\r\n", text.len()).into_bytes()
                }
                _ => b"-ERR the demo store knows PING, SET, GET, DEL and INFO\r\n".to_vec(),
            }
        };
        if w.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The sandbox's control port: `POST /stop/NAME` and `POST /start/NAME` stop and start
/// a demo instance; `GET /` lists them.
pub async fn control(
    listener: TcpListener,
    instances: std::sync::Arc<Vec<std::sync::Arc<Instance>>>,
) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let instances = instances.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let instances = instances.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let (status, text) = match path.split_once('/').map(|(_, r)| r.split_once('/'))
                    {
                        Some(Some((verb @ ("stop" | "start"), name)))
                            if req.method() == http::Method::POST =>
                        {
                            match instances.iter().find(|i| i.name == name) {
                                Some(i) => {
                                    i.set_running(verb == "start");
                                    (
                                        StatusCode::OK,
                                        format!(
                                            "{name}: {}\n",
                                            if verb == "start" {
                                                "running"
                                            } else {
                                                "stopped"
                                            }
                                        ),
                                    )
                                }
                                None => (StatusCode::NOT_FOUND, format!("no instance {name}\n")),
                            }
                        }
                        _ => (
                            StatusCode::OK,
                            instances
                                .iter()
                                .map(|i| {
                                    format!(
                                        "{} {} {}\n",
                                        i.name,
                                        i.addr,
                                        if i.is_running() { "running" } else { "stopped" }
                                    )
                                })
                                .collect(),
                        ),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(text)));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn echo(req: Request<Incoming>) -> Response<Body> {
    let fail = req.uri().path().ends_with("/Fail");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        if !fail {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(data) = f.into_data() {
                            if tx.send(Ok(Frame::data(data))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        }
        let mut t = HeaderMap::new();
        if fail {
            t.insert("grpc-status", HeaderValue::from_static("5"));
            t.insert(
                "grpc-message",
                HeaderValue::from_static("demo: nothing here"),
            );
        } else {
            t.insert("grpc-status", HeaderValue::from_static("0"));
        }
        let _ = tx.send(Ok(Frame::trailers(t))).await;
    });
    let stream = tokio_stream_from(rx);
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core_shim::Stream<Item = T> {
    futures_core_shim::from_fn(move |cx| rx.poll_recv(cx))
}

/// A minimal `Stream` from a poll function, so the demo needs no stream crate.
mod futures_core_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub use futures_core::Stream;

    pub struct FromFn<F>(F);

    impl<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin> Stream for FromFn<F> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            (self.0)(cx)
        }
    }

    pub fn from_fn<T, F: FnMut(&mut Context<'_>) -> Poll<Option<T>> + Unpin>(f: F) -> FromFn<F> {
        FromFn(f)
    }
}

async fn inventory(req: Request<Incoming>, name: &str) -> Response<Body> {
    let peer = req
        .headers()
        .get("fed-peer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let hops_header = req.headers().get("fed-hops").cloned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let hops = hops_header
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_owned();
    let (status, json) = match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => (StatusCode::OK, serde_json::json!({ "ok": true })),
        ("GET", "/v1/items") => (
            StatusCode::OK,
            serde_json::json!({ "items": [{"sku": "apple", "count": 12}, {"sku": "pear", "count": 3}], "served_by": name, "fed_hops": hops, "seen_peer": peer }),
        ),
        ("GET", "/v1/prices") => (
            StatusCode::OK,
            serde_json::json!({ "prices": [{"sku": "apple", "cents": 45}], "served_by": name, "fed_hops": hops, "seen_peer": peer }),
        ),
        ("POST", "/v1/reserve") => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => (
                StatusCode::OK,
                serde_json::json!({ "reserved": v, "seen_peer": peer }),
            ),
            Err(e) => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": e.to_string() }),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no such path", "path": path }),
        ),
    };
    let mut resp = Response::new(BodyExt::boxed(
        Full::new(Bytes::from(json.to_string())).map_err(|n| match n {}),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}
