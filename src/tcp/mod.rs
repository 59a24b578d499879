//! TCP services (`protocol = "tcp"`): a connection on a listener dedicated to one is
//! authorized as identity × service (a rule names no methods for it), then spliced to a
//! local endpoint: the available ones with the fewest connections first, the next
//! tried when one refuses, each outcome feeding the endpoint's health and ejection. The
//! bytes are copied as they come; a half-close is passed on, a reset on one side is
//! answered with a reset on the other, and a connection on which nothing moves either
//! way for the listener's `idle_timeout` is closed. A connection in progress stays on
//! its endpoint. A refusal closes the connection (a TCP caller has no protocol to be
//! told in), counted by reason and logged once.

use crate::grammar::Call;
use crate::proxy::ConnCtx;
use crate::reason::Reason;
use crate::telemetry::{ServiceLabels, TcpBytesLabels};
use std::os::fd::RawFd;
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

/// An endpoint must accept a connection within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The call a TCP connection is authorized as: no method, so only rules that name the
/// service without methods (or with `* /`) admit it.
pub const CALL: Call<'static> = Call::Http("CONNECT", "/");

/// Serves one caller connection of a TCP service. `caller_fd` is the caller's socket,
/// for answering a reset with one.
pub async fn serve<S>(
    io: S,
    caller_fd: RawFd,
    ctx: Arc<ConnCtx>,
    idle: Duration,
    drain: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let w = ctx.worker.clone();
    let listener = ctx.listener.clone();
    let refuse = |reason: Reason, why: &str| {
        w.metrics.reject(&listener, reason);
        if crate::telemetry::log_due(reason) {
            tracing::info!(listener = &*listener, remote = %ctx.remote, identity = ctx.identity.to_str().unwrap_or("?"), reason = reason.as_str(), "TCP connection refused: {why}");
        }
    };
    let Some(idx) = ctx.dedicated.as_deref().and_then(|n| w.table.by_name(n)) else {
        refuse(
            Reason::UnknownService,
            "the listener's service is not configured",
        );
        return;
    };
    let service = &w.config.services[idx];
    if !ctx.grants.allows(idx, CALL) {
        refuse(
            Reason::Denied,
            &format!(
                "no [[allow]] rule lets this identity reach {}",
                service.name
            ),
        );
        return;
    }
    // the service's limits and [[limit]] rules: a connection is a call (rate: connections
    // a second; concurrency: connections open), its place held while it is spliced
    let _admitted = match w.limits.admit(idx, &ctx.limits, &service.name) {
        Ok(a) => a,
        Err(crate::limits::Over::Rate(who)) => {
            refuse(
                Reason::RateLimited,
                &format!("over the rate limit of {who}"),
            );
            return;
        }
        Err(crate::limits::Over::Concurrency(who)) => {
            refuse(
                Reason::Overloaded,
                &format!("over the concurrency limit of {who}"),
            );
            return;
        }
    };
    // what a splice holds (two copy buffers, and TLS's on the caller's side) counts
    // against the connection's, the caller's and the node's memory budgets
    let _held = match crate::memory::Held::with(ctx.memory.clone(), SPLICE_BYTES) {
        Ok(h) => h,
        Err(over) => {
            refuse(
                Reason::Memory,
                &format!("holding the connection would pass {over}"),
            );
            return;
        }
    };
    // the available endpoints, fewest connections first; with none available, all of
    // them (nowhere else has the service here)
    let pools = &w.upstreams[idx];
    let mut order: Vec<usize> = (0..pools.len())
        .filter(|&e| w.fleet.available(idx, e))
        .collect();
    if order.is_empty() {
        order = (0..pools.len()).collect();
    }
    order.sort_by_key(|&e| pools[e].outstanding());
    let mut upstream = None;
    for e in order {
        let ep = &pools[e].endpoint;
        let connect = TcpStream::connect((ep.host.as_str(), ep.port));
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => {
                w.fleet.record(idx, e, true);
                upstream = Some((s, pools[e].begin()));
                break;
            }
            _ => w.fleet.record(idx, e, false),
        }
    }
    let Some((upstream, _outstanding)) = upstream else {
        refuse(
            Reason::NoHealthyTarget,
            &format!("no endpoint of {} accepted a connection", service.name),
        );
        return;
    };
    let _ = upstream.set_nodelay(true);
    let labels = ServiceLabels {
        listener: listener.to_string(),
        service: service.name.clone(),
    };
    let m = &w.metrics;
    m.tcp_connections.get_or_create(&labels).inc();
    let open = m.tcp_open.get_or_create(&labels).clone();
    open.inc();
    let started = Instant::now();
    let (sent, received) = splice(io, caller_fd, upstream, idle, drain).await;
    open.dec();
    m.tcp_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    let bytes = |direction| TcpBytesLabels {
        listener: listener.to_string(),
        service: service.name.clone(),
        direction,
    };
    m.tcp_bytes.get_or_create(&bytes("in")).inc_by(sent);
    m.tcp_bytes.get_or_create(&bytes("out")).inc_by(received);
}

/// Counts what is read, and when anything last moved.
struct Counted<R> {
    inner: R,
    bytes: u64,
    /// Its read failed (a reset, or a TLS stream cut without close_notify).
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
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Err(_))) {
            self.failed = true;
        }
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.bytes += n;
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

/// Sets SO_LINGER 0, so that closing the socket resets the connection.
fn reset_on_close(fd: RawFd) {
    // SAFETY: the fd belongs to a socket that is open for the whole of `splice`
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// Copies both ways until both are done: (bytes to the service, bytes to the caller).
/// An end of one direction is passed on as a half-close; a read error (a reset) ends
/// both, the other side reset too; nothing moving for `idle` ends both.
async fn splice<S>(
    caller: S,
    caller_fd: RawFd,
    mut upstream: TcpStream,
    idle: Duration,
    mut drain: tokio::sync::watch::Receiver<bool>,
) -> (u64, u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    use std::os::fd::AsRawFd;
    let upstream_fd = upstream.as_raw_fd();
    let epoch = Instant::now();
    let moved = Arc::new(AtomicU64::new(0));
    let (cr, mut cw) = tokio::io::split(caller);
    // borrowed halves: dropping them sends nothing (an owned write half would send a
    // FIN ahead of the reset that answers a reset)
    let (ur, mut uw) = upstream.split();
    let mut from_caller = Counted {
        inner: cr,
        bytes: 0,
        failed: false,
        moved: moved.clone(),
        epoch,
    };
    let mut from_upstream = Counted {
        inner: ur,
        bytes: 0,
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
    };
    let (sent, received) = (from_caller.bytes, from_upstream.bytes);
    match ended {
        // the caller's side failed: the service is reset, and the other way round
        Err(Side::Caller) => reset_on_close(upstream_fd),
        Err(Side::Upstream) => reset_on_close(caller_fd),
        Ok(()) => {}
    }
    (sent, received)
}
