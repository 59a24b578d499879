//! The caller's side of one request: its body, from an HTTP/1.1 connection (hyper) or
//! an HTTP/2 stream (`h2`), and what the HTTP/2 stream task and the request path share
//! about the stream — whether bytes move, how long it may sit still, whether fedport
//! had started work on it when it was reset.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// What one HTTP/2 stream's task, its request and its connection's timer share.
#[derive(Debug)]
pub struct StreamState {
    /// Bumped whenever body bytes move, either way.
    moved: AtomicU64,
    /// The stream's idle timeout in milliseconds: the listener's, until the request is
    /// routed to a service with its own.
    idle_ms: AtomicU64,
    /// Routed and authorized: work has started on it (a reset now costs something).
    started: AtomicBool,
    /// The connection's timer: `moved` as it last saw it, and for how long (ms) it has
    /// seen it unchanged.
    seen: AtomicU64,
    still_ms: AtomicU64,
    /// Set by the timer once nothing moved for the idle timeout; the task is woken.
    expired: AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
    /// How a refusal of the stream itself is answered: in gRPC or not, with the
    /// request's id (set by the request path).
    grpc: AtomicBool,
    request_id: std::sync::OnceLock<http::HeaderValue>,
    /// What the codec may take in of the answer while the caller does not read it (0:
    /// nothing to charge), charged once the caller's window stalls the answer.
    answer_window: AtomicU64,
}

impl StreamState {
    pub fn new(idle: Duration) -> Self {
        Self {
            moved: AtomicU64::new(0),
            idle_ms: AtomicU64::new(idle.as_millis() as u64),
            started: AtomicBool::new(false),
            seen: AtomicU64::new(0),
            still_ms: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            waker: std::sync::Mutex::new(None),
            grpc: AtomicBool::new(false),
            request_id: std::sync::OnceLock::new(),
            answer_window: AtomicU64::new(0),
        }
    }

    /// See [`StreamState::answer_window`].
    pub fn set_answer_window(&self, n: u64) {
        self.answer_window.store(n, Ordering::Relaxed);
    }

    /// What to charge for an answer the caller's window stalls.
    pub fn answer_window(&self) -> u64 {
        self.answer_window.load(Ordering::Relaxed)
    }

    /// The connection's timer, every `period`: once nothing has moved for the idle
    /// timeout, the stream is expired and its task woken. No timer per stream: a
    /// stream costs the timer a few atomics per tick, and nothing when it is short.
    pub fn tick(&self, period: Duration) {
        let now = self.progress();
        if self.seen.swap(now, Ordering::Relaxed) != now {
            self.still_ms.store(0, Ordering::Relaxed);
            return;
        }
        let still = self
            .still_ms
            .fetch_add(period.as_millis() as u64, Ordering::Relaxed)
            + period.as_millis() as u64;
        if still >= self.idle_ms.load(Ordering::Relaxed)
            && !self.expired.swap(true, Ordering::Relaxed)
        {
            if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
                w.wake();
            }
        }
    }

    /// The stream's task, for the timer to wake: given once, on its first poll (a
    /// task's waker does not change).
    pub fn set_waker(&self, w: &std::task::Waker) {
        if let Ok(mut g) = self.waker.lock() {
            *g = Some(w.clone());
        }
    }

    /// Whether the connection's timer found the stream idle.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    pub fn touch(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    /// The progress count; compared to an earlier one, tells whether bytes moved.
    pub fn progress(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
    }

    pub fn set_idle(&self, idle: Duration) {
        self.idle_ms
            .store(idle.as_millis() as u64, Ordering::Relaxed);
    }

    /// How the stream's own refusals are answered.
    pub fn answer_as(&self, grpc: bool, request_id: &http::HeaderValue) {
        self.grpc.store(grpc, Ordering::Relaxed);
        let _ = self.request_id.set(request_id.clone());
    }

    /// Whether the caller speaks gRPC, and the request's id, for the stream's refusals.
    pub fn answered_as(&self) -> (bool, Option<&http::HeaderValue>) {
        (self.grpc.load(Ordering::Relaxed), self.request_id.get())
    }

    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }
}

/// A request body as it arrives from the caller.
pub enum CallerBody {
    H1(hyper::body::Incoming),
    H2(H2Body),
}

impl CallerBody {
    /// `held`: what the codec may hold of the body still to come, charged while it is
    /// (see [`H2Body`]).
    pub fn h2(
        recv: h2::RecvStream,
        length: Option<u64>,
        state: std::sync::Arc<StreamState>,
        held: Option<(crate::memory::Held, u64)>,
    ) -> Self {
        CallerBody::H2(H2Body {
            recv,
            ended: std::cell::Cell::new(false),
            left: length,
            data_done: false,
            state,
            held,
        })
    }
}

/// An HTTP/2 request body: DATA is handed on as it arrives and its flow-control
/// capacity given back at once (as hyper does), so a stream's window measures what
/// the caller may have outstanding, never what fedport sits on.
pub struct H2Body {
    recv: h2::RecvStream,
    /// The codec said the body ended (asking it takes a lock).
    ended: std::cell::Cell<bool>,
    /// What the declared content-length still owes (h2 itself refuses a mismatch).
    left: Option<u64>,
    data_done: bool,
    state: std::sync::Arc<StreamState>,
    /// What the codec may hold of the body still to come — the stream window, or what
    /// the declared length still owes — against the memory budgets, and the window.
    held: Option<(crate::memory::Held, u64)>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl H2Body {
    fn is_end_stream(&self) -> bool {
        if !self.ended.get() && self.recv.is_end_stream() {
            self.ended.set(true);
        }
        self.ended.get()
    }
}

impl Body for CallerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            CallerBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            CallerBody::H2(b) => {
                if !b.data_done {
                    match std::task::ready!(b.recv.poll_data(cx)) {
                        Some(Ok(data)) => {
                            let _ = b.recv.flow_control().release_capacity(data.len());
                            if let Some(l) = &mut b.left {
                                *l = l.saturating_sub(data.len() as u64);
                            }
                            if let Some((h, window)) = &mut b.held {
                                // only ever less: nothing to refuse
                                let _ = h.set(b.left.map_or(*window, |l| l.min(*window)));
                            }
                            b.state.touch();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                        None => {
                            b.data_done = true;
                            b.held = None;
                        }
                    }
                }
                match std::task::ready!(b.recv.poll_trailers(cx)) {
                    Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallerBody::H1(b) => b.is_end_stream(),
            CallerBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            CallerBody::H1(b) => b.size_hint(),
            CallerBody::H2(b) => match b.left {
                Some(n) => SizeHint::with_exact(n),
                None if b.is_end_stream() => SizeHint::with_exact(0),
                None => SizeHint::default(),
            },
        }
    }
}
