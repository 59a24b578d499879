//! What a service accepts: content types (`formats`) and message size
//! (`max_message_bytes`), enforced as the body streams — on each gRPC message's length
//! prefix, or on an HTTP body's bytes — never by buffering it first.

pub mod compile;
pub mod framer;
pub mod json;
pub mod wire;

pub use framer::{Framer, More, Refusal, Step};

use crate::reason::{GrpcCode, Reason};
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most a body validated against a JSON Schema may be when the service sets no
/// `max_message_bytes` (it is buffered whole to be validated).
pub const DEFAULT_JSON_LIMIT: u64 = 1 << 20;

/// At most this many violations are reported for one body.
const MAX_VIOLATIONS: usize = 10;

/// Parses a body as JSON ([`json::parse`]: no key twice, in any case) and validates it
/// against the route's schema; every violation (up to a cap) with its JSON pointer and
/// keyword.
pub fn validate_json(
    route: &compile::JsonRoute,
    body: &[u8],
) -> Result<(), Vec<crate::errors::Violation>> {
    use crate::errors::Violation;
    let doc = json::parse(body).map_err(|e| {
        vec![Violation {
            path: String::new(),
            keyword: "json".into(),
            message: format!("not JSON that reads one way: {e}"),
        }]
    })?;
    let v: Vec<Violation> = route
        .validator
        .iter_errors(&doc)
        .take(MAX_VIOLATIONS)
        .map(|e| Violation {
            path: e.instance_path().to_string(),
            keyword: e.kind().keyword().to_owned(),
            message: e.to_string(),
        })
        .collect();
    if v.is_empty() {
        Ok(())
    } else {
        Err(v)
    }
}

/// The content types a gRPC service accepts when it lists none.
pub const GRPC_FORMATS: &[&str] = &["application/grpc", "application/grpc+proto"];

/// Whether a content type is one the service accepts. An empty list accepts anything.
pub fn format_accepted(formats: &[String], m: crate::request::MediaType<'_>) -> bool {
    formats.is_empty() || formats.iter().any(|f| m.is(f))
}

/// Set by a [`Guarded`] body when it refuses what it carries, and read by the request
/// path and the answer's body to say why.
#[derive(Debug, Default)]
pub struct Tripped {
    /// The size that was over the limit (0 while nothing was refused for size).
    too_large: AtomicU64,
    /// Why a gRPC message was refused by its schema.
    schema: std::sync::Mutex<Option<String>>,
    /// Body bytes that went through.
    bytes: AtomicU64,
    /// The caller's own body failed (its stream was reset or its connection lost).
    caller_failed: std::sync::atomic::AtomicBool,
    /// A memory budget refused to hold more of it.
    memory: std::sync::Mutex<Option<crate::memory::Over>>,
    /// When the whole body was passed on: a service that does not answer after that is
    /// not waiting for the caller.
    ended: std::sync::OnceLock<tokio::time::Instant>,
}

/// What a tripped guard answers a gRPC call with.
pub struct GrpcRefusal {
    pub code: GrpcCode,
    pub message: String,
    /// The refusal's reason (metric label).
    pub reason: Reason,
}

impl Tripped {
    /// Whether the caller's body failed while it was passed on: a failed exchange is
    /// then the caller's doing, not the service's.
    pub fn caller_failed(&self) -> bool {
        self.caller_failed.load(Ordering::Relaxed)
    }

    fn fail(&self) {
        self.caller_failed.store(true, Ordering::Relaxed);
    }

    /// When the whole body was passed on, if it was.
    pub fn ended(&self) -> Option<tokio::time::Instant> {
        self.ended.get().copied()
    }

    pub fn end(&self) {
        let _ = self.ended.set(tokio::time::Instant::now());
    }

    /// Body bytes the guard let through.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn count(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        match self.too_large.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn set_too_large(&self, n: u64) {
        self.too_large.store(n.max(1), Ordering::Relaxed);
    }

    /// Why a gRPC message was refused by its schema, if one was.
    pub fn schema_error(&self) -> Option<String> {
        self.schema.lock().ok().and_then(|s| s.clone())
    }

    /// Which memory budget refused to hold more, if one did.
    pub fn memory(&self) -> Option<crate::memory::Over> {
        self.memory.lock().ok().and_then(|m| *m)
    }

    pub fn set_memory(&self, over: crate::memory::Over) {
        if let Ok(mut m) = self.memory.lock() {
            m.get_or_insert(over);
        }
    }

    /// Whether the guard refused anything.
    pub fn refused(&self) -> bool {
        self.get().is_some() || self.schema_error().is_some() || self.memory().is_some()
    }

    /// The refusal as a gRPC status, if the guard refused anything.
    pub fn grpc_refusal(&self) -> Option<GrpcRefusal> {
        if let Some(over) = self.memory() {
            return Some(GrpcRefusal {
                code: GrpcCode::ResourceExhausted,
                message: format!(
                    "a message could not be held for validation: it would pass {over}"
                ),
                reason: Reason::Memory,
            });
        }
        if let Some(n) = self.get() {
            return Some(GrpcRefusal {
                code: GrpcCode::ResourceExhausted,
                message: format!("message of {n} bytes is over the service's limit"),
                reason: Reason::Size,
            });
        }
        self.schema_error().map(|e| GrpcRefusal {
            code: GrpcCode::InvalidArgument,
            message: format!("message refused by its schema: {e}"),
            reason: Reason::Schema,
        })
    }

    fn set_schema_error(&self, e: String) {
        if let Ok(mut s) = self.schema.lock() {
            s.get_or_insert(e);
        }
    }
}

/// The most a validated gRPC message may be, compressed or not, when the service sets
/// no `max_message_bytes` (gRPC's own default receive limit): validation holds a whole
/// message.
pub const DEFAULT_GRPC_LIMIT: u64 = 4 << 20;

/// What a gRPC call's messages (requests, or responses) are checked against.
#[derive(Debug, Clone)]
pub struct ProtoCheck {
    pub message: Arc<wire::Compiled>,
    pub strict: bool,
}

impl ProtoCheck {
    /// Checks one message (without its 5-byte prefix); the problem, naming the field.
    pub fn check(&self, msg: &[u8]) -> Result<(), String> {
        self.message.check(msg, self.strict)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("message refused by its schema: {0}")]
pub struct SchemaViolation(pub String);

#[derive(Debug, thiserror::Error)]
#[error("message of {0} bytes is over the service's limit")]
pub struct TooLarge(pub u64);

/// The guard refused the body (see its [`Tripped`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body was refused")]
pub struct Refused;

/// How a [`Guarded`] body counts.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Total bytes of an HTTP body.
    Body(u64),
    /// Each gRPC message, by its 5-byte length prefix.
    GrpcMessage(u64),
}

pin_project_lite::pin_project! {
    /// A request body passed through frame by frame, refusing to carry more than the
    /// limit: it errors (and marks [`Tripped`]) as soon as the limit is known to be
    /// passed — for gRPC, when a length prefix declares too large a message, before
    /// any of that message's bytes are read.
    pub struct Guarded {
        #[pin]
        inner: crate::caller::CallerBody,
        limit: Limit,
        seen: u64,
        // gRPC framing state: bytes of the current message still to pass, and a
        // partial prefix carried across frames
        remaining: u64,
        prefix: Vec<u8>,
        tripped: Arc<Tripped>,
        // with a proto schema: whole messages are held until they validate (boxed: the
        // guard is moved with the request, and most requests have none)
        framer: Option<Box<Framer>>,
        // frames read ahead (by take_if_whole) and given back first
        held: std::collections::VecDeque<Frame<Bytes>>,
        // the worker's inflation share is spent until then
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl Guarded {
    pub fn new(
        inner: crate::caller::CallerBody,
        limit: Limit,
        tripped: Arc<Tripped>,
        framer: Option<Box<Framer>>,
    ) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            remaining: 0,
            prefix: Vec::with_capacity(5),
            tripped,
            framer,
            held: std::collections::VecDeque::new(),
            wait: None,
        }
    }

    /// Takes the body if all of it has already arrived — as a unary call's or a GET's
    /// usually has by the time its head is read — so that it can be sent again:
    /// `Ok(Some(bytes))`. Never waits: `Ok(None)` when more is still to come or it is
    /// over 64 KiB (what was read is given back first). `Err` when the guard refused it.
    ///
    /// What it takes counts against `held`; past the budget it is refused
    /// ([`Tripped::memory`]).
    pub fn take_if_whole(
        &mut self,
        held: &mut crate::memory::Held,
    ) -> Result<Option<Bytes>, Refused> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got: Vec<Frame<Bytes>> = Vec::new();
        let mut size = 0;
        let whole = loop {
            match Pin::new(&mut *self).poll_frame(&mut cx) {
                Poll::Ready(None) => break true,
                Poll::Ready(Some(Ok(f))) => {
                    let data = f.data_ref().map(Bytes::len);
                    got.push(f);
                    match data {
                        Some(n) if size + n <= 64 * 1024 => size += n,
                        _ => break false,
                    }
                }
                Poll::Ready(Some(Err(_))) => return Err(Refused),
                Poll::Pending => break false,
            }
        };
        if !whole {
            self.held.extend(got);
            return Ok(None);
        }
        if let Err(over) = held.set(size as u64) {
            self.tripped.set_memory(over);
            return Err(Refused);
        }
        let mut all = bytes::BytesMut::with_capacity(size);
        for f in got {
            if let Ok(d) = f.into_data() {
                all.extend_from_slice(&d);
            }
        }
        Ok(Some(all.freeze()))
    }
}

/// Walks the gRPC framing through one chunk; returns a message length over `max`.
fn scan_grpc(mut data: &[u8], remaining: &mut u64, prefix: &mut Vec<u8>, max: u64) -> Option<u64> {
    while !data.is_empty() {
        if *remaining > 0 {
            let n = (*remaining).min(data.len() as u64);
            *remaining -= n;
            data.advance(n as usize);
            continue;
        }
        let need = 5 - prefix.len();
        let take = need.min(data.len());
        prefix.extend_from_slice(&data[..take]);
        data.advance(take);
        if prefix.len() == 5 {
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as u64;
            prefix.clear();
            if len > max {
                return Some(len);
            }
            *remaining = len;
        }
    }
    None
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.as_mut().poll_guarded(cx);
        // the end as the codec sees it: no more frames, or one it sends as the last
        let end = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.is_end_stream(),
            _ => false,
        };
        if end {
            self.tripped.end();
        }
        polled
    }

    /// Only once everything was passed on and nothing was refused: the codec sends
    /// END_STREAM with a frame that is followed by none, and after a refusal the next
    /// poll is the error that resets the service's side.
    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && self.inner.is_end_stream()
            && self
                .framer
                .as_ref()
                .is_none_or(|f| !f.busy() && !f.unfinished())
            && !self.tripped.refused()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Guarded {
    fn poll_guarded(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, <Self as Body>::Error>>> {
        let mut this = self.project();
        if let Some(f) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(framer) = this.framer.as_mut() {
            loop {
                // After a refused message the call is reset on the service's side too,
                // even when valid ones already went: ended cleanly, the service would
                // complete a call (and answer OK) that the caller is told failed with
                // INVALID_ARGUMENT, and the caller would send again what it committed
                if let Some(n) = this.tripped.get() {
                    return Poll::Ready(Some(Err(Box::new(TooLarge(n)))));
                }
                if let Some(e) = this.tripped.schema_error() {
                    return Poll::Ready(Some(Err(Box::new(SchemaViolation(e)))));
                }
                if let Some(over) = this.tripped.memory() {
                    return Poll::Ready(Some(Err(Box::new(over))));
                }
                // a message being inflated first: no more of the caller's bytes are
                // read until it is checked (flow control holds the caller back)
                let step = if framer.busy() {
                    if let Some(w) = this.wait.as_mut() {
                        std::task::ready!(w.as_mut().poll(cx));
                        *this.wait = None;
                    }
                    framer.resume()
                } else {
                    let frame = match this.inner.as_mut().poll_frame(cx) {
                        Poll::Ready(Some(Ok(f))) => f,
                        Poll::Ready(Some(Err(e))) => {
                            this.tripped.fail();
                            return Poll::Ready(Some(Err(e)));
                        }
                        Poll::Ready(None) if framer.unfinished() => {
                            this.tripped.set_schema_error(
                                "the stream ended inside a message (truncated)".into(),
                            );
                            continue;
                        }
                        Poll::Ready(None) => return Poll::Ready(None),
                        Poll::Pending => return Poll::Pending,
                    };
                    match frame.into_data() {
                        Ok(d) => framer.push(d),
                        Err(other) => return Poll::Ready(Some(Ok(without_fed(other)))),
                    }
                };
                match step.refusal {
                    Some(Refusal::TooLarge(n)) => this.tripped.set_too_large(n),
                    Some(Refusal::Invalid(e)) => this.tripped.set_schema_error(e),
                    Some(Refusal::Memory(over)) => this.tripped.set_memory(over),
                    None => {}
                }
                match step.more {
                    More::No => {}
                    // yield to the worker's other tasks between slices of inflation
                    More::Now if step.out.is_none() => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    More::Now => {}
                    More::At(t) => *this.wait = Some(Box::pin(tokio::time::sleep_until(t.into()))),
                }
                if let Some(out) = step.out {
                    this.tripped.count(out.len());
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => {
                this.tripped.fail();
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            this.tripped.count(data.len());
            let over = match *this.limit {
                Limit::Body(max) => {
                    *this.seen += data.len() as u64;
                    (*this.seen > max).then_some(*this.seen)
                }
                Limit::GrpcMessage(max) => scan_grpc(data, this.remaining, this.prefix, max),
            };
            if let Some(n) = over {
                this.tripped.set_too_large(n);
                return Poll::Ready(Some(Err(Box::new(TooLarge(n)))));
            }
        }
        Poll::Ready(Some(Ok(without_fed(frame))))
    }
}

/// Why a body could not be collected whole.
#[derive(Debug)]
pub enum Collect {
    /// Past the limit.
    TooLarge,
    /// Past a memory budget.
    Memory(crate::memory::Over),
    /// The body failed (refused by its guard, or the caller's stream ended early).
    Failed,
}

/// Collects a body whole, at most `max` bytes, what it holds charged against `held`
/// as it grows. A body that arrives in one frame is taken as it is, without a copy.
pub async fn collect(
    mut body: Guarded,
    max: u64,
    held: &mut crate::memory::Held,
) -> Result<Bytes, Collect> {
    use http_body_util::BodyExt;
    let mut first: Option<Bytes> = None;
    let mut all = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Collect::Failed)?.into_data() else {
            continue;
        };
        let total = first.as_ref().map_or(0, Bytes::len) + all.len() + data.len();
        if total as u64 > max {
            return Err(Collect::TooLarge);
        }
        match first.take() {
            None if all.is_empty() => first = Some(data),
            Some(f) => {
                all.extend_from_slice(&f);
                all.extend_from_slice(&data);
            }
            None => all.extend_from_slice(&data),
        }
        let size = first.as_ref().map_or(0, Bytes::len) + all.capacity();
        held.set(size as u64).map_err(Collect::Memory)?;
    }
    Ok(first.unwrap_or_else(|| all.freeze()))
}

/// Request trailers lose the headers only fedport sets, as the request's headers do: a
/// caller cannot pass a `fed-peer` or an `x-forwarded-for` at the end of its body.
fn without_fed(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut t) => {
            crate::headers::strip_claims(&mut t);
            Frame::trailers(t)
        }
        Err(other) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn grpc_framing_is_followed_across_chunks() {
        let mut stream = msg(10);
        stream.extend(msg(3));
        stream.extend(msg(100));
        // split everywhere: the oversized third message is found whatever the chunking
        for cut in 1..stream.len() {
            let (mut rem, mut pre) = (0, Vec::new());
            let a = scan_grpc(&stream[..cut], &mut rem, &mut pre, 50);
            let b = a.or_else(|| scan_grpc(&stream[cut..], &mut rem, &mut pre, 50));
            assert_eq!(b, Some(100), "cut at {cut}");
        }
        let (mut rem, mut pre) = (0, Vec::new());
        assert_eq!(scan_grpc(&stream, &mut rem, &mut pre, 100), None);
    }

    fn msg_type() -> prost_reflect::MessageDescriptor {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t.proto"),
            "syntax = \"proto3\"; package t; message M { string s = 1; }",
        )
        .unwrap();
        let mut c = protox::Compiler::new([dir.path()]).unwrap();
        c.open_file("t.proto").unwrap();
        c.descriptor_pool().get_message_by_name("t.M").unwrap()
    }

    fn frame(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    /// Pushes, then resumes until the framer has nothing left to do.
    fn feed(f: &mut Framer, data: Bytes) -> (Option<Bytes>, Option<Refusal>) {
        let mut step = f.push(data);
        let mut out = bytes::BytesMut::new();
        loop {
            if let Some(o) = step.out.take() {
                out.extend_from_slice(&o);
            }
            if step.refusal.is_some() || step.more == More::No {
                return ((!out.is_empty()).then(|| out.freeze()), step.refusal);
            }
            if let More::At(t) = step.more {
                std::thread::sleep(t.saturating_duration_since(std::time::Instant::now()));
            }
            step = f.resume();
        }
    }

    fn framer(gzip: bool) -> Framer {
        let check = ProtoCheck {
            message: Arc::new(wire::Compiled::new(&msg_type())),
            strict: true,
        };
        Framer::new(check, 1 << 16, gzip)
    }

    #[test]
    fn valid_messages_pass_byte_for_byte_however_the_stream_is_cut() {
        let mut stream = frame(0, b"\x0a\x02hi");
        stream.extend(frame(1, &gzip(b"\x0a\x03abc")));
        stream.extend(frame(0, b""));
        for cut in 0..=stream.len() {
            let mut f = framer(true);
            let mut out = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                let (o, r) = feed(&mut f, Bytes::copy_from_slice(part));
                assert_eq!(r, None, "cut at {cut}");
                out.extend(o.unwrap_or_default());
            }
            assert_eq!(out, stream, "cut at {cut}");
            assert!(!f.unfinished());
        }
    }

    #[test]
    fn a_bad_message_stops_the_stream_after_the_good_ones() {
        let mut stream = frame(0, b"\x0a\x02hi");
        let good = stream.len();
        stream.extend(frame(0, b"\x0a\x02\xff\xfe"));
        stream.extend(frame(0, b"\x0a\x02ok"));
        let (o, r) = feed(&mut framer(false), Bytes::copy_from_slice(&stream));
        assert_eq!(o.unwrap().len(), good);
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("t.M.s (field 1)")));
        // strict: an unknown field
        let (_, r) = feed(
            &mut framer(false),
            Bytes::copy_from_slice(&frame(0, b"\x10\x01")),
        );
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("unknown field number 2")));
    }

    #[test]
    fn compression_is_bounded_and_must_be_declared() {
        // 1 MiB of one letter: about 1 KiB gzipped, 16 times the limit once inflated
        let mut big = b"\x0a\x80\x80\x40".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1 << 20));
        let bomb = gzip(&big);
        assert!(bomb.len() < 4096);
        let (o, r) = feed(&mut framer(true), Bytes::copy_from_slice(&frame(1, &bomb)));
        assert!(o.is_none());
        assert!(matches!(r, Some(Refusal::TooLarge(n)) if n > 1 << 16));
        let (_, r) = feed(
            &mut framer(false),
            Bytes::copy_from_slice(&frame(1, &gzip(b""))),
        );
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("not gzip")));
        let (_, r) = feed(
            &mut framer(true),
            Bytes::copy_from_slice(&frame(1, b"not gzip at all")),
        );
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("decompress")));
        let (_, r) = feed(&mut framer(true), Bytes::copy_from_slice(&frame(2, b"")));
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("flag 2")));
        // a prefix over the limit is refused before its bytes arrive
        let (_, r) = feed(
            &mut framer(true),
            Bytes::copy_from_slice(&[0, 0x40, 0, 0, 0]),
        );
        assert_eq!(r, Some(Refusal::TooLarge(1 << 30)));
    }

    #[test]
    fn a_bomb_is_inflated_a_slice_a_turn_within_the_worker_share() {
        // 4 MiB of one letter in field 1, about 4 KiB gzipped
        let mut big = b"\x0a\x80\x80\x80\x02".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4 << 20));
        let bomb = frame(1, &gzip(&big));
        let check = ProtoCheck {
            message: Arc::new(wire::Compiled::new(&msg_type())),
            strict: true,
        };
        let mut turns = 0;
        let mut waited = false;
        let mut f = Framer::new(check, 8 << 20, true);
        for _ in 0..400 {
            let mut step = f.push(Bytes::copy_from_slice(&bomb));
            loop {
                assert_eq!(step.refusal, None);
                match step.more {
                    More::No => break,
                    More::Now => turns += 1,
                    More::At(t) => {
                        waited = true;
                        std::thread::sleep(t.saturating_duration_since(std::time::Instant::now()));
                    }
                }
                step = f.resume();
            }
            if waited {
                break;
            }
        }
        assert!(
            turns >= 16,
            "a 4 MiB message is inflated in 256 KiB turns: {turns}"
        );
        assert!(
            waited,
            "past half of a window, the worker's share waits for the next"
        );
    }

    #[test]
    fn formats() {
        let f = vec!["application/json".to_owned()];
        let m = |v| crate::request::parse_media_type(v).unwrap();
        assert!(format_accepted(&f, m("application/json; charset=utf-8")));
        assert!(format_accepted(&f, m("Application/JSON")));
        assert!(!format_accepted(&f, m("text/plain")));
        assert!(format_accepted(&[], m("anything/at-all")));
    }
}
