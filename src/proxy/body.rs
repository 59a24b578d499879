//! The response body on its way back: passes frames through untouched, and when the
//! exchange ends (or the caller goes away) records its outcome once — metrics, the
//! endpoint's outstanding count, and the HTTP/1.1 connection's return to its pool.

use crate::telemetry::ServiceMetrics;
use crate::upstream::{H1Return, Outstanding};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The outcome of one request, recorded when dropped.
pub struct Finish {
    pub metrics: Arc<ServiceMetrics>,
    pub streams: Gauge,
    pub start: Instant,
    /// `Some` for gRPC calls: the status seen so far (from headers or trailers).
    pub grpc_status: Option<String>,
    pub http_status: u16,
    pub outstanding: Option<Outstanding>,
    pub h1: Option<H1Return>,
    /// Keeps the connection from counting as idle until the answer is done.
    pub busy: Option<crate::listen::Busy>,
    /// For gRPC: the request's schema guard; a message it refused mid-stream ends the
    /// answer with INVALID_ARGUMENT instead of a reset.
    pub tripped: Option<Arc<crate::schema::Tripped>>,
    /// With `[node] access_log`: what the access log line says, and the service name.
    pub access: Option<(Box<AccessEntry>, String)>,
}

/// The request side of an access log line.
pub struct AccessEntry {
    pub remote: std::net::SocketAddr,
    pub identity: http::HeaderValue,
    pub method: http::Method,
    pub path: String,
    pub request_id: http::HeaderValue,
    pub listener: Arc<str>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.metrics
            .count(self.http_status, self.grpc_status.as_deref());
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
        self.streams.dec();
        if let Some((a, service)) = &self.access {
            tracing::info!(
                target: "fedport::access",
                listener = &*a.listener,
                remote = %a.remote,
                identity = a.identity.to_str().unwrap_or("?"),
                method = %a.method,
                path = %a.path,
                service = %service,
                status = self.http_status,
                grpc_status = self.grpc_status.as_deref().unwrap_or(""),
                duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
                request_id = a.request_id.to_str().unwrap_or("-"),
                "access"
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that records its [`Finish`] when done.
    pub struct Tracked {
        #[pin]
        inner: Incoming,
        finish: Option<Finish>,
        ended: bool,
    }
}

impl Tracked {
    pub fn new(inner: Incoming, finish: Finish) -> Self {
        Self {
            inner,
            finish: Some(finish),
            ended: false,
        }
    }
}

/// The schema error of a gRPC call whose request guard refused a message.
fn refused(finish: &Option<Finish>) -> Option<String> {
    finish
        .as_ref()
        .and_then(|f| f.tripped.as_ref())
        .and_then(|t| t.schema_error())
}

fn refusal_trailers(e: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", http::HeaderValue::from_static("3"));
    let msg =
        crate::errors::percent_encode_grpc_message(&format!("message refused by its schema: {e}"));
    if let Ok(v) = http::HeaderValue::from_str(&msg) {
        t.insert("grpc-message", v);
    }
    t
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame)))
                if frame.is_trailers() && refused(this.finish).is_some() =>
            {
                // the service answered what it was given; the caller's call still failed
                let e = refused(this.finish).unwrap_or_default();
                if let Some(f) = this.finish.as_mut() {
                    f.grpc_status = Some("3".into());
                }
                this.finish.take();
                *this.ended = true;
                return Poll::Ready(Some(Ok(Frame::trailers(refusal_trailers(&e)))));
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(t), Some(f)) = (frame.trailers_ref(), this.finish.as_mut()) {
                    if f.grpc_status.is_some() {
                        f.grpc_status = Some(
                            t.get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned(),
                        );
                    }
                }
            }
            Poll::Ready(None) => {
                this.finish.take();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(e) = refused(this.finish) {
                    let t = refusal_trailers(&e);
                    if let Some(f) = this.finish.as_mut() {
                        f.grpc_status = Some("3".into());
                    }
                    this.finish.take();
                    *this.ended = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                if let Some(f) = this.finish.as_mut() {
                    if f.grpc_status.is_some() {
                        f.grpc_status = Some("14".into());
                    }
                    f.h1 = None;
                }
                this.finish.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
