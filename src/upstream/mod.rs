//! Upstream connections of one worker: per endpoint a few multiplexed HTTP/2
//! connections (or a pool of idle HTTP/1.1 ones), recycled after a bounded number of
//! requests, and power-of-two-choices across a service's endpoints; and the reverse
//! links peers that can only dial out opened to this node (`reverse`).

pub mod reverse;

use crate::config::{Endpoint, Scheme};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// What fedport sends upstream: the caller's body streamed through its size guard, or
/// one small piece.
pub type ProxyBody = Either<crate::schema::Guarded, Full<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The request certainly did not reach the service.
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    /// The service refused the stream before processing it (HTTP/2 REFUSED_STREAM, or
    /// a GOAWAY whose last stream is below it): it did not reach the service, but its
    /// body is spent.
    #[error("stream refused before processing: {0}")]
    Refused(String),
    /// The request may have reached the service.
    #[error("{0}")]
    Exchange(String),
    /// Every HTTP/1.1 socket the node may open to the endpoint stayed busy until the
    /// request's deadline: it did not reach the service.
    #[error("all {1} HTTP/1.1 connections this worker may open to {0} stayed busy")]
    Busy(String, usize),
}

/// The largest window HTTP/2 allows (RFC 9113 6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Whether a request that failed (or was answered as unavailable) may be sent to
/// another target, as pingora's `RetryType` says it: asked of the failure, never read
/// from strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// It certainly reached no service: it may go elsewhere whatever its method, if its
    /// body can be sent again.
    Unprocessed,
    /// It may have reached the service: sent again only if its method is idempotent,
    /// within the service's retry budget.
    IfIdempotent,
    /// Never sent again: the answer (or the failure) goes back to the caller.
    Never,
}

impl UpstreamError {
    /// What the failure allows.
    pub fn retry(&self) -> Retry {
        match self {
            UpstreamError::Connect(..) | UpstreamError::Refused(_) | UpstreamError::Busy(..) => {
                Retry::Unprocessed
            }
            UpstreamError::Exchange(_) => Retry::IfIdempotent,
        }
    }
}

/// A request that did not get an answer: why, and the request itself when it never
/// left fedport (it may be sent elsewhere as it is).
pub struct Failed {
    pub error: UpstreamError,
    pub unsent: Option<Request<ProxyBody>>,
}

impl Failed {
    fn sent(error: UpstreamError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

/// Whether a hyper error is the server refusing the stream unprocessed: a
/// REFUSED_STREAM, or its GOAWAY naming a last stream below this one (h2 fails a
/// stream with the server's GOAWAY only then; RFC 9113 §6.8: such streams were not
/// processed, and may be retried).
fn refused(e: &hyper::Error) -> bool {
    use std::error::Error;
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<h2::Error>() {
            return h.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h.is_go_away() && h.is_remote());
        }
        src = s.source();
    }
    false
}

fn exchange_error(e: &hyper::Error) -> UpstreamError {
    if refused(e) {
        UpstreamError::Refused(describe(e))
    } else {
        UpstreamError::Exchange(describe(e))
    }
}

/// How upstream connections are made and recycled.
#[derive(Clone)]
pub struct Settings {
    pub max_requests: u64,
    pub h2_connections: usize,
    /// TLS for `https://` endpoints: the federation CA and the node's own certificate.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where connection attempts are counted (`fedport_upstream_connects_total`).
    pub metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// HTTP/2 keepalive PING interval and timeout: a connection whose PING goes
    /// unanswered is closed. Peers use the node's `peer_ping_*`; default 20 s / 10 s.
    pub keepalive: (Duration, Duration),
    /// The HTTP/2 stream window fedport grants the other end: what one answer may have
    /// sent that its caller has not read yet. The connection window is the largest
    /// HTTP/2 allows, so that answers nobody reads never hold back the other callers'
    /// answers on the same connection.
    pub stream_window: u32,
    /// A peer that dials this node (`[[peer]] reverse = true`, no address): requests go
    /// over the links it opened, found by its name, and no connection is dialled.
    /// (the links, the peer's name, its identity)
    pub reverse: Option<(Arc<crate::upstream::reverse::Links>, String, String)>,
}

/// The stream window for local endpoints (loopback: a small window covers the round
/// trip).
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The stream window for peer nodes, across regions.
pub const PEER_STREAM_WINDOW: u32 = 1024 * 1024;

/// The keepalive of connections to local endpoints.
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(10));

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

#[derive(Default)]
struct H2Slot {
    state: Mutex<Option<(http2::SendRequest<ProxyBody>, u64)>>,
    connecting: tokio::sync::Mutex<()>,
}

/// One endpoint's connections in one worker.
pub struct EndpointPool {
    pub endpoint: Endpoint,
    /// The endpoint's URL, for logs.
    pub label: Arc<str>,
    service: String,
    settings: Settings,
    outstanding: AtomicUsize,
    slots: Vec<H2Slot>,
    next: AtomicUsize,
    idle_h1: Mutex<Vec<http1::SendRequest<ProxyBody>>>,
    /// An `https://` endpoint that negotiated HTTP/1.1.
    https_is_h1: AtomicBool,
    /// HTTP/1.1 sockets this worker may have open to the endpoint (its share of the
    /// service's `max_connections`): each connection holds a permit while it lives.
    h1_sockets: Arc<tokio::sync::Semaphore>,
    h1_max: usize,
    /// An HTTP/1.1 connection came back idle.
    h1_returned: tokio::sync::Notify,
    /// Requests waiting for an HTTP/1.1 connection: newcomers queue behind them.
    h1_waiting: AtomicUsize,
}

/// Returned with a response from an HTTP/1.1 connection: hand it back when the
/// response body is done, so the connection is reused.
pub struct H1Return {
    sender: Option<http1::SendRequest<ProxyBody>>,
    pool: Arc<EndpointPool>,
}

impl Drop for H1Return {
    fn drop(&mut self) {
        if let Some(mut s) = self.sender.take() {
            let pool = self.pool.clone();
            // The connection becomes ready once hyper has finished the response; wait
            // for that off the request path.
            tokio::spawn(async move {
                if s.ready().await.is_ok() {
                    if let Ok(mut idle) = pool.idle_h1.lock() {
                        if idle.len() < 64 {
                            idle.push(s);
                        }
                    }
                    // a request waiting for a place under the cap takes it
                    pool.h1_returned.notify_one();
                }
            });
        }
    }
}

/// Counts a request as outstanding on an endpoint until dropped.
pub struct Outstanding(Arc<EndpointPool>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// TCP (no Nagle) and TLS to a peer's `host:port` with `tls` (which verifies the
/// peer's identity): the stream, and the address connected to.
pub async fn dial_peer(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<
    (
        tokio_rustls::client::TlsStream<TcpStream>,
        std::net::SocketAddr,
    ),
    String,
> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let remote = tcp.peer_addr().map_err(|e| e.to_string())?;
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = rustls_pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok((stream, remote))
}

/// No cap on HTTP/1.1 sockets (peers, health checks).
pub const UNCAPPED: usize = tokio::sync::Semaphore::MAX_PERMITS;

impl EndpointPool {
    /// `h1_max`: HTTP/1.1 sockets this pool may have open at once.
    pub fn new(endpoint: Endpoint, service: &str, settings: Settings, h1_max: usize) -> Arc<Self> {
        let slots = (0..settings.h2_connections)
            .map(|_| H2Slot::default())
            .collect();
        Arc::new(Self {
            label: endpoint.url.as_str().into(),
            endpoint,
            service: service.to_owned(),
            settings,
            outstanding: AtomicUsize::new(0),
            slots,
            next: AtomicUsize::new(0),
            idle_h1: Mutex::new(Vec::new()),
            https_is_h1: AtomicBool::new(false),
            h1_sockets: Arc::new(tokio::sync::Semaphore::new(h1_max.min(UNCAPPED))),
            h1_max,
            h1_returned: tokio::sync::Notify::new(),
            h1_waiting: AtomicUsize::new(0),
        })
    }

    /// The HTTP/2 stream window its connections grant: what one answer may have sent
    /// that its caller has not read.
    pub fn stream_window(&self) -> u32 {
        self.settings.stream_window
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn begin(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(self.clone())
    }

    /// Whether requests to this endpoint go over HTTP/2 (and so need absolute URIs).
    pub fn speaks_h2(&self) -> bool {
        match self.endpoint.scheme {
            Scheme::Http1 => false,
            Scheme::H2c => true,
            Scheme::Tcp => false,
            Scheme::Https => !self.https_is_h1.load(Ordering::Relaxed),
        }
    }

    /// Sends one request. A request that an HTTP/2 connection refused before sending
    /// anything (it was closing) is tried once more on a fresh connection; one that
    /// could not be sent at all comes back in [`Failed::unsent`].
    ///
    /// An HTTP/1.1 request takes an idle connection, or opens one while the pool is
    /// under its cap, or waits until `deadline` for either: a connection coming back, or
    /// one closing ([`UpstreamError::Busy`] when none does). It never opens a socket per
    /// request beyond the cap.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<Incoming>, Option<H1Return>), Failed> {
        if let Some((links, peer, identity)) = &self.settings.reverse {
            return self.send_reverse(links, (peer, identity), req).await;
        }
        if self.speaks_h2() {
            let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
            let mut req = req;
            for attempt in 0..2 {
                let mut sender = match self.h2_sender(slot).await {
                    Ok(Sender::H2(s)) => s,
                    Ok(Sender::H1(s)) => return self.send_h1(s, req).await,
                    Err(error) => {
                        return Err(Failed {
                            error,
                            unsent: Some(req),
                        })
                    }
                };
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, None)),
                    Err(mut e) => match e.take_message() {
                        Some(back) => {
                            if let Ok(mut st) = slot.state.lock() {
                                *st = None;
                            }
                            if attempt == 1 {
                                return Err(Failed {
                                    error: UpstreamError::Connect(
                                        self.endpoint.url.clone(),
                                        describe(e.error()),
                                    ),
                                    unsent: Some(back),
                                });
                            }
                            req = back;
                        }
                        None => return Err(Failed::sent(exchange_error(e.error()))),
                    },
                }
            }
            unreachable!("the loop returns on its second attempt");
        }
        let idle = if self.h1_waiting.load(Ordering::Relaxed) == 0 {
            self.idle()
        } else {
            None
        };
        let sender = match idle {
            Some(s) => s,
            None => match Box::pin(self.h1_connection(deadline)).await {
                Ok(Sender::H1(s)) => s,
                Ok(Sender::H2(mut s)) => {
                    let resp = s
                        .send_request(req)
                        .await
                        .map_err(|e| Failed::sent(exchange_error(&e)))?;
                    return Ok((resp, None));
                }
                Err(error) => {
                    return Err(Failed {
                        error,
                        unsent: Some(req),
                    })
                }
            },
        };
        self.send_h1(sender, req).await
    }

    /// Sends over a link the peer opened to this node; with none up, the request comes
    /// back unsent (another target may take it).
    async fn send_reverse(
        &self,
        links: &crate::upstream::reverse::Links,
        (peer, identity): (&str, &str),
        req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Option<H1Return>), Failed> {
        let Some(mut sender) = links.pick(peer, identity) else {
            return Err(Failed {
                error: UpstreamError::Connect(
                    self.endpoint.url.clone(),
                    "the peer has no reverse link open to this node".into(),
                ),
                unsent: Some(req),
            });
        };
        match sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, None)),
            Err(mut e) => match e.take_message() {
                Some(back) => Err(Failed {
                    error: UpstreamError::Connect(self.endpoint.url.clone(), describe(e.error())),
                    unsent: Some(back),
                }),
                None => Err(Failed::sent(exchange_error(e.error()))),
            },
        }
    }

    /// An idle HTTP/1.1 connection that is still usable.
    fn idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        self.idle_h1.lock().ok().and_then(|mut v| {
            while let Some(s) = v.pop() {
                if s.is_ready() {
                    return Some(s);
                }
            }
            None
        })
    }

    /// A new HTTP/1.1 connection under the pool's cap, or one that came back while
    /// waiting for a place under it. Waiters go first: a request that finds others
    /// waiting queues behind them rather than take what comes back, and a waiter keeps
    /// its place in the cap's queue while it also watches for connections returned.
    async fn h1_connection(&self, deadline: tokio::time::Instant) -> Result<Sender, UpstreamError> {
        let busy = || UpstreamError::Busy(self.endpoint.url.clone(), self.h1_max);
        if self.h1_waiting.load(Ordering::Relaxed) == 0 {
            if let Ok(p) = self.h1_sockets.clone().try_acquire_owned() {
                return self.connect(Some(p)).await;
            }
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.h1_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.h1_waiting);
        let acquire = self.h1_sockets.clone().acquire_owned();
        tokio::pin!(acquire);
        let until = tokio::time::sleep_until(deadline);
        tokio::pin!(until);
        let permit = loop {
            tokio::select! {
                p = &mut acquire => match p {
                    Ok(p) => break p,
                    Err(_) => return Err(busy()),
                },
                _ = self.h1_returned.notified() => {
                    if let Some(s) = self.idle() {
                        return Ok(Sender::H1(s));
                    }
                }
                _ = &mut until => return Err(busy()),
            }
        };
        self.connect(Some(permit)).await
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut sender: http1::SendRequest<ProxyBody>,
        req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Option<H1Return>), Failed> {
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => {
                let unsent = e.take_message();
                let error = match &unsent {
                    Some(_) => {
                        UpstreamError::Connect(self.endpoint.url.clone(), describe(e.error()))
                    }
                    None => exchange_error(e.error()),
                };
                return Err(Failed { error, unsent });
            }
        };
        Ok((
            resp,
            Some(H1Return {
                sender: Some(sender),
                pool: self.clone(),
            }),
        ))
    }

    async fn h2_sender(&self, slot: &H2Slot) -> Result<Sender, UpstreamError> {
        if let Some(s) = self.take_from(slot) {
            return Ok(Sender::H2(s));
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(s) = self.take_from(slot) {
            return Ok(Sender::H2(s));
        }
        // boxed: connecting (TCP, TLS, HTTP/2 handshake) is rare, and its state is large;
        // inline it would be carried, and copied, by every request's future. An https
        // endpoint may turn out to speak HTTP/1.1: then the connection takes a place
        // under the cap if one is free
        let permit = self.h1_sockets.clone().try_acquire_owned().ok();
        match Box::pin(self.connect(permit)).await? {
            Sender::H2(s) => {
                if let Ok(mut st) = slot.state.lock() {
                    *st = Some((s.clone(), 1));
                }
                Ok(Sender::H2(s))
            }
            h1 => Ok(h1),
        }
    }

    /// Opens the HTTP/2 connections the next requests would otherwise open, in each
    /// slot with none live (or one due for recycling): a peer's pool is kept warm, so
    /// that the first requests a failover or a reload moves to the peer do not wait for
    /// TCP and TLS handshakes across a long or lossy link (a SYN lost there costs a
    /// second). How many it opened. Nothing for a peer that dials this node, or an
    /// endpoint that answers in HTTP/1.1.
    ///
    /// It connects outside the slot's lock: a request that needs the slot meanwhile
    /// connects on its own rather than wait behind this attempt (and its timeout, were
    /// it to fail); should both connect, one of the two connections is let go.
    pub async fn warm(&self) -> Result<usize, UpstreamError> {
        if self.settings.reverse.is_some() || !self.speaks_h2() {
            return Ok(0);
        }
        let mut opened = 0;
        for slot in &self.slots {
            if self.is_warm(slot) {
                continue;
            }
            match Box::pin(self.connect(None)).await? {
                Sender::H2(s) => {
                    if let Ok(mut st) = slot.state.lock() {
                        if !st.as_ref().is_some_and(|c| self.live(c)) {
                            *st = Some((s, 0));
                            opened += 1;
                        }
                    }
                }
                Sender::H1(_) => break,
            }
        }
        Ok(opened)
    }

    /// Lets go of the HTTP/2 connections the slots hold: each closes once the requests
    /// in flight on it are done. For a generation a reload replaced, whose pools take no
    /// new request.
    pub fn let_go(&self) {
        for slot in &self.slots {
            if let Ok(mut st) = slot.state.lock() {
                *st = None;
            }
        }
    }

    fn live(&self, (s, n): &(http2::SendRequest<ProxyBody>, u64)) -> bool {
        !s.is_closed() && *n < self.settings.max_requests
    }

    fn is_warm(&self, slot: &H2Slot) -> bool {
        slot.state
            .lock()
            .is_ok_and(|st| st.as_ref().is_some_and(|c| self.live(c)))
    }

    /// A live sender from the slot, counting the request; recycles a connection that
    /// has carried `max_requests` (long-lived connections were seen to stall).
    fn take_from(&self, slot: &H2Slot) -> Option<http2::SendRequest<ProxyBody>> {
        let mut st = slot.state.lock().ok()?;
        if let Some(c) = st.as_mut() {
            if self.live(c) {
                c.1 += 1;
                return Some(c.0.clone());
            }
            *st = None;
        }
        None
    }

    /// `permit`: the connection's place under the HTTP/1.1 cap, held while it lives
    /// if it speaks HTTP/1.1.
    async fn connect(
        &self,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Sender, UpstreamError> {
        let result = self.connect_once(permit).await;
        if let Some(m) = &self.settings.metrics {
            let label = crate::telemetry::UpstreamLabels {
                service: self.service.clone(),
                result: if result.is_ok() { "ok" } else { "error" }.to_owned(),
            };
            m.upstream_connects.get_or_create(&label).inc();
        }
        result
    }

    async fn connect_once(
        &self,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Sender, UpstreamError> {
        let ep = &self.endpoint;
        let fail = |e: String| UpstreamError::Connect(ep.url.clone(), e);
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        match ep.scheme {
            // spliced by `tcp`, never asked an HTTP request
            Scheme::Tcp => Err(fail("a tcp:// endpoint carries no HTTP".into())),
            Scheme::Http1 => h1_handshake(tcp, permit).await.map_err(fail),
            Scheme::H2c => h2_handshake(tcp, &self.settings).await.map_err(fail),
            Scheme::Https => {
                let cfg = self
                    .settings
                    .tls
                    .clone()
                    .ok_or_else(|| fail("https endpoint but no [tls] configured".into()))?;
                let name = rustls_pki_types::ServerName::try_from(ep.host.clone())
                    .map_err(|e| fail(e.to_string()))?;
                let tls = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
                )
                .await
                .map_err(|_| fail("TLS handshake timed out".into()))?
                .map_err(|e| fail(e.to_string()))?;
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                self.https_is_h1.store(!h2, Ordering::Relaxed);
                if h2 {
                    h2_handshake(tls, &self.settings).await.map_err(fail)
                } else {
                    h1_handshake(tls, permit).await.map_err(fail)
                }
            }
        }
    }
}

async fn h2_handshake<T>(io: T, settings: &Settings) -> Result<Sender, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive.0)
        .keep_alive_timeout(settings.keepalive.1)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(settings.stream_window)
        .initial_connection_window_size(MAX_WINDOW)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
    });
    Ok(Sender::H2(s))
}

async fn h1_handshake<T>(
    io: T,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Sender, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        // the connection's place under the cap, given back when it closes
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
        }
    });
    Ok(Sender::H1(s))
}

fn describe(e: &hyper::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Power of two choices: two distinct candidates of `n` at random, the one with less
/// `load` wins; its index.
pub fn p2c(n: usize, load: impl Fn(usize) -> usize) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

/// Power of two choices on outstanding requests across a service's endpoints.
pub fn pick(pools: &[Arc<EndpointPool>]) -> Option<&Arc<EndpointPool>> {
    p2c(pools.len(), |i| pools[i].outstanding()).map(|i| &pools[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(port: u16) -> Arc<EndpointPool> {
        EndpointPool::new(
            Endpoint {
                url: format!("h2c://127.0.0.1:{port}"),
                zone: None,
                scheme: Scheme::H2c,
                host: "127.0.0.1".into(),
                port,
            },
            "test",
            Settings {
                max_requests: 10,
                h2_connections: 1,
                tls: None,
                metrics: None,
                keepalive: KEEPALIVE,
                stream_window: STREAM_WINDOW,
                reverse: None,
            },
            UNCAPPED,
        )
    }

    #[test]
    fn p2c_prefers_the_less_busy_endpoint() {
        let pools = vec![pool(1), pool(2)];
        let _busy: Vec<_> = (0..5).map(|_| pools[0].begin()).collect();
        for _ in 0..50 {
            assert_eq!(pick(&pools).unwrap().endpoint.port, 2);
        }
        drop(_busy);
        assert_eq!(pools[0].outstanding(), 0);
    }

    #[test]
    fn p2c_spreads_over_idle_endpoints() {
        let pools = vec![pool(1), pool(2), pool(3)];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(pick(&pools).unwrap().endpoint.port);
        }
        assert_eq!(seen.len(), 3);
    }
}
