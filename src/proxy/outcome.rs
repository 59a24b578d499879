//! Stage 8, outcome: what a request records from its first moment to its last. Begun
//! before anything is read (request id, trace span, access log sample, the stream
//! counted), and ended once: an upstream's answer passed on under a [`Finish`] that
//! records it when the body is done, or a refusal answered in the caller's protocol,
//! counted by reason and logged once.

use super::body::{self, Finish, Tracked};
use super::caller::CallerBody;
use super::dispatch::Forwarded;
use super::{request_id, ConnCtx, Kept, RespBody, Worker};
use crate::errors::Reject;
use crate::errors::{GRPC_ENCODING, GRPC_STATUS};
use crate::reason::GrpcStatus;
use crate::schema;
use crate::telemetry::trace;
use http::{HeaderValue, Request, Response};
use http_body_util::Either;
use std::sync::Arc;
use tokio::time::Instant;

/// What routing decided, kept for the request's metrics and log line.
#[derive(Default)]
pub(super) struct Routed {
    pub service: Option<usize>,
    /// The schema method (`pkg.S/M`) or JSON Schema route the request matched.
    pub method: Option<Arc<str>>,
    /// No rule allows it: served only because its service is in audit mode.
    pub would_deny: bool,
}

/// Every field of a name, joined with ", " as the access log records them.
fn joined(h: &http::HeaderMap, name: impl http::header::AsHeaderName) -> String {
    let all: Vec<&str> = h
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not UTF-8)"))
        .collect();
    all.join(", ")
}

/// A request's exchange, from its first moment until its answer is handed back.
pub(super) struct Exchange {
    /// When the request began: its deadline counts from here.
    pub start: Instant,
    /// The caller speaks gRPC, and is answered in it.
    pub grpc: bool,
    head: bool,
    pub rid: HeaderValue,
    span: Option<crate::telemetry::otlp::Started>,
    access: Option<Box<body::AccessEntry>>,
    open: body::OpenStream,
    busy: super::activity::Busy,
}

impl Exchange {
    pub fn begin(req: &mut Request<CallerBody>, conn: &ConnCtx, grpc: bool) -> Self {
        let w = &conn.worker;
        let rid = request_id(req.headers());
        // W3C trace context: the caller's trace goes on with a span of this hop
        let hop = trace::next_hop(req.headers_mut(), w.config.tracing.sample);
        let sample = w.config.node.access_log;
        let access = (sample >= 1.0 || (sample > 0.0 && fastrand::f64() < sample)).then(|| {
            Box::new(body::AccessEntry {
                remote: conn.remote,
                identity: conn.identity.clone(),
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                authority: {
                    // the one authority of HTTP/2, else every Host field
                    let h = req.headers();
                    match req.uri().authority() {
                        Some(a) => a.as_str().to_owned(),
                        None => joined(h, http::header::HOST),
                    }
                },
                fed_service: joined(req.headers(), "fed-service"),
                content_type: joined(req.headers(), http::header::CONTENT_TYPE),
                request_id: rid.clone(),
                listener: conn.listener.clone(),
                trace_id: hop.trace_id.clone(),
                file: w.access_file.clone(),
                would_deny: false,
            })
        });
        let span =
            w.spans
                .as_ref()
                .filter(|_| hop.sampled)
                .map(|s| crate::telemetry::otlp::Started {
                    hop,
                    start: std::time::SystemTime::now(),
                    spans: s.clone(),
                });
        let open = body::OpenStream::new(&conn.streams);
        if let Some(p) = conn.peer {
            w.peer_inbound[p].inc();
        }
        Self {
            start: Instant::now(),
            grpc,
            head: req.method() == http::Method::HEAD,
            rid,
            span,
            access,
            open,
            busy: conn.activity.begin(),
        }
    }

    /// The record of the request, kept until its answer is done.
    fn finish(self, conn: &ConnCtx, w: &Worker, routed: Routed) -> (Finish, super::activity::Busy) {
        self.open.hand_over();
        let name =
            |service: Option<usize>| service.map_or("-", |i| w.config.services[i].name.as_str());
        let service = routed.service;
        let f = Finish {
            admit: None,
            held: None,
            span: self
                .span
                .map(|s| Box::new((s, name(service).to_owned(), conn.identity.clone()))),
            record: w.config.node.request_metrics,
            request_bytes: None,
            response_bytes: 0,
            target: None,
            reason: None,
            traffic: service.map(|s| (w.traffic.clone(), s, conn.peer)),
            tripped: None,
            method: routed.method,
            response_check: None,
            response_refusal: None,
            access: self.access.map(|mut a| {
                a.would_deny = routed.would_deny;
                (a, name(service).to_owned())
            }),
            busy: None,
            metrics: w.service_metrics(conn.listener_idx, service),
            streams: conn.streams.clone(),
            start: self.start,
            grpc_status: self.grpc.then_some(GrpcStatus::Absent),
            http_status: 0,
            outstanding: None,
            h1: None,
        };
        (f, self.busy)
    }

    /// The service's answer, passed on under its record.
    pub fn answered(
        self,
        fwd: Forwarded,
        kept: Kept,
        conn: &ConnCtx,
        w: &Worker,
        routed: Routed,
    ) -> Response<RespBody> {
        let (grpc, head) = (self.grpc, self.head);
        let (mut f, busy) = self.finish(conn, w, routed);
        let (mut rparts, rbody) = fwd.resp.into_parts();
        super::strip_hop_by_hop(&mut rparts.headers);
        f.response_check = kept.response.map(|(check, max)| {
            let gzip = rparts
                .headers
                .get(GRPC_ENCODING)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
            Box::new(schema::Framer::new(check, max, gzip).within(conn.memory.clone()))
        });
        f.http_status = rparts.status.as_u16();
        if grpc {
            // a trailers-only answer carries the status in the headers
            if let Some(s) = rparts.headers.get(GRPC_STATUS) {
                f.grpc_status = Some(GrpcStatus::of(s.as_bytes()));
            }
        }
        f.outstanding = Some(fwd.outstanding);
        f.target = Some(fwd.target);
        f.admit = kept.admit;
        f.held = Some(kept.held);
        f.request_bytes = Some(fwd.tripped.clone());
        f.tripped = Some(fwd.tripped);
        f.busy = Some(busy);
        f.h1 = fwd.h1;
        // an answer that declares its length owes that many bytes (RFC 9110 8.6),
        // except to HEAD and in a 1xx, 204 or 304
        let status = rparts.status.as_u16();
        let owes_length = !head && status >= 200 && status != 204 && status != 304;
        Response::from_parts(rparts, Either::Left(Tracked::new(rbody, f, owes_length)))
    }

    /// A refusal of fedport's own, in the caller's protocol: counted by reason and
    /// logged once.
    pub fn refused(
        self,
        reject: Reject,
        conn: &ConnCtx,
        w: &Worker,
        routed: Routed,
    ) -> Response<RespBody> {
        let service = routed.service;
        let reason = reject.reason();
        w.metrics.reject(&conn.listener, reason);
        let rid = self.rid.to_str().unwrap_or("-");
        tracing::info!(
            request_id = rid,
            listener = &*conn.listener,
            service = service.map_or("-", |i| w.config.services[i].name.as_str()),
            reason = reason.as_str(),
            "request refused: {reject}"
        );
        let grpc = self.grpc;
        let resp = reject.to_response(grpc, rid);
        let (mut f, _busy) = self.finish(conn, w, routed);
        f.reason = Some(reason);
        if reason.of_message() {
            let method = f.method.as_deref().unwrap_or("other");
            f.metrics.message_rejected(method, reason);
        }
        f.http_status = resp.status().as_u16();
        if grpc {
            f.grpc_status = Some(GrpcStatus::Code(reject.grpc_code()));
        }
        drop(f);
        resp.map(Either::Right)
    }
}
