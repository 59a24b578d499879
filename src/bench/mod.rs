//! `fedport bench`: an HTTP/2 and gRPC load generator with mutual TLS. Closed loop (a
//! fixed number of streams per connection, each sending its next request when the last
//! is answered) or open loop (a fixed total rate; latency is measured from when each
//! request was due, so a stalled server cannot hide its stall — no coordinated
//! omission). Latency goes into an HdrHistogram; the summary gives throughput,
//! percentiles and outcomes by status or refusal reason, as text or JSON.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("URL {0:?} is not https://host:port/path or http://host:port/path (h2c)")]
    Url(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// What to send and how.
#[derive(Debug, Clone)]
pub struct Plan {
    pub url: String,
    pub connections: usize,
    pub streams: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    /// Open loop: total requests per second. `None`: closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    /// How long one request may take (`error:timeout` past it).
    pub timeout: Duration,
    pub method: http::Method,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Frame the body as one gRPC message and send gRPC headers.
    pub grpc: bool,
    pub tls: Option<crate::identity::TlsFiles>,
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub latency_ms: BTreeMap<String, f64>,
    /// By outcome: `200`, `grpc OK`, `grpc UNAVAILABLE`, `refused:denied`, `error:reset`…
    pub outcomes: BTreeMap<String, u64>,
    pub errors: u64,
}

struct Target {
    scheme: String,
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, BenchError> {
    let bad = || BenchError::Url(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    if scheme != "https" && scheme != "http" {
        return Err(bad());
    }
    let hostport = rest.split_once('/').map_or(rest, |(h, _)| h);
    let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
    Ok(Target {
        scheme: scheme.to_owned(),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port: port.parse().map_err(|_| bad())?,
    })
}

/// Shared results of all workers.
struct Tally {
    hist: hdrhistogram::Histogram<u64>,
    outcomes: BTreeMap<String, u64>,
    requests: u64,
    errors: u64,
}

impl Tally {
    fn record(&mut self, micros: u64, outcome: String, error: bool) {
        let _ = self.hist.record(micros.max(1));
        self.count(outcome, error);
    }

    /// An outcome with no latency to speak of (the connection was gone before the
    /// request could be sent): counted, kept out of the percentiles.
    fn count(&mut self, outcome: String, error: bool) {
        *self.outcomes.entry(outcome).or_default() += 1;
        self.requests += 1;
        if error {
            self.errors += 1;
        }
    }
}

/// The outcome of a request that never left: its connection is closed.
const NO_CONNECTION: &str = "error:connection";

async fn connect(
    t: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<SendRequest<Full<Bytes>>, BenchError> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let fail = |e: String| BenchError::Connect(format!("{}:{}", t.host, t.port), e);
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let builder = || {
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_concurrent_reset_streams(1024);
        b
    };
    match (t.scheme.as_str(), tls) {
        ("https", Some(cfg)) => {
            let name = rustls_pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| fail(e.to_string()))?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let (send, conn) = builder()
                .handshake(TokioIo::new(s))
                .await
                .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(conn);
            Ok(send)
        }
        ("https", None) => Err(fail("https needs --cert, --key and --ca".into())),
        _ => {
            let (send, conn) = builder()
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(conn);
            Ok(send)
        }
    }
}

/// Sends one request; its outcome label and whether it counts as an error.
async fn one(
    s: &mut SendRequest<Full<Bytes>>,
    plan: &Plan,
    uri: &http::Uri,
    body: &Bytes,
) -> (String, bool) {
    let mut req = http::Request::builder()
        .method(plan.method.clone())
        .uri(uri.clone());
    if plan.grpc {
        req = req
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
    }
    for (k, v) in &plan.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let Ok(req) = req.body(Full::new(body.clone())) else {
        return ("error:request".into(), true);
    };
    if s.ready().await.is_err() {
        return (NO_CONNECTION.into(), true);
    }
    let exchange = async {
        let resp = s.send_request(req).await.map_err(|_| "error:reset")?;
        let status = resp.status().as_u16();
        let head = resp.headers().clone();
        let done = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "error:reset")?;
        Ok::<_, &'static str>((status, head, done))
    };
    let (status, head, done) = match tokio::time::timeout(plan.timeout, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return (e.into(), true),
        Err(_) => return ("error:timeout".into(), true),
    };
    let refused = head
        .get(crate::errors::FED_REFUSED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let head_grpc = head
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let grpc = head_grpc.or_else(|| {
        done.trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    if let Some(r) = refused {
        return (format!("refused:{r}"), true);
    }
    match grpc.filter(|_| plan.grpc) {
        Some(g) => (
            format!("grpc {}", crate::telemetry::grpc_code_name(&g)),
            g != "0",
        ),
        // a gRPC call answered 200 without a status failed (INTERNAL, to gRPC clients)
        None if plan.grpc && status == 200 => ("grpc NONE".into(), true),
        None => (status.to_string(), status >= 400),
    }
}

/// Runs the plan on one thread (like `h2load -t 1`) and returns what it measured.
pub fn run(plan: Plan) -> Result<Summary, BenchError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    rt.block_on(run_async(plan))
}

async fn run_async(plan: Plan) -> Result<Summary, BenchError> {
    let t = parse_url(&plan.url)?;
    let tls = match &plan.tls {
        Some(files) => Some(crate::identity::client_config(files, &[b"h2"])?),
        None => None,
    };
    let uri: http::Uri = plan
        .url
        .parse()
        .map_err(|_| BenchError::Url(plan.url.clone()))?;
    let body = if plan.grpc {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(plan.body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&plan.body);
        Bytes::from(framed)
    } else {
        plan.body.clone()
    };
    let mut conns = Vec::new();
    for _ in 0..plan.connections.max(1) {
        conns.push(connect(&t, tls.clone()).await?);
    }
    let tally = Arc::new(Mutex::new(Tally {
        hist: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("valid histogram bounds"),
        outcomes: BTreeMap::new(),
        requests: 0,
        errors: 0,
    }));
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = plan.duration.map(|d| measure_from + d);
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(
        plan.requests.unwrap_or(u64::MAX),
    ));
    let take = |b: &std::sync::atomic::AtomicU64| {
        b.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| n.checked_sub(1),
        )
        .is_ok()
    };
    let plan = Arc::new(plan);
    let mut tasks = tokio::task::JoinSet::new();
    let progress = plan.progress.then(|| {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = tally.lock().map(|t| t.requests).unwrap_or(0);
                eprint!("\r{:>8.1}s  {n} requests", start.elapsed().as_secs_f64());
            }
        })
    });
    match plan.rate {
        None => {
            // closed loop: `streams` requests in flight per connection
            for s in &conns {
                for _ in 0..plan.streams.max(1) {
                    let (mut s, plan, uri, body, tally, budget, tls) = (
                        s.clone(),
                        plan.clone(),
                        uri.clone(),
                        body.clone(),
                        tally.clone(),
                        budget.clone(),
                        tls.clone(),
                    );
                    let target = Target {
                        scheme: t.scheme.clone(),
                        host: t.host.clone(),
                        port: t.port,
                    };
                    tasks.spawn(async move {
                        loop {
                            if end.is_some_and(|e| Instant::now() >= e) || !take(&budget) {
                                break;
                            }
                            let sent = Instant::now();
                            let (outcome, error) = one(&mut s, &plan, &uri, &body).await;
                            let gone = outcome == NO_CONNECTION;
                            if sent >= measure_from {
                                if let Ok(mut t) = tally.lock() {
                                    if gone {
                                        t.count(outcome, error);
                                    } else {
                                        t.record(sent.elapsed().as_micros() as u64, outcome, error);
                                    }
                                }
                            }
                            if gone {
                                // the server closed it (GOAWAY, a drain): a new one, not a
                                // spin on a dead one
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                if let Ok(new) = connect(&target, tls.clone()).await {
                                    s = new;
                                }
                            }
                        }
                    });
                }
            }
        }
        Some(rate) => {
            // open loop: request i is due at start + i / rate, whatever happened before;
            // its latency counts from then
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let cap = plan.connections.max(1) * plan.streams.max(1) * 64;
            let dead: Vec<Arc<std::sync::atomic::AtomicBool>> =
                conns.iter().map(|_| Arc::default()).collect();
            let mut i: u64 = 0;
            loop {
                let due = start + interval.mul_f64(i as f64);
                if end.is_some_and(|e| due >= e) || !take(&budget) {
                    break;
                }
                // tokio's timer has whole milliseconds and rounds up: sleeping to
                // `due` itself would send up to 1 ms late, and that lateness, the load
                // generator's own, would count as latency. Sleep to a millisecond
                // before, then yield until it is time.
                if let Some(early) = due.checked_sub(Duration::from_millis(1)) {
                    if early > Instant::now() {
                        tokio::time::sleep_until(early.into()).await;
                    }
                }
                while Instant::now() < due {
                    tokio::task::yield_now().await;
                }
                while tasks.len() >= cap {
                    tasks.join_next().await;
                }
                let k = (i as usize) % conns.len();
                // a connection the server closed (GOAWAY) is replaced before it is used
                if dead[k].swap(false, std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(new) = connect(&t, tls.clone()).await {
                        conns[k] = new;
                    }
                }
                let mut s = conns[k].clone();
                let dead_k = dead[k].clone();
                let (plan, uri, body, tally) =
                    (plan.clone(), uri.clone(), body.clone(), tally.clone());
                tasks.spawn(async move {
                    let (outcome, error) = one(&mut s, &plan, &uri, &body).await;
                    if outcome == NO_CONNECTION {
                        dead_k.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if due >= measure_from {
                        if let Ok(mut t) = tally.lock() {
                            if outcome == NO_CONNECTION {
                                t.count(outcome, error);
                            } else {
                                t.record(due.elapsed().as_micros() as u64, outcome, error);
                            }
                        }
                    }
                });
                i += 1;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let measured = Instant::now()
        .saturating_duration_since(measure_from)
        .as_secs_f64()
        .max(1e-9);
    let t = tally
        .lock()
        .map_err(|_| BenchError::Runtime(std::io::Error::other("poisoned")))?;
    let q = |p: f64| t.hist.value_at_quantile(p) as f64 / 1000.0;
    let mut latency_ms = BTreeMap::new();
    for (k, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
        latency_ms.insert(k.to_owned(), q(p));
    }
    latency_ms.insert("max".into(), t.hist.max() as f64 / 1000.0);
    latency_ms.insert("mean".into(), t.hist.mean() / 1000.0);
    Ok(Summary {
        requests: t.requests,
        seconds: measured,
        rps: t.requests as f64 / measured,
        latency_ms,
        outcomes: t.outcomes.clone(),
        errors: t.errors,
    })
}

/// The summary as text.
pub fn text(s: &Summary) -> String {
    let mut out = format!(
        "requests: {}  in {:.2} s  =  {:.0} req/s\nlatency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n",
        s.requests,
        s.seconds,
        s.rps,
        s.latency_ms["p50"],
        s.latency_ms["p90"],
        s.latency_ms["p99"],
        s.latency_ms["p99.9"],
        s.latency_ms["max"]
    );
    out.push_str(&format!("errors: {}\noutcomes:", s.errors));
    for (k, v) in &s.outcomes {
        out.push_str(&format!("  {k}: {v}"));
    }
    out.push('\n');
    out
}
