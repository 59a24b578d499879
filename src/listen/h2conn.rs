//! HTTP/2 connections, served with the `h2` crate directly so that fedport owns each
//! stream: one task per stream answers the request, pipes the answer under flow
//! control, and resets a stream on which no body bytes have moved either way for its
//! `stream_idle_timeout` (a caller that stopped reading, a service that stopped
//! answering). A stream reset after fedport started work on it (routed and authorized)
//! counts against the connection's allowance of such cancellations, whoever's frames
//! caused the reset (the caller's RST_STREAM, or frames that make the codec reset it);
//! past the allowance the connection is cut (`h2_rapid_reset`).

use super::h2guard::Trip;
use super::{Accepting, Drain};
use crate::errors::Reject;
use crate::proxy::caller::{CallerBody, StreamState};
use crate::proxy::{self, ConnCtx, RespBody};
use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A caller's stream window: what one stream may have sent and fedport not yet passed
/// on. The connection window is as large as all streams' windows together, so a
/// stream that stalls never holds back the others.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// A peer node's stream window: its connections carry many callers' streams across
/// regions, where a window must cover the round trip.
pub const PEER_STREAM_WINDOW: u32 = 1024 * 1024;
/// The largest window HTTP/2 allows (RFC 9113 6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// Decoded request headers allowed (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST: u32 = 64 * 1024;

/// PING an idle connection this often; no answer within the timeout closes it.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));

/// Started streams a caller may have reset per window of this length before the
/// connection is cut: as many as it may have in flight (`max_streams`).
const CANCEL_WINDOW: Duration = Duration::from_secs(10);

/// The bytes the connection's first read took (to tell HTTP/2 from HTTP/1.1), given
/// back before the rest.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(inner: T, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2 (its preface) from anything else; returns
/// which, and what was read.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> std::io::Result<(bool, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Ok((false, buf.freeze()));
        }
        let k = buf.len().min(PREFACE.len());
        if buf[..k] != PREFACE[..k] {
            return Ok((false, buf.freeze()));
        }
        if buf.len() >= PREFACE.len() {
            return Ok((true, buf.freeze()));
        }
    }
}

/// Started streams reset, counted per window.
pub struct Cancels {
    epoch: Instant,
    window: AtomicU64,
    count: AtomicU32,
    limit: u32,
}

impl Cancels {
    pub fn new(limit: u32) -> Self {
        Self {
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            limit,
        }
    }

    /// Counts one; whether the allowance is now spent.
    fn record(&self) -> bool {
        let w = self.epoch.elapsed().as_secs() / CANCEL_WINDOW.as_secs();
        if self.window.swap(w, Ordering::Relaxed) != w {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) + 1 > self.limit
    }
}

/// What every stream task of a connection shares.
struct Shared {
    ctx: Arc<ConnCtx>,
    trip: Arc<Trip>,
    /// `None` for peer nodes: their connections carry many callers' cancellations,
    /// each caller already bounded at its own node.
    cancels: Option<Cancels>,
    idle: Duration,
    metrics: Arc<crate::telemetry::Metrics>,
}

/// Serves an HTTP/2 connection until it ends; returns the bounded reason when fedport
/// itself ended it for the client's fault (a protocol error the codec found).
pub(super) async fn serve<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    acc: &Accepting,
    drain: &Drain,
    trip: Arc<Trip>,
) -> Option<&'static str>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let spec = &acc.spec;
    let window = if ctx.from_peer {
        PEER_STREAM_WINDOW
    } else {
        STREAM_WINDOW
    };
    let conn_window = (u64::from(window) * u64::from(spec.max_streams)).min(u64::from(MAX_WINDOW));
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(window)
        .initial_connection_window_size(conn_window as u32)
        .max_concurrent_streams(spec.max_streams)
        .max_header_list_size(MAX_HEADER_LIST)
        // streams fedport itself resets for a client's protocol errors, before GOAWAY
        .max_local_error_reset_streams(Some(256))
        .max_pending_accept_reset_streams(20)
        .max_send_buffer_size(400 * 1024);
    let shared = Arc::new(Shared {
        cancels: (!ctx.from_peer).then(|| Cancels::new(spec.max_streams)),
        ctx,
        trip: trip.clone(),
        idle: spec.stream_idle_timeout,
        metrics: acc.metrics.clone(),
    });
    let activity = shared.ctx.activity.clone();
    let mut signal = drain.signal.clone();
    let idle = spec.idle_timeout;
    let period = (idle / 4).min(spec.header_timeout / 2);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(50)));
    let mut cut: Option<Pin<Box<tokio::time::Sleep>>> = None;

    let handshake = builder.handshake::<_, Bytes>(io);
    tokio::pin!(handshake);
    let mut conn = loop {
        tokio::select! {
            c = &mut handshake => match c {
                Ok(c) => break c,
                Err(e) => return super::refusal(&e),
            },
            _ = trip.notify.notified() => return None,
            _ = signal.wait_for(|s| *s) => return None,
            _ = tick.tick() => trip.check_slow(),
        }
    };
    let mut pings = conn.ping_pong();
    let mut ping_sent: Option<Instant> = None;
    let mut last_ping = Instant::now();
    let mut closing = false;
    let mut refused = None;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(stream(req, respond, shared.clone()));
                }
                Some(Err(e)) => {
                    refused = super::refusal(&e);
                    tracing::debug!(listener = &*acc.name, error = %e, "connection ended with an error");
                    break;
                }
                None => break,
            },
            _ = trip.notify.notified(), if cut.is_none() => {
                cut = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
            }
            _ = async { cut.as_mut().expect("guarded by is_some").await }, if cut.is_some() => break,
            _ = signal.wait_for(|s| *s), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            pong = poll_fn(|cx| match pings.as_mut() {
                Some(p) => p.poll_pong(cx),
                None => Poll::Pending,
            }), if ping_sent.is_some() => {
                ping_sent = None;
                if pong.is_err() {
                    break;
                }
            }
            _ = tick.tick() => {
                trip.check_slow();
                if !closing && activity.idle_for() >= idle {
                    closing = true;
                    acc.metrics.reject(&acc.name, "idle_timeout");
                    conn.graceful_shutdown();
                }
                // keepalive: a connection whose PING goes unanswered is gone
                match ping_sent {
                    Some(t) if t.elapsed() > KEEPALIVE.1 => {
                        tracing::debug!(listener = &*acc.name, "keepalive PING unanswered; closing");
                        break;
                    }
                    None if last_ping.elapsed() >= KEEPALIVE.0 => {
                        if let Some(p) = pings.as_mut() {
                            if p.send_ping(h2::Ping::opaque()).is_ok() {
                                ping_sent = Some(Instant::now());
                            }
                        }
                        last_ping = Instant::now();
                    }
                    _ => {}
                }
            }
        }
    }
    refused
}

/// Why a stream ended early, for the counts.
enum End {
    Done,
    /// Reset by the caller, or by the codec for the caller's protocol error.
    Reset,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The answer failed (the service's reset, a truncated answer).
    Failed,
}

/// Waits on `timer` for the stream's idle timeout: re-armed while bytes move; ready
/// once they have not for the whole timeout.
struct Idle<'a> {
    timer: Pin<Box<tokio::time::Sleep>>,
    seen: u64,
    state: &'a StreamState,
}

impl<'a> Idle<'a> {
    fn new(state: &'a StreamState) -> Self {
        Self {
            timer: Box::pin(tokio::time::sleep(state.idle())),
            seen: state.progress(),
            state,
        }
    }

    async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            let now = self.state.progress();
            if now == self.seen {
                return;
            }
            self.seen = now;
            let next = tokio::time::Instant::now() + self.state.idle();
            self.timer.as_mut().reset(next);
        }
    }
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    shared: Arc<Shared>,
) {
    let (parts, recv) = req.into_parts();
    let state = Arc::new(StreamState::new(shared.idle));
    let length = content_length(&parts.headers);
    let grpc = crate::request::ContentType::claims_grpc(&parts.headers);
    let rid = parts.headers.get("x-request-id").cloned();
    let req = http::Request::from_parts(parts, CallerBody::h2(recv, length, state.clone()));
    let mut idle = Idle::new(&state);
    let answer = {
        // dropped at the end of this block, whatever ends the wait: a call the caller
        // reset, or that sat idle, is cancelled upstream there
        let mut handler =
            std::pin::pin!(proxy::handle(req, shared.ctx.clone(), Some(state.clone())));
        tokio::select! {
            biased;
            r = &mut handler => Some(Ok(r)),
            _ = poll_fn(|cx| respond.poll_reset(cx)) => None,
            _ = idle.expired() => Some(Err(())),
        }
    };
    let answer = match answer {
        Some(Ok(Ok(r))) => Some(r),
        Some(Ok(Err(never))) => match never {},
        Some(Err(())) => {
            // before the answer began: said in the caller's protocol
            let reject = Reject::StreamIdle(state.idle().as_millis() as u64);
            let id = rid.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-");
            let (head, body) = reject.to_response(grpc, id).into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            if let Ok(mut tx) =
                respond.send_response(http::Response::from_parts(head, ()), bytes.is_empty())
            {
                if !bytes.is_empty() {
                    let _ = tx.send_data(bytes, true);
                }
            }
            finish(&shared, &state, End::Idle);
            return;
        }
        None => None,
    };
    let Some(resp) = answer else {
        finish(&shared, &state, End::Reset);
        return;
    };
    let (head, body) = resp.into_parts();
    let mut res = http::Response::from_parts(head, ());
    if !body.is_end_stream() {
        if let Some(n) = body.size_hint().exact() {
            res.headers_mut()
                .entry(http::header::CONTENT_LENGTH)
                .or_insert_with(|| http::HeaderValue::from(n));
        }
    }
    let eos = body.is_end_stream();
    let tx = match respond.send_response(res, eos) {
        Ok(tx) => tx,
        Err(e) => {
            tracing::debug!(error = %e, "sending a response head failed");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            finish(&shared, &state, End::Reset);
            return;
        }
    };
    if eos {
        return;
    }
    let end = pipe(body, tx, &mut idle).await;
    finish(&shared, &state, end);
}

/// Counts how a stream ended: an idle one as a refusal, a started one reset as a
/// cancellation against the connection's allowance.
fn finish(shared: &Shared, state: &StreamState, end: End) {
    match end {
        End::Done | End::Failed => {}
        End::Idle => {
            shared
                .metrics
                .reject(&shared.ctx.listener, "stream_idle_timeout");
            log_idle(&shared.ctx.listener, shared.ctx.remote, state.idle());
        }
        End::Reset => {
            if state.started() {
                if let Some(c) = &shared.cancels {
                    if c.record() {
                        shared.trip.trip("h2_rapid_reset");
                    }
                }
            }
        }
    }
}

/// Logs a stream reset for idleness, at most once per 10 s.
pub(super) fn log_idle(listener: &str, remote: std::net::SocketAddr, idle: Duration) {
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let now = Instant::now();
    if let Ok(mut last) = LAST.lock() {
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return;
        }
        *last = Some(now);
    }
    tracing::info!(
        listener,
        %remote,
        idle_ms = idle.as_millis() as u64,
        reason = "stream_idle_timeout",
        "stream reset: no bytes moved either way (counted in fedport_rejections_total; logged at most every 10s)"
    );
}

/// Sends the answer's body under flow control, as hyper's pipe does (a chunk waits for
/// stream capacity before it is handed to the codec, so at most one chunk past the
/// caller's window is held), and resets the stream when the caller resets it, when
/// the body fails, or when nothing moves for the idle timeout.
async fn pipe(mut body: RespBody, mut tx: h2::SendStream<Bytes>, idle: &mut Idle<'_>) -> End {
    loop {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            _ = poll_fn(|cx| tx.poll_reset(cx)) => return End::Reset,
            _ = idle.expired() => {
                tx.send_reset(h2::Reason::CANCEL);
                return End::Idle;
            }
        };
        let frame = match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return End::Done;
            }
            Some(Err(e)) => {
                tx.send_reset(h2_reason(&*e));
                return End::Failed;
            }
            Some(Ok(f)) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    let _ = tx.send_trailers(t);
                    return End::Done;
                }
                continue;
            }
        };
        let eos = body.is_end_stream();
        if !data.is_empty() {
            tx.reserve_capacity(1);
            while tx.capacity() == 0 {
                // capacity, or the caller's reset
                let capacity = poll_fn(|cx| {
                    if tx.poll_reset(cx).is_ready() {
                        return Poll::Ready(false);
                    }
                    match tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => Poll::Ready(true),
                        Poll::Ready(_) => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                });
                tokio::select! {
                    biased;
                    ok = capacity => if !ok {
                        return End::Reset;
                    },
                    _ = idle.expired() => {
                        // the caller stopped reading
                        tx.send_reset(h2::Reason::CANCEL);
                        return End::Idle;
                    }
                }
            }
            idle.state.touch();
        }
        if tx.send_data(data, eos).is_err() {
            return End::Reset;
        }
        if eos {
            return End::Done;
        }
    }
}

/// The HTTP/2 reason a failed body stands for: the h2 error underneath (a service's
/// own reset, passed on), else INTERNAL_ERROR.
fn h2_reason(e: &(dyn std::error::Error + 'static)) -> h2::Reason {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<h2::Error>().and_then(|h| h.reason()) {
            return r;
        }
        cur = err.source();
    }
    h2::Reason::INTERNAL_ERROR
}

/// The declared content-length, when every `content-length` field agrees.
fn content_length(h: &http::HeaderMap) -> Option<u64> {
    let mut len = None;
    for v in h.get_all(http::header::CONTENT_LENGTH) {
        let n: u64 = v.to_str().ok()?.trim().parse().ok()?;
        if len.is_some_and(|l| l != n) {
            return None;
        }
        len = Some(n);
    }
    len
}
