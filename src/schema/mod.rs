//! What a service accepts: content types (`formats`) and message size
//! (`max_message_bytes`), enforced as the body streams — on each gRPC message's length
//! prefix, or on an HTTP body's bytes — never by buffering it first.

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
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

/// The media type of a `content-type` value, lower-cased, without parameters.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a content type is one the service accepts. An empty list accepts anything.
pub fn format_accepted(formats: &[String], content_type: &str) -> bool {
    formats.is_empty() || {
        let e = essence(content_type);
        formats.iter().any(|f| f.eq_ignore_ascii_case(&e))
    }
}

/// Set by a [`Guarded`] body when it refuses what it carries: the size that was over
/// the limit (0 while nothing was refused).
#[derive(Debug, Default)]
pub struct Tripped(AtomicU64, std::sync::Mutex<Option<String>>);

impl Tripped {
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

    fn set_schema_error(&self, e: String) {
        if let Ok(mut s) = self.1.lock() {
            s.get_or_insert(e);
        }
    }
}

/// What a gRPC request's messages are checked against.
#[derive(Debug, Clone)]
pub struct ProtoCheck {
    pub input: prost_reflect::MessageDescriptor,
    pub strict: bool,
}

impl ProtoCheck {
    /// Decodes one message (without its 5-byte prefix); the problem, naming the field.
    pub fn check(&self, msg: &[u8]) -> Result<(), String> {
        let m = prost_reflect::DynamicMessage::decode(self.input.clone(), msg)
            .map_err(|e| self.locate(msg, e.to_string()))?;
        if self.strict {
            if let Some(u) = m.unknown_fields().next() {
                return Err(format!(
                    "{}: unknown field number {} (strict schema)",
                    self.input.full_name(),
                    u.number()
                ));
            }
        }
        Ok(())
    }
}

impl ProtoCheck {
    /// Names the top-level field a decode error comes from: each field's bytes are
    /// decoded alone until one fails.
    fn locate(&self, msg: &[u8], error: String) -> String {
        let mut at = 0;
        while at < msg.len() {
            let start = at;
            let Some((key, n)) = varint(&msg[at..]) else {
                break;
            };
            at += n;
            let len = match key & 7 {
                0 => varint(&msg[at..]).map(|(_, n)| n),
                1 => Some(8),
                5 => Some(4),
                2 => varint(&msg[at..]).map(|(l, n)| n + l as usize),
                _ => None,
            };
            let Some(len) = len.filter(|l| at + l <= msg.len()) else {
                return self.describe(key >> 3, "truncated or malformed field", error);
            };
            at += len;
            if let Err(e) =
                prost_reflect::DynamicMessage::decode(self.input.clone(), &msg[start..at])
            {
                return self.describe(key >> 3, &e.to_string(), error);
            }
        }
        error
    }

    fn describe(&self, number: u64, problem: &str, fallback: String) -> String {
        match self.input.get_field(number as u32) {
            Some(f) => format!(
                "{}.{} (field {number}): {problem}",
                self.input.full_name(),
                f.name()
            ),
            None if number > 0 => format!("{} field {number}: {problem}", self.input.full_name()),
            None => fallback,
        }
    }
}

/// A protobuf varint and its length in bytes.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
#[error("message refused by its schema: {0}")]
pub struct SchemaViolation(pub String);

#[derive(Debug, thiserror::Error)]
#[error("message of {0} bytes is over the service's limit")]
pub struct TooLarge(pub u64);

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
        inner: Incoming,
        limit: Limit,
        seen: u64,
        // gRPC framing state: bytes of the current message still to pass, and a
        // partial prefix carried across frames
        remaining: u64,
        prefix: Vec<u8>,
        tripped: Arc<Tripped>,
        // with a proto schema: whole messages are held until they validate
        proto: Option<ProtoCheck>,
        pending: bytes::BytesMut,
        forwarded: bool,
    }
}

impl Guarded {
    pub fn new(
        inner: Incoming,
        limit: Limit,
        tripped: Arc<Tripped>,
        proto: Option<ProtoCheck>,
    ) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            remaining: 0,
            prefix: Vec::with_capacity(5),
            tripped,
            proto,
            pending: bytes::BytesMut::new(),
            forwarded: false,
        }
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
        if let Some(check) = this.proto.as_ref() {
            let max = match *this.limit {
                Limit::GrpcMessage(m) => m,
                Limit::Body(m) => m,
            };
            loop {
                // After a refused message: if valid ones already went, end the stream
                // cleanly so the service handles them (the caller still gets
                // INVALID_ARGUMENT in place of its status); if none did, reset.
                if let Some(e) = this.tripped.schema_error() {
                    if *this.forwarded {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Box::new(SchemaViolation(e)))));
                }
                let frame = match this.inner.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => f,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(None) if this.pending.is_empty() => return Poll::Ready(None),
                    Poll::Ready(None) => {
                        let e = "the stream ended inside a message (truncated)".to_owned();
                        this.tripped.set_schema_error(e.clone());
                        return Poll::Ready(Some(Err(Box::new(SchemaViolation(e)))));
                    }
                    Poll::Pending => return Poll::Pending,
                };
                let data = match frame.into_data() {
                    Ok(d) => d,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                };
                this.pending.extend_from_slice(&data);
                let mut out = bytes::BytesMut::new();
                while this.pending.len() >= 5 {
                    let p = &this.pending[..5];
                    let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as u64;
                    if len > max {
                        this.tripped.0.store(len, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(TooLarge(len)))));
                    }
                    if (this.pending.len() as u64) < 5 + len {
                        break;
                    }
                    let msg = this.pending.split_to(5 + len as usize);
                    let verdict = if msg[0] != 0 {
                        Err(
                            "a compressed message cannot be validated; send it uncompressed"
                                .to_owned(),
                        )
                    } else {
                        check.check(&msg[5..])
                    };
                    if let Err(e) = verdict {
                        // what was already validated still goes; nothing after it does
                        this.tripped.set_schema_error(e.clone());
                        this.pending.clear();
                        if !out.is_empty() {
                            *this.forwarded = true;
                            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                        }
                        if *this.forwarded {
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Err(Box::new(SchemaViolation(e)))));
                    }
                    out.extend_from_slice(&msg);
                }
                if !out.is_empty() {
                    *this.forwarded = true;
                    return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
                }
            }
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
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
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

    #[test]
    fn formats() {
        let f = vec!["application/json".to_owned()];
        assert!(format_accepted(&f, "application/json; charset=utf-8"));
        assert!(format_accepted(&f, "Application/JSON"));
        assert!(!format_accepted(&f, "text/plain"));
        assert!(format_accepted(&[], "anything/at-all"));
    }
}
