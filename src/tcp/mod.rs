//! TCP services (`protocol = "tcp"`): a connection on a listener dedicated to one is
//! authorized as identity × service (a rule names no methods for it), then spliced to
//! where the service is: a local endpoint (the available ones first, the next tried
//! when one refuses, each outcome feeding the endpoint's health and ejection), else a
//! peer that offers it, as an HTTP/2 CONNECT stream (RFC 9113 §8.5) on the mTLS peer
//! connections, in the fleet's order and under the same loop prevention and hop limits
//! as HTTP. The far node authorizes the stream as the near node's identity × service
//! ([`tunnel`]) and splices it on. The bytes are copied as they come; a half-close is
//! passed on, a reset on one side is answered with a reset on the other, and a
//! connection on which nothing moves either way for the listener's `idle_timeout` is
//! closed. A connection in progress stays where it went. A refusal closes the
//! connection (a TCP caller has no protocol to be told in; a peer's CONNECT is answered
//! in HTTP, with `fed-refused`), counted by reason and logged once.

pub mod h2io;

use crate::errors::Reject;
use crate::grammar::Call;
use crate::proxy::targets::{Target, Targets};
use crate::proxy::{ConnCtx, Worker, FED_CALLER, FED_HOPS, FED_ORIGIN};
use crate::reason::Reason;
use crate::telemetry::{ServiceLabels, TcpBytesLabels};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{Either, Full};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// What one spliced connection is charged against the memory budgets: two 8 KiB copy
/// buffers, and TLS's send and receive buffers on the caller's side.
pub const SPLICE_BYTES: u64 = 64 << 10;

/// An endpoint must accept a connection (a peer answer its CONNECT) within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The call a TCP connection is authorized as: no method, so only rules that name the
/// service without methods (or with `* /`) admit it.
pub const CALL: Call<'static> = Call::Http("CONNECT", "/");

/// Counts a refusal and logs it once per interval.
fn refused(ctx: &ConnCtx, reject: &Reject) {
    let reason = reject.reason();
    ctx.worker.metrics.reject(&ctx.listener, reason);
    if crate::telemetry::log_due(reason) {
        tracing::info!(listener = &*ctx.listener, remote = %ctx.remote, identity = ctx.identity.to_str().unwrap_or("?"), reason = reason.as_str(), "TCP connection refused: {reject}");
    }
}

/// A connection admitted to a TCP service: its place under the limits and its memory,
/// held while it is spliced.
struct Admitted {
    service: usize,
    _limits: crate::limits::Admit,
    held: crate::memory::Held,
}

/// The service by name, if it is a TCP service the caller may reach, within its limits
/// and `memory` (the budget its splice is charged to, `charge` bytes to begin with).
fn admit(
    ctx: &ConnCtx,
    name: Option<&str>,
    memory: Arc<crate::memory::Connection>,
    charge: u64,
) -> Result<Admitted, Reject> {
    let w = &*ctx.worker;
    let unknown = || Reject::UnknownService(name.unwrap_or("(none)").to_owned());
    let idx = name.and_then(|n| w.table.by_name(n)).ok_or_else(unknown)?;
    let service = &w.config.services[idx];
    if service.protocol != crate::config::Protocol::Tcp {
        return Err(unknown());
    }
    if !ctx.grants.allows(idx, CALL) {
        return Err(Reject::Denied {
            identity: ctx.identity.to_str().unwrap_or("?").to_owned(),
            service: service.name.clone(),
            call: "a connection".into(),
            node: w.config.node.name.clone(),
        });
    }
    // the service's limits and [[limit]] rules: a connection is a call (rate: connections
    // a second; concurrency: connections open), its place held while it is spliced
    let limits = w
        .limits
        .admit(idx, &ctx.limits, &service.name)
        .map_err(|over| match over {
            crate::limits::Over::Rate(who) => Reject::RateLimited(who),
            crate::limits::Over::Concurrency(who) => Reject::Overloaded(who),
        })?;
    let held = crate::memory::Held::with(memory, charge).map_err(Reject::Memory)?;
    Ok(Admitted {
        service: idx,
        _limits: limits,
        held,
    })
}

/// Where a connection went: a local endpoint's socket, or a peer's CONNECT stream.
enum Opened {
    Local(TcpStream, crate::upstream::Outstanding),
    Peer(
        TokioIo<hyper::upgrade::Upgraded>,
        crate::upstream::Outstanding,
    ),
}

/// Serves one caller connection of a TCP service.
pub async fn serve<S>(
    io: S,
    ctx: Arc<ConnCtx>,
    idle: Duration,
    drain: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Reset + Unpin + Send,
{
    // what a splice holds (two copy buffers, and TLS's on the caller's side) counts
    // against the connection's, the caller's and the node's memory budgets
    let mut admitted = match admit(
        &ctx,
        ctx.dedicated.as_deref(),
        ctx.memory.clone(),
        SPLICE_BYTES,
    ) {
        Ok(a) => a,
        Err(r) => return refused(&ctx, &r),
    };
    let aim = Aim {
        origin: None,
        hops: 0,
        caller: None,
        deadline: tokio::time::Instant::now() + CONNECT_TIMEOUT,
        idle,
        charge: SPLICE_BYTES,
    };
    let opened = match open(&ctx, admitted.service, &aim, &mut admitted.held).await {
        Ok(o) => o,
        Err(r) => return refused(&ctx, &r),
    };
    carry(io, opened, &ctx, admitted.service, idle, drain).await;
}

/// Serves a peer's CONNECT stream for a TCP service (`fed-service`): authorized as the
/// peer's identity, within the service's limits, then spliced on as a caller's
/// connection is. Answered 200 once the connection is made; a refusal is answered in
/// HTTP with `fed-refused`, so that the peer knows whether another node may serve it.
pub async fn tunnel(
    parts: http::request::Parts,
    recv: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
    ctx: Arc<ConnCtx>,
    idle: Duration,
    drain: tokio::sync::watch::Receiver<bool>,
) {
    let ctx = crate::proxy::current(ctx);
    let _busy = ctx.activity.begin();
    let h = &parts.headers;
    let name = h
        .get(crate::route::FED_SERVICE)
        .and_then(|v| v.to_str().ok());
    let ms = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
    };
    // the near node's time for the connection to be made, and its idle timeout: the far
    // node keeps within the one and closes on neither side of the other
    let deadline = tokio::time::Instant::now()
        + ms(FED_TIMEOUT).map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT));
    let idle = ms(FED_IDLE).map_or(idle, |t| t.clamp(Duration::from_secs(1), MAX_IDLE));
    let opened = async {
        if !ctx.from_peer {
            // no longer a peer after a reload: a caller does not CONNECT
            return Err(Reject::BadRequest(
                "CONNECT is for fedport's peer nodes only",
            ));
        }
        if ctx.dedicated.is_some() {
            return Err(Reject::BadRequest(
                "CONNECT is not taken on a listener dedicated to a service",
            ));
        }
        // what the stream may hold unread (the window this node grants a peer's
        // streams) and the splice's buffers count against the node's budget, not the
        // peer connection's, which its HTTP requests share
        // each peer's tunnels at most a quarter of it, as one identity's calls are
        let share = format!("tunnel:{}", ctx.identity.to_str().unwrap_or("?"));
        let memory =
            crate::memory::Connection::new(ctx.worker.memory.clone(), u64::MAX, Some(&share));
        let charge = SPLICE_BYTES + u64::from(crate::upstream::PEER_STREAM_WINDOW);
        let mut admitted = admit(&ctx, name, memory, charge)?;
        // a peer always says how far the connection came
        let hops = crate::proxy::journey::hops_of(h, ctx.worker.config.node.max_hops);
        let aim = Aim {
            origin: h.get(&FED_ORIGIN).cloned(),
            hops,
            caller: h.get(&FED_CALLER).cloned(),
            deadline,
            idle,
            charge,
        };
        let to = open(&ctx, admitted.service, &aim, &mut admitted.held).await?;
        Ok::<_, Reject>((admitted, to))
    }
    .await;
    let (admitted, opened) = match opened {
        Ok(o) => o,
        Err(r) => {
            refused(&ctx, &r);
            let (head, body) = r.answer(false, "-");
            let resp = http::Response::from_parts(head, ());
            if let Ok(mut tx) = respond.send_response(resp, body.is_empty()) {
                let _ = tx.send_data(body, true);
            }
            return;
        }
    };
    let Ok(send) = respond.send_response(http::Response::new(()), false) else {
        return;
    };
    let io = h2io::H2Io::new(send, recv);
    carry(io, opened, &ctx, admitted.service, idle, drain).await;
}

/// How a connection is aimed: where it came from (a peer's `fed-origin`, `fed-hops`
/// and `fed-caller`), when it must be made by, and its idle timeout (passed on).
struct Aim {
    origin: Option<HeaderValue>,
    hops: u8,
    caller: Option<HeaderValue>,
    deadline: tokio::time::Instant,
    idle: Duration,
    /// What the connection is charged before it goes anywhere.
    charge: u64,
}

/// `fed-timeout` on a CONNECT: the milliseconds the near node gives the connection to
/// be made.
const FED_TIMEOUT: &str = "fed-timeout";
/// `fed-idle`: the near node's idle timeout for the connection, in milliseconds.
const FED_IDLE: &str = "fed-idle";
/// The longest idle timeout a peer may ask a tunnel to be kept for.
const MAX_IDLE: Duration = Duration::from_secs(24 * 3600);

/// The connection's target: a local endpoint, else a peer, in the same order and under
/// the same loop prevention as an HTTP request (src/proxy/targets.rs). Going to a peer,
/// `held` grows by the stream window of the connection it rides on (what the tunnel may
/// hold unread here).
async fn open(
    ctx: &ConnCtx,
    idx: usize,
    aim: &Aim,
    held: &mut crate::memory::Held,
) -> Result<Opened, Reject> {
    let w = &*ctx.worker;
    let service = &w.config.services[idx];
    let mut targets = Targets::new(w, ctx, idx, aim.origin.as_ref(), aim.hops, false)?;
    let mut last = Reject::NoHealthyTarget(service.name.clone());
    while let Some(t) = targets.next_target() {
        let now = tokio::time::Instant::now();
        if now >= aim.deadline {
            break;
        }
        match t {
            Target::Local(e) => {
                let pool = &w.upstreams[idx][e];
                let ep = &pool.endpoint;
                let connect = TcpStream::connect((ep.host.as_str(), ep.port));
                let until = aim.deadline.min(now + CONNECT_TIMEOUT);
                match tokio::time::timeout_at(until, connect).await {
                    Ok(Ok(s)) => {
                        w.fleet.record(idx, e, true);
                        return Ok(Opened::Local(s, pool.begin()));
                    }
                    _ => w.fleet.record(idx, e, false),
                }
            }
            Target::Peer(p) => {
                let window = u64::from(w.tunnel_pools[p].stream_window());
                held.set(aim.charge + window).map_err(Reject::Memory)?;
                match connect_peer(w, ctx, p, idx, aim).await {
                    Ok(o) => return Ok(o),
                    Err(Some(r)) => return Err(r),
                    Err(None) => last = Reject::NoHealthyTarget(service.name.clone()),
                }
            }
        }
    }
    Err(last)
}

/// Opens a CONNECT stream for the service to peer `p`. `Err(None)`: it did not take
/// the connection and another node may (it could not be reached, or refused it as
/// `no_healthy_target`, `draining` or `loop`); `Err(Some)`: a refusal that stands.
async fn connect_peer(
    w: &Worker,
    ctx: &ConnCtx,
    p: usize,
    idx: usize,
    aim: &Aim,
) -> Result<Opened, Option<Reject>> {
    let service = &w.config.services[idx];
    let pool = &w.tunnel_pools[p];
    let uri = http::Uri::builder()
        .authority(service.name.as_str())
        .build()
        .map_err(|_| Some(Reject::UnknownService(service.name.clone())))?;
    let mut req = Request::new(Either::Right(Full::<Bytes>::default()));
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    let h = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&service.name) {
        h.insert(crate::route::FED_SERVICE, v);
    }
    h.insert(FED_HOPS, HeaderValue::from(u16::from(aim.hops) + 1));
    h.insert(
        FED_ORIGIN,
        aim.origin.clone().unwrap_or_else(|| w.origin.clone()),
    );
    h.insert(
        FED_CALLER,
        aim.caller.clone().unwrap_or_else(|| ctx.identity.clone()),
    );
    let left = aim
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    h.insert(FED_TIMEOUT, HeaderValue::from(left.as_millis() as u64));
    h.insert(FED_IDLE, HeaderValue::from(aim.idle.as_millis() as u64));
    let deadline = aim.deadline;
    let outstanding = pool.begin();
    let sent = tokio::time::timeout_at(deadline, pool.send(req, deadline)).await;
    let resp = match sent {
        Ok(Ok((resp, _))) => resp,
        Ok(Err(f)) => {
            tracing::debug!(peer = %w.config.peers[p].name, service = %service.name, error = %f.error, "CONNECT to the peer failed");
            return Err(None);
        }
        Err(_) => {
            tracing::debug!(peer = %w.config.peers[p].name, service = %service.name, "CONNECT to the peer got no answer in time");
            return Err(None);
        }
    };
    if resp.status() == StatusCode::OK {
        let up = tokio::time::timeout_at(deadline, hyper::upgrade::on(resp)).await;
        return match up {
            Ok(Ok(up)) => Ok(Opened::Peer(TokioIo::new(up), outstanding)),
            _ => Err(None),
        };
    }
    let reason = resp
        .headers()
        .get(crate::errors::FED_REFUSED)
        .and_then(|r| Reason::parse(r.as_bytes()));
    match reason {
        Some(r) if r.elsewhere_may_serve() => Err(None),
        Some(r) => Err(Some(Reject::Upstream(
            service.name.clone(),
            format!(
                "peer {} refused the connection ({r})",
                w.config.peers[p].name
            ),
        ))),
        None => Err(None),
    }
}

/// Splices the caller's connection to where it was opened, with its metrics.
async fn carry<S>(
    io: S,
    opened: Opened,
    ctx: &Arc<ConnCtx>,
    idx: usize,
    idle: Duration,
    drain: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Reset + Unpin + Send,
{
    let w = &*ctx.worker;
    let service = &w.config.services[idx];
    let labels = ServiceLabels {
        listener: ctx.listener.to_string(),
        service: service.name.clone(),
    };
    let m = &w.metrics;
    m.tcp_connections.get_or_create(&labels).inc();
    let open = m.tcp_open.get_or_create(&labels).clone();
    open.inc();
    let started = Instant::now();
    let bytes = |direction| {
        m.tcp_bytes
            .get_or_create(&TcpBytesLabels {
                listener: ctx.listener.to_string(),
                service: service.name.clone(),
                direction,
            })
            .clone()
    };
    let counters = (bytes("in"), bytes("out"));
    let revoked = revoked(ctx.clone(), service.name.clone());
    let ends = Ends {
        idle,
        drain,
        revoked,
    };
    match opened {
        Opened::Local(s, _outstanding) => {
            let _ = s.set_nodelay(true);
            splice(io, s, counters, ends).await
        }
        Opened::Peer(up, _outstanding) => splice(io, up, counters, ends).await,
    };
    open.dec();
    m.tcp_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
}

/// Resolves once the rules now in force no longer admit the connection's identity to
/// the service (a reload took its rule away): checked every second, on the
/// connection's current view. Counted as `denied` and logged once.
async fn revoked(ctx: Arc<ConnCtx>, service: String) {
    let tunnel = ctx.from_peer;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now = crate::proxy::current(ctx.clone());
        let w = &now.worker;
        // a tunnel's far end: the node that opened it must still be a peer
        let admitted = (!tunnel || now.from_peer)
            && w.table.by_name(&service).is_some_and(|i| {
                w.config.services[i].protocol == crate::config::Protocol::Tcp
                    && now.grants.allows(i, CALL)
            });
        if !admitted {
            refused(
                &now,
                &Reject::Denied {
                    identity: now.identity.to_str().unwrap_or("?").to_owned(),
                    service,
                    call: "an open connection (the rules changed)".into(),
                    node: w.config.node.name.clone(),
                },
            );
            return;
        }
    }
}

/// What ends a splice besides its two sides: nothing moving for `idle`, the node
/// draining, the rules no longer admitting it.
struct Ends<F> {
    idle: Duration,
    drain: tokio::sync::watch::Receiver<bool>,
    revoked: F,
}

/// Counts what is read as it is read (`fedport_tcp_bytes_total`), and when anything
/// last moved.
struct Counted<R> {
    inner: R,
    bytes: prometheus_client::metrics::counter::Counter,
    /// Its read failed (a reset).
    failed: bool,
    moved: Arc<AtomicU64>,
    epoch: Instant,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => {
                self.failed = true;
                Poll::Ready(Err(e))
            }
            r => r,
        };
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.bytes.inc_by(n);
            let now = self.epoch.elapsed().as_millis() as u64;
            self.moved.store(now, Ordering::Relaxed);
        }
        r
    }
}

/// A side of a spliced connection.
enum Side {
    Caller,
    Upstream,
}

/// One direction: `from`'s bytes to `to`, then a half-close. Which side failed, if one
/// did: `from`'s when its read failed, else the one written to.
async fn pass<R, W>(
    from: &mut Counted<R>,
    to: &mut W,
    reads: Side,
    writes: Side,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match tokio::io::copy(from, to).await {
        Ok(_) => {
            let _ = to.shutdown().await;
            Ok(())
        }
        Err(_) if from.failed => Err(reads),
        Err(_) => Err(writes),
    }
}

/// A side of a spliced connection: split into halves that copy each way (a socket's
/// own halves, which take no lock; others through tokio's split), joined again to be
/// reset as the answer to a reset of the other side.
pub trait Reset: AsyncRead + AsyncWrite + Sized {
    type R: AsyncRead + Unpin + Send;
    type W: AsyncWrite + Unpin + Send;

    fn halves(self) -> (Self::R, Self::W);

    fn rejoin(r: Self::R, w: Self::W) -> Self;

    /// Makes closing it a reset.
    fn reset(self);
}

/// Halves through tokio's split, for the sides that have none of their own.
macro_rules! split_halves {
    () => {
        type R = tokio::io::ReadHalf<Self>;
        type W = tokio::io::WriteHalf<Self>;

        fn halves(self) -> (Self::R, Self::W) {
            tokio::io::split(self)
        }

        fn rejoin(r: Self::R, w: Self::W) -> Self {
            r.unsplit(w)
        }
    };
}

/// SO_LINGER 0: closing the socket resets the connection.
fn linger_zero(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

impl Reset for TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;

    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }

    /// The halves are the same socket's: rejoining cannot fail.
    fn rejoin(r: Self::R, w: Self::W) -> Self {
        r.reunite(w).expect("halves of one socket")
    }

    fn reset(self) {
        linger_zero(&self);
    }
}

/// A TLS caller's read half: a caller that closes its socket without close_notify has
/// ended its side (the bytes it sent all arrived; the protocol above frames its own
/// messages), as most TLS proxies read it: an end, not a reset. Only here: a peer
/// link cut without close_notify fails its CONNECT streams, which are reset.
pub struct EndAtEof<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for EndAtEof<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            r => r,
        }
    }
}

impl Reset for tokio_rustls::server::TlsStream<TcpStream> {
    type R = EndAtEof<tokio::io::ReadHalf<Self>>;
    type W = tokio::io::WriteHalf<Self>;

    fn halves(self) -> (Self::R, Self::W) {
        let (r, w) = tokio::io::split(self);
        (EndAtEof(r), w)
    }

    fn rejoin(r: Self::R, w: Self::W) -> Self {
        r.0.unsplit(w)
    }

    fn reset(self) {
        linger_zero(self.get_ref().0);
    }
}

/// The far end of a CONNECT tunnel: RST_STREAM with CONNECT_ERROR, as RFC 9113 §8.5
/// answers a TCP reset.
impl Reset for h2io::H2Io {
    split_halves!();

    fn reset(self) {
        self.reset_connect_error();
    }
}

/// The near end of a CONNECT tunnel: dropped before it ended, hyper resets the stream
/// (CANCEL), which the far end reads as a failed read and answers with a reset.
impl Reset for TokioIo<hyper::upgrade::Upgraded> {
    split_halves!();

    fn reset(self) {}
}

/// Copies both ways until both are done, counting the bytes each way as they move.
/// An end of one direction is passed on as a half-close; a read error (a reset) ends
/// both, the other side reset too (a socket by SO_LINGER 0, the far end of a CONNECT
/// stream by RST_STREAM(CONNECT_ERROR), the near end by being dropped unended); nothing
/// moving for `idle` ends both.
async fn splice<S, U, F>(
    caller: S,
    upstream: U,
    (bytes_in, bytes_out): (
        prometheus_client::metrics::counter::Counter,
        prometheus_client::metrics::counter::Counter,
    ),
    ends: Ends<F>,
) where
    S: AsyncRead + AsyncWrite + Reset + Unpin + Send,
    U: AsyncRead + AsyncWrite + Reset + Unpin + Send,
    F: std::future::Future<Output = ()>,
{
    let Ends {
        idle,
        mut drain,
        revoked,
    } = ends;
    let epoch = Instant::now();
    let moved = Arc::new(AtomicU64::new(0));
    // before a reset the halves are joined again (a socket's own write half, dropped,
    // would send a FIN ahead of the reset)
    let (cr, mut cw) = caller.halves();
    let (ur, mut uw) = upstream.halves();
    let mut from_caller = Counted {
        inner: cr,
        bytes: bytes_in,
        failed: false,
        moved: moved.clone(),
        epoch,
    };
    let mut from_upstream = Counted {
        inner: ur,
        bytes: bytes_out,
        failed: false,
        moved: moved.clone(),
        epoch,
    };
    let up = pass(&mut from_caller, &mut uw, Side::Caller, Side::Upstream);
    let down = pass(&mut from_upstream, &mut cw, Side::Upstream, Side::Caller);
    let both = async {
        tokio::pin!(up, down);
        let (mut a, mut b) = (None, None);
        loop {
            tokio::select! {
                r = &mut up, if a.is_none() => { r?; a = Some(()); }
                r = &mut down, if b.is_none() => { r?; b = Some(()); }
            }
            if a.is_some() && b.is_some() {
                return Ok(());
            }
        }
    };
    let watch = async {
        let step = (idle / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(step).await;
            let last = Duration::from_millis(moved.load(Ordering::Relaxed));
            if epoch.elapsed().saturating_sub(last) >= idle {
                return;
            }
        }
    };
    // a draining node lets a spliced connection go once it has been quiet for a second:
    // a TCP caller has no GOAWAY to be told, and what is in flight gets its answer
    let drained = async {
        let _ = drain.wait_for(|d| *d).await;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let last = Duration::from_millis(moved.load(Ordering::Relaxed));
            if epoch.elapsed().saturating_sub(last) >= Duration::from_secs(1) {
                return;
            }
        }
    };
    let ended = tokio::select! {
        r = both => r,
        () = watch => Ok(()),
        () = drained => Ok(()),
        () = revoked => Err(None),
    };
    match ended {
        // the caller's side failed: the service is reset, and the other way round
        Err(Some(Side::Caller)) => U::rejoin(from_upstream.inner, uw).reset(),
        Err(Some(Side::Upstream)) => S::rejoin(from_caller.inner, cw).reset(),
        // the rules no longer admit it: cut both ways, not ended as if complete
        Err(None) => {
            U::rejoin(from_upstream.inner, uw).reset();
            S::rejoin(from_caller.inner, cw).reset();
        }
        Ok(()) => {}
    }
}
