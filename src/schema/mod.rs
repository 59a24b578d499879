//! What a service accepts: content types (`formats`) and message size
//! (`max_message_bytes`), enforced as the body streams — on each gRPC message's length
//! prefix, or on an HTTP body's bytes — never by buffering it first.

pub mod wire;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most a body validated against a JSON Schema may be when the service sets no
/// `max_message_bytes` (it is buffered whole to be validated).
pub const DEFAULT_JSON_LIMIT: u64 = 1 << 20;

/// At most this many violations are reported for one body.
const MAX_VIOLATIONS: usize = 10;

/// Parses a body as JSON and validates it against the route's schema; every violation
/// (up to a cap) with its JSON pointer and keyword. serde_json refuses nesting deeper
/// than 128 levels before it can exhaust the stack.
pub fn validate_json(
    route: &crate::config::JsonRoute,
    body: &[u8],
) -> Result<(), Vec<crate::errors::Violation>> {
    use crate::errors::Violation;
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        vec![Violation {
            path: String::new(),
            keyword: "json".into(),
            message: format!("not JSON: {e}"),
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

/// Set by a [`Guarded`] body when it refuses what it carries: the size that was over
/// the limit (0 while nothing was refused).
#[derive(Debug, Default)]
pub struct Tripped(
    AtomicU64,
    std::sync::Mutex<Option<String>>,
    /// body bytes that went through
    AtomicU64,
    /// the caller's own body failed (its stream was reset or its connection lost)
    std::sync::atomic::AtomicBool,
);

impl Tripped {
    /// Whether the caller's body failed while it was passed on: a failed exchange is
    /// then the caller's doing, not the service's.
    pub fn caller_failed(&self) -> bool {
        self.3.load(Ordering::Relaxed)
    }

    fn fail(&self) {
        self.3.store(true, Ordering::Relaxed);
    }

    /// Body bytes the guard let through.
    pub fn bytes(&self) -> u64 {
        self.2.load(Ordering::Relaxed)
    }

    fn count(&self, n: usize) {
        self.2.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Why a gRPC message was refused by its schema, if one was.
    pub fn schema_error(&self) -> Option<String> {
        self.1.lock().ok().and_then(|s| s.clone())
    }

    /// The refusal as a gRPC status and message, if the guard refused anything.
    pub fn grpc_refusal(&self) -> Option<(&'static str, String)> {
        if let Some(n) = self.get() {
            return Some((
                "8",
                format!("message of {n} bytes is over the service's limit"),
            ));
        }
        self.schema_error()
            .map(|e| ("3", format!("message refused by its schema: {e}")))
    }

    fn set_schema_error(&self, e: String) {
        if let Ok(mut s) = self.1.lock() {
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

/// Why a gRPC message was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Its length prefix, or its decompressed size, passes the limit.
    TooLarge(u64),
    /// It does not decode as its type (or is compressed in a way that cannot be read).
    Invalid(String),
}

/// Follows a gRPC stream's framing, holding each message until it is whole, then
/// decompresses it (gzip, up to the limit) and checks it against its type. Valid
/// messages leave byte for byte as they came; nothing after a refused one does.
#[derive(Debug)]
pub struct Framer {
    check: ProtoCheck,
    max: u64,
    /// The stream's `grpc-encoding` is gzip.
    gzip: bool,
    pending: bytes::BytesMut,
}

impl Framer {
    pub fn new(check: ProtoCheck, max: u64, gzip: bool) -> Self {
        Self {
            check,
            max,
            gzip,
            pending: bytes::BytesMut::new(),
        }
    }

    /// Takes the next bytes of the stream; returns the whole, valid messages now ready
    /// to go on, and the refusal that stopped the stream, if one did. A length prefix
    /// over the limit is refused before any of its message is held.
    pub fn push(&mut self, data: Bytes) -> (Option<Bytes>, Option<Refusal>) {
        if self.pending.is_empty() {
            // the usual case, whole messages in one frame: checked where they lie and
            // passed on without a copy; only an unfinished tail is held
            let (ready, refusal) = self.scan(&data);
            if refusal.is_none() {
                self.pending.extend_from_slice(&data[ready..]);
            }
            return ((ready > 0).then(|| data.slice(..ready)), refusal);
        }
        self.pending.extend_from_slice(&data);
        let pending = std::mem::take(&mut self.pending);
        let (ready, refusal) = self.scan(&pending);
        self.pending = pending;
        let out = (ready > 0).then(|| self.pending.split_to(ready).freeze());
        if refusal.is_some() {
            self.pending.clear();
        }
        (out, refusal)
    }

    /// Walks whole messages from the start of `b`: how many bytes of them are valid,
    /// and the refusal that stopped the walk, if one did.
    fn scan(&self, b: &[u8]) -> (usize, Option<Refusal>) {
        let mut ready = 0;
        while b.len() - ready >= 5 {
            let p = &b[ready..ready + 5];
            let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as u64;
            if len > self.max {
                return (ready, Some(Refusal::TooLarge(len)));
            }
            let end = ready + 5 + len as usize;
            if b.len() < end {
                break;
            }
            if let Err(r) = self.verdict(b[ready], &b[ready + 5..end]) {
                return (ready, Some(r));
            }
            ready = end;
        }
        (ready, None)
    }

    /// Bytes of an unfinished message are left: the stream ended inside it.
    pub fn unfinished(&self) -> bool {
        !self.pending.is_empty()
    }

    fn verdict(&self, flag: u8, msg: &[u8]) -> Result<(), Refusal> {
        match flag {
            0 => self.check.check(msg).map_err(Refusal::Invalid),
            1 if self.gzip => {
                use std::io::Read;
                let mut plain = Vec::new();
                flate2::read::MultiGzDecoder::new(msg)
                    .take(self.max + 1)
                    .read_to_end(&mut plain)
                    .map_err(|e| {
                        Refusal::Invalid(format!("gzip message does not decompress: {e}"))
                    })?;
                if plain.len() as u64 > self.max {
                    return Err(Refusal::TooLarge(plain.len() as u64));
                }
                self.check.check(&plain).map_err(Refusal::Invalid)
            }
            1 => Err(Refusal::Invalid(
                "message is marked compressed but the call's grpc-encoding is not gzip".into(),
            )),
            f => Err(Refusal::Invalid(format!(
                "message flag {f} is neither 0 (plain) nor 1 (compressed)"
            ))),
        }
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
        inner: crate::proxy::caller::CallerBody,
        limit: Limit,
        seen: u64,
        // gRPC framing state: bytes of the current message still to pass, and a
        // partial prefix carried across frames
        remaining: u64,
        prefix: Vec<u8>,
        tripped: Arc<Tripped>,
        // with a proto schema: whole messages are held until they validate
        framer: Option<Framer>,
        forwarded: bool,
        // frames read ahead (by take_if_whole) and given back first
        held: std::collections::VecDeque<Frame<Bytes>>,
    }
}

impl Guarded {
    pub fn new(
        inner: crate::proxy::caller::CallerBody,
        limit: Limit,
        tripped: Arc<Tripped>,
        framer: Option<Framer>,
    ) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            remaining: 0,
            prefix: Vec::with_capacity(5),
            tripped,
            framer,
            forwarded: false,
            held: std::collections::VecDeque::new(),
        }
    }

    /// Takes the body if all of it has already arrived — as a unary call's or a GET's
    /// usually has by the time its head is read — so that it can be sent again:
    /// `Ok(Some(bytes))`. Never waits: `Ok(None)` when more is still to come or it is
    /// over 64 KiB (what was read is given back first). `Err` when the guard refused it.
    pub fn take_if_whole(&mut self) -> Result<Option<Bytes>, Refused> {
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if let Some(f) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(framer) = this.framer.as_mut() {
            loop {
                // After a refused message: if valid ones already went, end the stream
                // cleanly so the service handles them (the caller still gets the
                // refusal in place of the service's status); if none did, reset.
                if let Some(n) = this.tripped.get() {
                    if *this.forwarded {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Box::new(TooLarge(n)))));
                }
                if let Some(e) = this.tripped.schema_error() {
                    if *this.forwarded {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Box::new(SchemaViolation(e)))));
                }
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
                let data = match frame.into_data() {
                    Ok(d) => d,
                    Err(other) => return Poll::Ready(Some(Ok(without_fed(other)))),
                };
                let (out, refusal) = framer.push(data);
                match refusal {
                    Some(Refusal::TooLarge(n)) => this.tripped.0.store(n.max(1), Ordering::Relaxed),
                    Some(Refusal::Invalid(e)) => this.tripped.set_schema_error(e),
                    None => {}
                }
                if let Some(out) = out {
                    *this.forwarded = true;
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
                this.tripped.0.store(n.max(1), Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(TooLarge(n)))));
            }
        }
        Poll::Ready(Some(Ok(without_fed(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Request trailers lose the headers only fedport sets, as the request's headers do: a
/// caller cannot pass a `fed-peer` or an `x-forwarded-for` at the end of its body.
fn without_fed(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut t) => {
            crate::proxy::headers::strip_claims(&mut t);
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
                let (o, r) = f.push(Bytes::copy_from_slice(part));
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
        let (o, r) = framer(false).push(Bytes::copy_from_slice(&stream));
        assert_eq!(o.unwrap().len(), good);
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("t.M.s (field 1)")));
        // strict: an unknown field
        let (_, r) = framer(false).push(Bytes::copy_from_slice(&frame(0, b"\x10\x01")));
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("unknown field number 2")));
    }

    #[test]
    fn compression_is_bounded_and_must_be_declared() {
        // 1 MiB of one letter: about 1 KiB gzipped, 16 times the limit once inflated
        let mut big = b"\x0a\x80\x80\x40".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1 << 20));
        let bomb = gzip(&big);
        assert!(bomb.len() < 4096);
        let (o, r) = framer(true).push(Bytes::copy_from_slice(&frame(1, &bomb)));
        assert!(o.is_none());
        assert!(matches!(r, Some(Refusal::TooLarge(n)) if n > 1 << 16));
        let (_, r) = framer(false).push(Bytes::copy_from_slice(&frame(1, &gzip(b""))));
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("not gzip")));
        let (_, r) = framer(true).push(Bytes::copy_from_slice(&frame(1, b"not gzip at all")));
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("decompress")));
        let (_, r) = framer(true).push(Bytes::copy_from_slice(&frame(2, b"")));
        assert!(matches!(r, Some(Refusal::Invalid(e)) if e.contains("flag 2")));
        // a prefix over the limit is refused before its bytes arrive
        let (_, r) = framer(true).push(Bytes::copy_from_slice(&[0, 0x40, 0, 0, 0]));
        assert_eq!(r, Some(Refusal::TooLarge(1 << 30)));
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
