//! The one place where a refusal becomes an answer: every [`Reject`] has its [`Reason`]
//! and maps to an HTTP status with a JSON body, or to a gRPC status in a trailers-only
//! response.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Why fedport refused or could not complete a request. The `reason` strings are
/// metric label values and part of the JSON error body: they are a public contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("no service is known for {0}")]
    UnknownService(String),
    #[error("request is malformed: {0}")]
    BadRequest(&'static str),
    #[error("no healthy target for service {0}")]
    NoHealthyTarget(String),
    #[error("upstream of service {0} failed: {1}")]
    Upstream(String, String),
    #[error("service {0} did not answer within {1} ms")]
    Timeout(String, u64),
    #[error("fedport is draining")]
    Draining,
    #[error("service {0} does not accept content type {1:?}")]
    Format(String, String),
    #[error("a message of {1} bytes is over service {0}'s limit of {2} bytes")]
    TooLarge(String, u64, u64),
    /// A `grpc-encoding` the service does not accept; the accepted ones, comma-separated.
    #[error("service {service} does not accept grpc-encoding {encoding:?}; it accepts {accepted}")]
    Encoding {
        service: String,
        encoding: String,
        accepted: String,
    },
    /// The body does not satisfy the route's JSON Schema (or is not JSON).
    #[error("request body does not match the schema of {route} on service {service}: {}", violations.first().map(|v| format!("{} at {:?}", v.message, v.path)).unwrap_or_default())]
    Schema {
        service: String,
        route: String,
        violations: Vec<Violation>,
    },
    /// Forwarding would loop: a request from a peer on a node that is not a transit
    /// node, or past `max_hops`.
    #[error(
        "service {service} is not served on node {node} and the request may not travel on ({why})"
    )]
    Loop {
        service: String,
        node: String,
        why: &'static str,
    },
    /// Over a rate limit (`[[limit]]` or a service's `limits.rate`).
    #[error("rate limit reached for {0}; slow down")]
    RateLimited(String),
    /// Over a concurrency limit: refused rather than queued.
    #[error("too many requests in flight for {0}")]
    Overloaded(String),
    /// The request's host names another service than the one it was routed to (by
    /// `fed-service`, its gRPC path or a dedicated listener).
    #[error("the request is for service {service} but its host {host:?} names another service")]
    Misdirected { service: String, host: String },
    /// Holding the request (its headers, or a message to validate) would pass a memory
    /// budget.
    #[error("the request cannot be held: it would pass {0}")]
    Memory(crate::memory::Over),
    /// No body bytes moved either way for the stream's `stream_idle_timeout` (ms).
    #[error("the stream moved no bytes for {0} ms (stream_idle_timeout)")]
    StreamIdle(u64),
    /// Default deny: no `[[allow]]` rule grants this identity this call.
    #[error("{identity} may not call {call} on service {service}: no [[allow]] rule of node {node} grants it")]
    Denied {
        identity: String,
        service: String,
        call: String,
        node: String,
    },
}

/// One schema violation: where (a JSON pointer into the body), which keyword, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub path: String,
    pub keyword: String,
    pub message: String,
}

/// Set on every answer fedport makes itself, with the reason: a node that forwarded the
/// request to a peer knows from it that no service saw the request.
pub const FED_REFUSED: http::HeaderName = http::HeaderName::from_static("fed-refused");
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
pub const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");

pub use crate::reason::{GrpcCode, Reason};

impl Reject {
    /// The metric label and JSON `reason` for this refusal.
    pub fn reason(&self) -> Reason {
        match self {
            Reject::UnknownService(_) => Reason::UnknownService,
            Reject::BadRequest(_) => Reason::BadRequest,
            Reject::NoHealthyTarget(_) => Reason::NoHealthyTarget,
            Reject::Upstream(..) => Reason::UpstreamError,
            Reject::Timeout(..) => Reason::Deadline,
            Reject::Draining => Reason::Draining,
            Reject::Format(..) => Reason::Format,
            Reject::TooLarge(..) => Reason::Size,
            Reject::Encoding { .. } => Reason::Encoding,
            Reject::Loop { .. } => Reason::Loop,
            Reject::RateLimited(_) => Reason::RateLimited,
            Reject::Overloaded(_) => Reason::Overloaded,
            Reject::Schema { .. } => Reason::Schema,
            Reject::Denied { .. } => Reason::Denied,
            Reject::Misdirected { .. } => Reason::Misdirected,
            Reject::StreamIdle(_) => Reason::StreamIdle,
            Reject::Memory(_) => Reason::Memory,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Reject::UnknownService(_) => StatusCode::NOT_FOUND,
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
            Reject::NoHealthyTarget(_) | Reject::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Reject::Upstream(..) => StatusCode::BAD_GATEWAY,
            Reject::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
            Reject::Denied { .. } => StatusCode::FORBIDDEN,
            Reject::Format(..) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reject::TooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::Encoding { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reject::Loop { .. } => StatusCode::LOOP_DETECTED,
            Reject::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Reject::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Reject::Schema { .. } => StatusCode::BAD_REQUEST,
            Reject::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Reject::StreamIdle(_) => StatusCode::REQUEST_TIMEOUT,
            Reject::Memory(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            Reject::UnknownService(_) => GrpcCode::Unimplemented,
            Reject::BadRequest(_) => GrpcCode::InvalidArgument,
            Reject::NoHealthyTarget(_) | Reject::Draining | Reject::Upstream(..) => {
                GrpcCode::Unavailable
            }
            Reject::Timeout(..) => GrpcCode::DeadlineExceeded,
            Reject::Denied { .. } => GrpcCode::PermissionDenied,
            Reject::Format(..) => GrpcCode::InvalidArgument,
            Reject::TooLarge(..) => GrpcCode::ResourceExhausted,
            // the gRPC compression spec's answer to an encoding the server lacks
            Reject::Encoding { .. } => GrpcCode::Unimplemented,
            Reject::Loop { .. } => GrpcCode::FailedPrecondition,
            Reject::RateLimited(_) => GrpcCode::ResourceExhausted,
            Reject::Overloaded(_) => GrpcCode::Unavailable,
            Reject::Schema { .. } => GrpcCode::InvalidArgument,
            Reject::Misdirected { .. } => GrpcCode::InvalidArgument,
            Reject::StreamIdle(_) => GrpcCode::DeadlineExceeded,
            Reject::Memory(_) => GrpcCode::ResourceExhausted,
        }
    }

    /// The answer in the caller's protocol: a gRPC trailers-only response when the
    /// caller speaks gRPC, else the HTTP status with a JSON body.
    pub fn to_response(&self, grpc: bool, request_id: &str) -> Response<Full<Bytes>> {
        let (head, body) = self.answer(grpc, request_id);
        Response::from_parts(head, Full::new(body))
    }

    /// [`Reject::to_response`] as its head and its whole body.
    pub fn answer(&self, grpc: bool, request_id: &str) -> (http::response::Parts, Bytes) {
        let message = self.to_string();
        if grpc {
            let mut resp = Response::new(Bytes::new());
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            set_grpc_status(h, self.grpc_code(), &message);
            if let Ok(v) = HeaderValue::from_str(request_id) {
                h.insert("x-request-id", v);
            }
            h.insert(
                FED_REFUSED,
                HeaderValue::from_static(self.reason().as_str()),
            );
            if let Reject::Encoding { accepted, .. } = self {
                if let Ok(v) = HeaderValue::from_str(accepted) {
                    h.insert("grpc-accept-encoding", v);
                }
            }
            return resp.into_parts();
        }
        let mut body = serde_json::json!({
            "error": { "reason": self.reason().as_str(), "message": message, "request_id": request_id }
        });
        if let Reject::Schema { violations, .. } = self {
            body["error"]["violations"] = serde_json::json!(violations);
        }
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = self.http_status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        h.insert(
            FED_REFUSED,
            HeaderValue::from_static(self.reason().as_str()),
        );
        resp.into_parts()
    }
}

/// The trailers that end a gRPC call fedport ends itself after its answer began (or,
/// as headers, a trailers-only answer): the status and its percent-encoded message.
pub fn grpc_trailers(code: GrpcCode, message: &str) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    set_grpc_status(&mut t, code, message);
    t
}

fn set_grpc_status(h: &mut http::HeaderMap, code: GrpcCode, message: &str) {
    h.insert(GRPC_STATUS, HeaderValue::from_static(code.as_str()));
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec): bytes outside
/// printable ASCII and `%` itself are escaped.
pub fn percent_encode_grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reject_has_distinct_reason_and_matching_codes() {
        let all = [
            Reject::UnknownService("x".into()),
            Reject::BadRequest("y"),
            Reject::NoHealthyTarget("s".into()),
            Reject::Upstream("s".into(), "reset".into()),
            Reject::Timeout("s".into(), 5),
            Reject::Draining,
            Reject::Denied {
                identity: "i".into(),
                service: "s".into(),
                call: "c".into(),
                node: "n".into(),
            },
            Reject::Format("s".into(), "text/plain".into()),
            Reject::TooLarge("s".into(), 2, 1),
            Reject::Encoding {
                service: "s".into(),
                encoding: "snappy".into(),
                accepted: "identity,gzip".into(),
            },
            Reject::Loop {
                service: "s".into(),
                node: "n".into(),
                why: "w",
            },
            Reject::RateLimited("identity i".into()),
            Reject::Overloaded("service s".into()),
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(|r| r.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        assert_eq!(all[0].http_status(), StatusCode::NOT_FOUND);
        assert_eq!(all[0].grpc_code(), GrpcCode::Unimplemented);
        assert_eq!(all[4].http_status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(all[4].grpc_code(), GrpcCode::DeadlineExceeded);
        assert_eq!(all[6].http_status(), StatusCode::FORBIDDEN);
        assert_eq!(all[6].grpc_code(), GrpcCode::PermissionDenied);
        assert_eq!(all[7].http_status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(all[7].grpc_code(), GrpcCode::InvalidArgument);
        assert_eq!(all[8].http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(all[8].grpc_code(), GrpcCode::ResourceExhausted);
        assert_eq!(all[9].grpc_code(), GrpcCode::Unimplemented);
        assert_eq!(all[10].http_status(), StatusCode::LOOP_DETECTED);
        assert_eq!(all[10].grpc_code(), GrpcCode::FailedPrecondition);
        assert_eq!(all[11].http_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(all[11].grpc_code(), GrpcCode::ResourceExhausted);
        assert_eq!(all[12].http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(all[12].grpc_code(), GrpcCode::Unavailable);
        let r = all[9].to_response(true, "id");
        assert_eq!(r.headers()["grpc-accept-encoding"], "identity,gzip");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode_grpc_message("a 100% é"), "a 100%25 %C3%A9");
    }

    #[test]
    fn http_body_is_json_with_reason_and_request_id() {
        let r = Reject::UnknownService("nope".into()).to_response(false, "abc");
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}
