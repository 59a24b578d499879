//! The response body on its way back: passes frames through untouched, and when the
//! exchange ends (or the caller goes away) records its outcome once — metrics, the
//! endpoint's outstanding count, and the HTTP/1.1 connection's return to its pool.

use crate::errors::grpc_trailers;
use crate::errors::GRPC_STATUS;
use crate::reason::{GrpcCode, GrpcStatus, Reason};
use crate::telemetry::ServiceMetrics;
use crate::upstream::{H1Return, Outstanding};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// The outcome of one request, recorded when dropped.
pub struct Finish {
    pub metrics: Arc<ServiceMetrics>,
    pub streams: Gauge,
    pub start: Instant,
    /// `Some` for gRPC calls: the status seen so far (from headers or trailers).
    pub grpc_status: Option<GrpcStatus>,
    pub http_status: u16,
    pub outstanding: Option<Outstanding>,
    pub h1: Option<H1Return>,
    /// Keeps the connection from counting as idle until the answer is done.
    pub busy: Option<super::activity::Busy>,
    /// For gRPC: the request's schema guard; a message it refused mid-stream ends the
    /// answer with INVALID_ARGUMENT instead of a reset.
    pub tripped: Option<Arc<crate::schema::Tripped>>,
    /// The schema method or JSON Schema route the request matched (a metric label).
    pub method: Option<Arc<str>>,
    /// With `validate_responses`: the answer's messages, checked as they stream.
    pub response_check: Option<Box<crate::schema::Framer>>,
    /// Why a response message was refused, until the answer ends with it.
    pub response_refusal: Option<String>,
    /// With `[node] access_log`: what the access log line says, and the service name.
    pub access: Option<(Box<AccessEntry>, String)>,
    /// Request body bytes, counted by the request's guard.
    pub request_bytes: Option<Arc<crate::schema::Tripped>>,
    pub response_bytes: u64,
    /// Where the request went: the endpoint's URL or the peer's name.
    pub target: Option<Arc<str>>,
    /// Why fedport refused it, if it did.
    pub reason: Option<Reason>,
    /// Its place under concurrency limits, released when the answer ends.
    pub admit: Option<crate::limits::Admit>,
    /// Its header list against the memory budgets, given back when the answer ends.
    pub held: Option<crate::memory::Held>,
    /// `[node] request_metrics`: record the request's metrics.
    pub record: bool,
    /// A sampled trace: this hop's span, with the service's name and the caller.
    pub span: Option<Box<(crate::telemetry::otlp::Started, String, http::HeaderValue)>>,
    /// For traffic-spike detection: the service's and the calling peer's counts.
    pub traffic: Option<(Arc<crate::telemetry::spike::Traffic>, usize, Option<usize>)>,
}

impl Finish {
    /// Whether the outcome counts as an error for spike detection: a 5xx, a gRPC status
    /// that means the system failed, or any refusal of fedport's own.
    fn is_error(&self) -> bool {
        if self.reason.is_some() || self.http_status >= 500 {
            return true;
        }
        use GrpcCode::*;
        matches!(
            self.grpc_status,
            Some(GrpcStatus::Code(
                Unknown | DeadlineExceeded | ResourceExhausted | Internal | Unavailable | DataLoss
            ))
        )
    }
}

/// The request side of an access log line.
pub struct AccessEntry {
    pub remote: std::net::SocketAddr,
    pub identity: http::HeaderValue,
    pub method: http::Method,
    pub path: String,
    pub request_id: http::HeaderValue,
    pub listener: Arc<str>,
    /// What routing reads, for `plan --replay`: the authority named (`:authority`, else
    /// `Host`), `fed-service`, and the content type (every field, joined with ", ").
    pub authority: String,
    pub fed_service: String,
    pub content_type: String,
    /// The W3C trace id, or empty.
    pub trace_id: String,
    /// No rule allows the call; audit mode served it.
    pub would_deny: bool,
    /// `access_log_file`'s writer: the line goes there instead of the log.
    pub file: Option<Arc<crate::telemetry::accesslog::AccessFile>>,
}

/// Counts a stream as active from its first moment: until dropped, or until the
/// request's [`Finish`] takes the count over. A request the caller resets while it is
/// still being routed or sent is dropped here, and leaves the gauge as it found it.
pub struct OpenStream(Option<Gauge>);

impl OpenStream {
    pub fn new(streams: &Gauge) -> Self {
        streams.inc();
        Self(Some(streams.clone()))
    }

    /// The request's [`Finish`] (which decrements on its drop) has it from here.
    pub fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.dec();
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let bytes_in = self.request_bytes.as_ref().map_or(0, |t| t.bytes());
        if self.record {
            self.metrics
                .count(self.http_status, self.grpc_status, self.method.as_ref());
            self.metrics.duration.observe(elapsed);
            self.metrics.request_bytes.inc_by(bytes_in);
            self.metrics.response_bytes.inc_by(self.response_bytes);
        }
        self.streams.dec();
        if let Some((traffic, service, peer)) = &self.traffic {
            traffic.record(*service, *peer, self.is_error());
        }
        if let Some((span, service, identity)) = self.span.take().map(|b| *b) {
            let mut attrs = vec![
                ("fedport.service", service.clone()),
                (
                    "fedport.caller",
                    identity.to_str().unwrap_or("?").to_owned(),
                ),
                ("http.response.status_code", self.http_status.to_string()),
            ];
            if let Some(m) = &self.method {
                attrs.push(("rpc.method", m.to_string()));
            }
            if let Some(g) = self.grpc_status {
                attrs.push(("rpc.grpc.status_code", g.number().to_owned()));
            }
            if let Some(r) = self.reason {
                attrs.push(("fedport.reason", r.as_str().to_owned()));
            }
            if let Some(t) = &self.target {
                attrs.push(("fedport.upstream", t.to_string()));
            }
            span.finish(format!("fedport {service}"), self.is_error(), attrs);
        }
        if let Some((a, service)) = &self.access {
            if let Some(file) = &a.file {
                use serde_json::Value as V;
                let fields: serde_json::Map<String, V> = [
                    ("message", V::from("access")),
                    ("listener", V::from(&*a.listener)),
                    ("remote", V::from(a.remote.to_string())),
                    ("identity", V::from(a.identity.to_str().unwrap_or("?"))),
                    ("method", V::from(a.method.as_str())),
                    ("path", V::from(a.path.as_str())),
                    // as the caller sent them, quoted as the JSON log writes them
                    ("authority", V::from(format!("{:?}", a.authority))),
                    ("fed_service", V::from(format!("{:?}", a.fed_service))),
                    ("content_type", V::from(format!("{:?}", a.content_type))),
                    ("service", V::from(service.as_str())),
                    ("rpc", V::from(self.method.as_deref().unwrap_or(""))),
                    ("status", V::from(self.http_status)),
                    (
                        "grpc_status",
                        V::from(self.grpc_status.map_or("", GrpcStatus::number)),
                    ),
                    ("reason", V::from(self.reason.map_or("", Reason::as_str))),
                    ("bytes_in", V::from(bytes_in)),
                    ("bytes_out", V::from(self.response_bytes)),
                    ("duration_ms", V::from(elapsed * 1000.0)),
                    ("upstream", V::from(self.target.as_deref().unwrap_or(""))),
                    ("request_id", V::from(a.request_id.to_str().unwrap_or("-"))),
                    ("trace_id", V::from(a.trace_id.as_str())),
                    ("would_deny", V::from(a.would_deny)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                file.write(crate::telemetry::accesslog::line(fields));
                return;
            }
            tracing::info!(
                target: "fedport::access",
                listener = &*a.listener,
                remote = %a.remote,
                identity = a.identity.to_str().unwrap_or("?"),
                method = %a.method,
                path = %a.path,
                // as the caller sent them, before hygiene: quoted, so that a text log
                // line cannot be given fields of the caller's making
                authority = ?a.authority,
                fed_service = ?a.fed_service,
                content_type = ?a.content_type,
                service = %service,
                rpc = self.method.as_deref().unwrap_or(""),
                status = self.http_status,
                grpc_status = self.grpc_status.map_or("", GrpcStatus::number),
                reason = self.reason.map_or("", Reason::as_str),
                bytes_in,
                bytes_out = self.response_bytes,
                duration_ms = elapsed * 1000.0,
                upstream = self.target.as_deref().unwrap_or(""),
                request_id = a.request_id.to_str().unwrap_or("-"),
                trace_id = %a.trace_id,
                would_deny = a.would_deny,
                "access"
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that records its [`Finish`] when done.
    ///
    /// An HTTP/2 service that resets its stream with NO_ERROR in the middle of an
    /// answer ends hyper's body as if it were complete. When the answer declared its
    /// length, the bytes still owed give it away: the caller's stream is then reset
    /// (or its HTTP/1.1 connection closed) rather than ended as if whole.
    pub struct Tracked {
        #[pin]
        inner: Incoming,
        finish: Option<Finish>,
        ended: bool,
        owes_length: bool,
        // the worker's inflation share is spent until then
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl Tracked {
    /// `owes_length`: a declared content-length must be delivered (not a HEAD answer,
    /// a 204 or a 304).
    pub fn new(inner: Incoming, finish: Finish, owes_length: bool) -> Self {
        Self {
            inner,
            finish: Some(finish),
            ended: false,
            owes_length,
            wait: None,
        }
    }
}

/// Bytes an answer declared and has not delivered yet.
fn owed(inner: &Incoming) -> u64 {
    inner.size_hint().exact().unwrap_or(0)
}

/// What a step of the answer's checks gives: a frame to pass on, or a turn to yield,
/// or `None` to go on reading.
fn response_step(
    f: &mut Finish,
    step: crate::schema::Step,
    wait: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Option<Polled> {
    if let Some(r) = step.refusal {
        f.response_refusal = Some(match r {
            crate::schema::Refusal::TooLarge(n) => {
                format!("message of {n} bytes is over the service's limit")
            }
            crate::schema::Refusal::Invalid(e) => e,
            crate::schema::Refusal::Memory(over) => {
                format!("a message could not be held for validation: it would pass {over}")
            }
        });
    }
    match step.more {
        crate::schema::More::No => {}
        crate::schema::More::Now if step.out.is_none() => {
            cx.waker().wake_by_ref();
            return Some(Poll::Pending);
        }
        crate::schema::More::Now => {}
        crate::schema::More::At(t) => *wait = Some(Box::pin(tokio::time::sleep_until(t.into()))),
    }
    let out = step.out?;
    f.response_bytes += out.len() as u64;
    Some(Poll::Ready(Some(Ok(Frame::data(out)))))
}

/// An answer the service stopped short of its declared length.
#[derive(Debug, thiserror::Error)]
#[error("the service ended its answer {owed} bytes short of its content-length")]
pub struct Truncated {
    owed: u64,
}

/// Records a failed answer: no gRPC success, the connection not reused, `reason` in
/// the access log.
fn failed(finish: &mut Option<Finish>, reason: Reason) {
    if let Some(mut f) = finish.take() {
        if f.grpc_status.is_some() {
            f.grpc_status = Some(GrpcStatus::Code(GrpcCode::Unavailable));
        }
        f.h1 = None;
        f.reason.get_or_insert(reason);
    }
}

/// The gRPC status of a call whose request guard refused a message.
fn refused(finish: &Option<Finish>) -> Option<crate::schema::GrpcRefusal> {
    finish
        .as_ref()
        .filter(|f| f.grpc_status.is_some())
        .and_then(|f| f.tripped.as_ref())
        .and_then(|t| t.grpc_refusal())
}

/// A gRPC call answered 200 whose status has not been seen, in the headers or in
/// trailers.
fn no_status(f: &Finish) -> bool {
    f.http_status == 200 && f.grpc_status == Some(GrpcStatus::Absent)
}

impl Tracked {
    /// Ends the answer with fedport's own status in place of the service's, records it,
    /// and counts the refused message by `reason`.
    fn end_with(
        finish: &mut Option<Finish>,
        ended: &mut bool,
        code: GrpcCode,
        message: &str,
        reason: Reason,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(mut f) = finish.take() {
            f.grpc_status = Some(GrpcStatus::Code(code));
            f.metrics
                .message_rejected(f.method.as_deref().unwrap_or("other"), reason);
            // a refusal like any other: counted by reason, in the access log, an error
            f.metrics.rejected_late(reason);
            f.reason.get_or_insert(reason);
        }
        *ended = true;
        Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(code, message)))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a body's `poll_frame` returns.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if *this.ended {
                return Poll::Ready(None);
            }
            // a response message refused after the valid ones before it went out
            if let Some(e) = this.finish.as_mut().and_then(|f| f.response_refusal.take()) {
                let msg = format!("response refused by its schema: {e}");
                return Tracked::end_with(
                    this.finish,
                    this.ended,
                    GrpcCode::Internal,
                    &msg,
                    Reason::ResponseSchema,
                );
            }
            // a response message being inflated goes on before more is read
            if let Some(f) = this
                .finish
                .as_mut()
                .filter(|f| f.response_check.as_ref().is_some_and(|c| c.busy()))
            {
                if let Some(w) = this.wait.as_mut() {
                    std::task::ready!(w.as_mut().poll(cx));
                    *this.wait = None;
                }
                let step = f.response_check.as_mut().expect("busy").resume();
                if let Some(p) = response_step(f, step, this.wait, cx) {
                    return p;
                }
                continue;
            }
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) if *this.owes_length && owed(&this.inner) > 0 => {
                    let owed = owed(&this.inner);
                    failed(this.finish, Reason::Truncated);
                    *this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(Truncated { owed }))));
                }
                Poll::Ready(None) => {
                    // a trailers-only answer to a call the request guard refused
                    if let Some(r) = refused(this.finish) {
                        return Tracked::end_with(
                            this.finish,
                            this.ended,
                            r.code,
                            &r.message,
                            r.reason,
                        );
                    }
                    // a call the service ended without a status is no success: say so
                    // (INTERNAL, as gRPC's own clients would) rather than leave the
                    // caller a stream that just stops
                    if let Some(mut f) = this.finish.take().filter(no_status) {
                        f.grpc_status = Some(GrpcStatus::Code(GrpcCode::Internal));
                        *this.ended = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(
                            GrpcCode::Internal,
                            "the service ended the call without a grpc-status",
                        )))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    // the request guard reset the exchange: answer with its refusal
                    if let Some(r) = refused(this.finish) {
                        return Tracked::end_with(
                            this.finish,
                            this.ended,
                            r.code,
                            &r.message,
                            r.reason,
                        );
                    }
                    failed(this.finish, Reason::UpstreamReset);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            // the service's answer is all read: its HTTP/1.1 socket goes back to the
            // pool now, not when a caller that stopped reading takes the last of it
            // (asked only of HTTP/1.1 answers: an HTTP/2 body's answer takes a lock)
            if let Some(f) = this.finish.as_mut().filter(|f| f.h1.is_some()) {
                if this.inner.is_end_stream() {
                    f.h1.take();
                }
            }
            if frame.is_trailers() {
                // the service answered what it was given; the caller's call still failed
                if let Some(r) = refused(this.finish) {
                    return Tracked::end_with(
                        this.finish,
                        this.ended,
                        r.code,
                        &r.message,
                        r.reason,
                    );
                }
                let truncated = this
                    .finish
                    .as_ref()
                    .and_then(|f| f.response_check.as_ref())
                    .is_some_and(|c| c.unfinished());
                if truncated {
                    let msg = "response refused by its schema: the stream ended inside a message (truncated)";
                    return Tracked::end_with(
                        this.finish,
                        this.ended,
                        GrpcCode::Internal,
                        msg,
                        Reason::ResponseSchema,
                    );
                }
                if let (Some(t), Some(f)) = (frame.trailers_ref(), this.finish.as_mut()) {
                    if f.grpc_status.is_some() {
                        f.grpc_status = Some(
                            t.get(GRPC_STATUS)
                                .map_or(GrpcStatus::Absent, |v| GrpcStatus::of(v.as_bytes())),
                        );
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            let Some(f) = this.finish.as_mut() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let Some(check) = f.response_check.as_mut() else {
                if let Some(d) = frame.data_ref() {
                    f.response_bytes += d.len() as u64;
                }
                return Poll::Ready(Some(Ok(frame)));
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let step = check.push(data);
            if let Some(p) = response_step(f, step, this.wait, cx) {
                return p;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.ended {
            return true;
        }
        // a refusal still to be sent as trailers: the body is not over, even when the
        // service's answer is
        let pending = refused(&self.finish).is_some()
            || self
                .finish
                .as_ref()
                .is_some_and(|f| f.response_refusal.is_some() || no_status(f));
        // bytes still owed: the next poll ends the answer with an error, not here
        let short = self.owes_length && owed(&self.inner) > 0;
        !pending && !short && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            return SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}
