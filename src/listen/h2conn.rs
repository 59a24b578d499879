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
use crate::caller::{CallerBody, StreamState};
use crate::errors::Reject;
use crate::proxy::{self, ConnCtx, RespBody};
use crate::reason::Reason;
use bytes::Bytes;
use http_body::Body;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A caller's stream window: what one stream may have sent and fedport not yet passed
/// on. The connection window is as large as all streams' windows together, so a
/// stream that stalls never holds back the others.
pub const STREAM_WINDOW: u32 = 256 * 1024;
pub use crate::upstream::MAX_WINDOW;
/// A peer node's stream window: its connections carry many callers' streams across
/// regions, where a window must cover the round trip (the same both ways).
pub use crate::upstream::PEER_STREAM_WINDOW;

/// Decoded request headers allowed (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST: u32 = 64 * 1024;

/// PING an idle connection this often; no answer within the timeout closes it.
const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(20));

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

/// What every stream task of a connection shares.
struct Shared {
    ctx: Arc<ConnCtx>,
    trip: Arc<Trip>,
    /// Started streams reset, per identity (`limits::resets`), and the allowance.
    resets: Arc<crate::limits::resets::Resets>,
    allowance: u32,
    idle: Duration,
    metrics: Arc<crate::telemetry::Metrics>,
    streams: Streams,
    /// The stream window callers on this connection get.
    window: u32,
    /// The listener's `idle_timeout` (a peer's CONNECT tunnels close when nothing moves
    /// for it) and the node's drain signal.
    tunnels: (Duration, tokio::sync::watch::Receiver<bool>),
}

/// Serves an HTTP/2 connection until it ends; returns the bounded reason when fedport
/// itself ended it for the client's fault (a protocol error the codec found).
pub(super) async fn serve<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    acc: &Accepting,
    drain: &Drain,
    trip: Arc<Trip>,
) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_with(io, ctx, acc, drain, trip, KEEPALIVE).await
}

/// [`serve`], with the keepalive PING's interval and timeout: a reverse link this node
/// dialled PINGs as often as peer probes do, so that a cut link is dialled again soon.
pub(super) async fn serve_with<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    acc: &Accepting,
    drain: &Drain,
    trip: Arc<Trip>,
    keepalive: (Duration, Duration),
) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let spec = &acc.spec;
    let window = if ctx.from_peer {
        PEER_STREAM_WINDOW
    } else {
        STREAM_WINDOW
    };
    // all the streams' windows together, so that one stalled stream never holds back
    // the others; for a caller (one party) no more than its memory budget, since what
    // the window lets it send unread is held: a peer node's carries many callers'
    let all = u64::from(window) * u64::from(spec.max_streams);
    let conn_window = if ctx.from_peer {
        all
    } else {
        all.min(spec.connection_memory_budget)
            .max(u64::from(window))
    }
    .min(u64::from(MAX_WINDOW));
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
        resets: acc.worker.resets.clone(),
        allowance: spec.max_streams,
        ctx,
        trip: trip.clone(),
        idle: spec.stream_idle_timeout,
        metrics: acc.metrics.clone(),
        streams: Streams::default(),
        window,
        tunnels: (spec.idle_timeout, drain.signal.clone()),
    });
    let activity = shared.ctx.activity.clone();
    let mut signal = drain.signal.clone();
    let idle = spec.idle_timeout;
    // streams are found idle to within a quarter of their timeout
    let period = (idle / 4)
        .min(spec.header_timeout / 2)
        .min(spec.stream_idle_timeout / 4)
        .max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
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
            // a connection accepted before the node began to drain is served still: it
            // is told GOAWAY once its handshake is done, not cut in the middle of it
            _ = tick.tick() => trip.check_slow(),
        }
    };
    // an identity past its allowance is cut on a new connection at once, before any
    // stream of it starts: a caller that opens a connection for each burst and closes
    // it before the cut would otherwise start a burst of work every time
    {
        let ctx = &shared.ctx;
        let id = ctx.identity.to_str().unwrap_or_default();
        if !ctx.current.worker().peer_identities.contains(id)
            && shared.resets.over(id, shared.allowance)
        {
            trip.trip(Reason::H2RapidReset);
        }
    }
    let mut pings = conn.ping_pong();
    let mut ping_sent: Option<Instant> = None;
    let mut last_ping = Instant::now();
    let mut closing = false;
    let mut refused = None;
    let mut phase = drain.phase.clone();
    let mut settling: Option<tokio::time::Interval> = None;
    let mut handed_at = Instant::now();
    loop {
        tokio::select! {
            // the streams that arrive are started here, without a turn of this loop each
            ended = poll_fn(|cx| accept(&mut conn, &shared, cx)) => match ended {
                Some(Err(e)) => {
                    refused = super::refusal(&e);
                    tracing::debug!(listener = &*acc.name, error = %e, "connection ended with an error");
                    break;
                }
                _ => break,
            },
            _ = trip.notify.notified(), if cut.is_none() => {
                cut = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
            }
            _ = async { cut.as_mut().expect("guarded by is_some").await }, if cut.is_some() => break,
            _ = signal.wait_for(|s| *s), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            _ = phase.wait_for(|p| *p == super::Phase::HandedOver), if settling.is_none() && !closing => {
                settling = Some(tokio::time::interval(super::SETTLE / 4));
                handed_at = Instant::now();
            }
            // handed over: told GOAWAY once no stream has been open for SETTLE. A busy
            // connection serves on (a client that cannot move its requests elsewhere
            // after GOAWAY, such as h2load, loses none) until it ends or the upgrade's
            // drain time passes. A peer node's (a link of either direction) is told
            // SETTLE after the handover, busy or not: fedport resends what GOAWAY left
            // unprocessed, and the new process has had that long to dial its own links
            _ = async { settling.as_mut().expect("guarded by is_some").tick().await }, if settling.is_some() && !closing => {
                let peer_moves = handed_at.elapsed() >= super::SETTLE
                    && proxy::current(shared.ctx.clone()).from_peer;
                if peer_moves || activity.idle_for() >= super::SETTLE {
                    closing = true;
                    conn.graceful_shutdown();
                }
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
                shared.streams.tick(period);
                if !closing && activity.idle_for() >= idle {
                    closing = true;
                    acc.metrics.reject(&acc.name, Reason::IdleTimeout);
                    conn.graceful_shutdown();
                }
                // keepalive: a connection whose PING goes unanswered is gone
                match ping_sent {
                    Some(t) if t.elapsed() > keepalive.1 => {
                        tracing::debug!(listener = &*acc.name, "keepalive PING unanswered; closing");
                        break;
                    }
                    None if last_ping.elapsed() >= keepalive.0 => {
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

/// Starts the streams that have arrived; ready only when the connection ends (`None`,
/// or the error that ended it).
fn accept<I>(
    conn: &mut h2::server::Connection<I, Bytes>,
    shared: &Arc<Shared>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<(), h2::Error>>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // a turn is bounded, so that one connection's burst does not hold the worker
    for _ in 0..64 {
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok((req, respond)))) => spawn_stream(req, respond, shared),
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// The streams of a connection, for its timer to find the idle ones.
#[derive(Default)]
struct Streams {
    slots: std::sync::Mutex<Slots>,
}

/// Streams by slot, and the slots free for reuse.
#[derive(Default)]
struct Slots {
    all: Vec<Option<Arc<StreamState>>>,
    free: Vec<usize>,
}

impl Streams {
    fn insert(&self, s: Arc<StreamState>) -> usize {
        let Ok(mut g) = self.slots.lock() else {
            return usize::MAX;
        };
        let Slots { all, free } = &mut *g;
        match free.pop() {
            Some(i) => {
                all[i] = Some(s);
                i
            }
            None => {
                all.push(Some(s));
                all.len() - 1
            }
        }
    }

    fn remove(&self, i: usize) {
        if let Ok(mut g) = self.slots.lock() {
            let Slots { all, free } = &mut *g;
            if let Some(slot) = all.get_mut(i) {
                if slot.take().is_some() {
                    free.push(i);
                }
            }
        }
    }

    fn tick(&self, period: Duration) {
        if let Ok(g) = self.slots.lock() {
            for s in g.all.iter().flatten() {
                s.tick(period);
            }
        }
    }
}

/// Why a stream ended, for the counts.
enum End {
    Done,
    /// Reset by the caller, or by the codec for the caller's protocol error.
    Reset,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The answer failed (the service's reset, a truncated answer).
    Failed,
    /// The caller left the answer unread past its memory budget.
    Memory(crate::memory::Over),
}

fn spawn_stream(
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    shared: &Arc<Shared>,
) {
    let (parts, recv) = req.into_parts();
    if matches!(parts.method, http::Method::CONNECT | http::Method::OPTIONS)
        && proxy::current(shared.ctx.clone()).from_peer
    {
        if crate::upstream::reverse::is_ping(&parts) {
            // a peer probing the reverse link this node opened: answered at once, and
            // the link is not idle while it does
            drop(shared.ctx.activity.begin());
            let mut respond = respond;
            let mut resp = http::Response::new(());
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            let _ = respond.send_response(resp, true);
            return;
        }
        if parts.method == http::Method::CONNECT {
            // a peer carrying a connection to a TCP service (src/tcp)
            let (idle, drain) = shared.tunnels.clone();
            tokio::spawn(crate::tcp::tunnel(
                parts,
                recv,
                respond,
                shared.ctx.clone(),
                idle,
                drain,
            ));
            return;
        }
    }
    let state = Arc::new(StreamState::new(shared.idle));
    let length = content_length(&parts.headers);
    // what the codec may hold of a body still to come counts against the budgets (not
    // a peer node's: its streams carry callers whose bodies are charged at the node
    // they came in at)
    let held = if recv.is_end_stream() || shared.ctx.from_peer {
        None
    } else {
        let window = u64::from(shared.window);
        let need = length.map_or(window, |n| n.min(window));
        match crate::memory::Held::with(shared.ctx.memory.clone(), need) {
            Ok(h) => Some((h, window)),
            Err(over) => {
                refuse(respond, &parts.headers, Reject::Memory(over), shared);
                return;
            }
        }
    };
    let req = http::Request::from_parts(parts, CallerBody::h2(recv, length, state.clone(), held));
    // Boxed: the request's state machine is several KiB; inline, the task would be
    // that large and copied whole into its allocation (memmove was 12% of the CPU so)
    let handler = boxed_handler(req, shared.ctx.clone(), state.clone());
    let slot = shared.streams.insert(state.clone());
    tokio::spawn(Stream {
        shared: shared.clone(),
        state,
        slot,
        respond,
        phase: Phase::Answer(handler),
        woken_by_timer: false,
    });
}

/// Answers a stream fedport refuses before it starts (in the caller's protocol), and
/// counts it.
fn refuse(
    mut respond: h2::server::SendResponse<Bytes>,
    headers: &http::HeaderMap,
    reject: Reject,
    shared: &Shared,
) {
    let grpc = crate::request::ContentTypeField::of(headers).claims_grpc();
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let (head, body) = reject.answer(grpc, id);
    if let Ok(mut tx) = respond.send_response(http::Response::from_parts(head, ()), body.is_empty())
    {
        if !body.is_empty() {
            let _ = tx.send_data(body, true);
        }
    }
    shared.metrics.reject(&shared.ctx.listener, reject.reason());
}

/// The request's handler, boxed where it is made: built in place, its several KiB of
/// state are not copied into the box (inlined into `spawn_stream` they were, 10,000
/// instructions a request).
#[inline(never)]
fn boxed_handler(
    req: http::Request<CallerBody>,
    ctx: Arc<ConnCtx>,
    state: Arc<StreamState>,
) -> Pin<Box<impl Future<Output = Result<http::Response<RespBody>, std::convert::Infallible>>>> {
    Box::pin(proxy::handle(req, ctx, Some(state)))
}

/// One stream's task, written out rather than `async` so that it stays small: the
/// request's handler (boxed) until the answer's head is ready, then the answer's body
/// piped under flow control, as hyper's pipe does (a chunk waits for stream capacity
/// before it goes to the codec, so at most one chunk past the caller's window is
/// held). Either phase ends when the caller (or the codec, for its protocol errors)
/// resets the stream, or when no body bytes moved for the idle timeout.
struct Stream<F> {
    shared: Arc<Shared>,
    state: Arc<StreamState>,
    slot: usize,
    respond: h2::server::SendResponse<Bytes>,
    phase: Phase<F>,
    /// The timer has the task's waker.
    woken_by_timer: bool,
}

// The body is the stream's state for most of its life; boxing it would cost an
// allocation per stream to save bytes in a task that holds one of them.
#[allow(clippy::large_enum_variant)]
enum Phase<F> {
    Answer(Pin<Box<F>>),
    Body {
        body: RespBody,
        tx: h2::SendStream<Bytes>,
        /// A chunk waiting for the caller's window, and whether it ends the body.
        pending: Option<(Bytes, bool)>,
        /// What the codec may take in of the answer meanwhile, charged once the
        /// caller's window stalled it.
        held: Option<crate::memory::Held>,
    },
    Ended,
}

impl<F> Drop for Stream<F> {
    fn drop(&mut self) {
        self.shared.streams.remove(self.slot);
    }
}

impl<F> Future for Stream<F>
where
    F: Future<Output = Result<http::Response<RespBody>, std::convert::Infallible>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Unpin: the handler, the one field that is not, is boxed
        let this = self.get_mut();
        if !this.woken_by_timer {
            this.woken_by_timer = true;
            this.state.set_waker(cx.waker());
        }
        let end = match &mut this.phase {
            Phase::Answer(handler) => {
                let resp = match handler.as_mut().poll(cx) {
                    Poll::Ready(Ok(r)) => r,
                    Poll::Ready(Err(never)) => match never {},
                    Poll::Pending => {
                        if this.respond.poll_reset(cx).is_ready() {
                            End::Reset.finish(this)
                        } else if this.state.expired() {
                            // before the answer began: said in the caller's protocol;
                            // the handler is dropped, its upstream call cancelled
                            this.phase = Phase::Ended;
                            this.answer_idle();
                            End::Idle.finish(this)
                        } else {
                            return Poll::Pending;
                        }
                        return Poll::Ready(());
                    }
                };
                let (head, body) = resp.into_parts();
                let mut res = http::Response::from_parts(head, ());
                let eos = body.is_end_stream();
                if !eos {
                    if let Some(n) = body.size_hint().exact() {
                        res.headers_mut()
                            .entry(http::header::CONTENT_LENGTH)
                            .or_insert_with(|| http::HeaderValue::from(n));
                    }
                }
                match this.respond.send_response(res, eos) {
                    Ok(_) if eos => {
                        this.phase = Phase::Ended;
                        return Poll::Ready(());
                    }
                    Ok(tx) => {
                        this.phase = Phase::Body {
                            body,
                            tx,
                            pending: None,
                            held: None,
                        };
                        return Pin::new(this).poll(cx);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "sending a response head failed");
                        this.respond.send_reset(h2::Reason::INTERNAL_ERROR);
                        End::Reset
                    }
                }
            }
            Phase::Body {
                body,
                tx,
                pending,
                held,
            } => {
                let memory = &this.shared.ctx.memory;
                match pipe(body, tx, pending, (held, memory), &this.state, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(end) => end,
                }
            }
            Phase::Ended => return Poll::Ready(()),
        };
        this.phase = Phase::Ended;
        end.finish(this);
        Poll::Ready(())
    }
}

impl<F> Stream<F> {
    /// The refusal for a stream that sat idle before its answer began.
    fn answer_idle(&mut self) {
        let reject = Reject::StreamIdle(self.state.idle().as_millis() as u64);
        let (grpc, rid) = self.state.answered_as();
        let id = rid.and_then(|v| v.to_str().ok()).unwrap_or("-");
        let (head, body) = reject.answer(grpc, id);
        if let Ok(mut tx) = self
            .respond
            .send_response(http::Response::from_parts(head, ()), body.is_empty())
        {
            if !body.is_empty() {
                let _ = tx.send_data(body, true);
            }
        }
    }
}

impl End {
    /// Counts how a stream ended: an idle one as a refusal, a started one reset as a
    /// cancellation against the connection's allowance.
    fn finish<F>(self, s: &Stream<F>) {
        let shared = &s.shared;
        match self {
            End::Done | End::Failed => {}
            End::Idle => {
                shared
                    .metrics
                    .reject(&shared.ctx.listener, Reason::StreamIdle);
                log_idle(&shared.ctx.listener, shared.ctx.remote, s.state.idle());
                // a started call fedport cancels because the caller left it: the
                // caller's cancellation as much as its own RST_STREAM would be
                End::Reset.finish(s);
            }
            End::Memory(over) => {
                shared.metrics.reject(&shared.ctx.listener, Reason::Memory);
                log_unread(&shared.ctx.listener, shared.ctx.remote, over);
                End::Reset.finish(s);
            }
            End::Reset => {
                // not for peer nodes (as the configuration in force says): their
                // connections carry many callers' cancellations, each caller bounded at
                // its own node
                let ctx = &shared.ctx;
                let id = ctx.identity.to_str().unwrap_or_default();
                if s.state.started()
                    && !ctx.current.worker().peer_identities.contains(id)
                    && shared.resets.spent(id, shared.allowance)
                {
                    shared.trip.trip(Reason::H2RapidReset);
                }
            }
        }
    }
}

/// Logs a stream reset for idleness, at most once per 10 s.
pub(super) fn log_idle(listener: &str, remote: std::net::SocketAddr, idle: Duration) {
    if !crate::telemetry::log_due(Reason::StreamIdle) {
        return;
    }
    tracing::info!(
        listener,
        %remote,
        idle_ms = idle.as_millis() as u64,
        reason = Reason::StreamIdle.as_str(),
        "stream reset: no bytes moved either way (counted in fedport_rejections_total; logged at most every 10s)"
    );
}

/// Logs an answer reset for being left unread past a budget, at most once per 10 s.
fn log_unread(listener: &str, remote: std::net::SocketAddr, over: crate::memory::Over) {
    if !crate::telemetry::log_due(Reason::Memory) {
        return;
    }
    tracing::info!(
        listener,
        %remote,
        budget = %over,
        reason = Reason::Memory.as_str(),
        "answer reset: the caller left it unread with its memory budget spent (counted in fedport_rejections_total; logged at most every 10s)"
    );
}

/// One turn of the answer's body: until the body or the caller's window makes it wait,
/// or the stream ends. `held`: what the codec may take in of the answer while the
/// caller's window stalls it, charged the first time it does; past a budget the
/// answer is reset (the caller is not reading it), as Envoy's overload manager resets
/// the streams holding the most.
fn pipe(
    body: &mut RespBody,
    tx: &mut h2::SendStream<Bytes>,
    pending: &mut Option<(Bytes, bool)>,
    (held, memory): (
        &mut Option<crate::memory::Held>,
        &Arc<crate::memory::Connection>,
    ),
    state: &StreamState,
    cx: &mut Context<'_>,
) -> Poll<End> {
    // the caller's reset is looked for before waiting (it wakes the task), not at every
    // step: a reset stream fails the send anyway
    let wait = |tx: &mut h2::SendStream<Bytes>, cx: &mut Context<'_>| {
        if tx.poll_reset(cx).is_ready() {
            Poll::Ready(End::Reset)
        } else {
            Poll::Pending
        }
    };
    loop {
        if state.expired() {
            // the caller stopped reading, or the service stopped answering
            tx.send_reset(h2::Reason::CANCEL);
            return Poll::Ready(End::Idle);
        }
        if let Some((data, eos)) = pending.take() {
            if tx.capacity() == 0 {
                match tx.poll_capacity(cx) {
                    Poll::Pending => {
                        let window = state.answer_window();
                        if held.is_none() && window > 0 {
                            match crate::memory::Held::with(memory.clone(), window) {
                                Ok(h) => *held = Some(h),
                                Err(over) => {
                                    tx.send_reset(h2::Reason::CANCEL);
                                    return Poll::Ready(End::Memory(over));
                                }
                            }
                        }
                        *pending = Some((data, eos));
                        return wait(tx, cx);
                    }
                    Poll::Ready(Some(Ok(_))) => {
                        *pending = Some((data, eos));
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(End::Reset),
                }
            }
            state.touch();
            if tx.send_data(data, eos).is_err() {
                return Poll::Ready(End::Reset);
            }
            if eos {
                return Poll::Ready(End::Done);
            }
            continue;
        }
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return wait(tx, cx),
            Poll::Ready(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return Poll::Ready(End::Done);
            }
            Poll::Ready(Some(Err(e))) => {
                tx.send_reset(h2_reason(&*e));
                return Poll::Ready(End::Failed);
            }
            Poll::Ready(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {
                if body.is_end_stream() {
                    let _ = tx.send_data(data, true);
                    return Poll::Ready(End::Done);
                }
            }
            Ok(data) => {
                let eos = body.is_end_stream();
                // a minimal claim on the window (hyper #4003: claiming a whole chunk
                // pins connection capacity another stream may need); a stream that
                // has capacity left sends at once
                if tx.capacity() == 0 {
                    tx.reserve_capacity(1);
                }
                *pending = Some((data, eos));
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    let _ = tx.send_trailers(t);
                    return Poll::Ready(End::Done);
                }
            }
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
