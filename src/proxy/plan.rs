//! Stage 5, body plan: what the service accepts of a body — its content types, its
//! compression, its message size — and how the body is checked on its way: each gRPC
//! message against the method's protobuf schema (and the answer's, with
//! `validate_responses`), a JSON body whole against its route's schema. Then the body
//! is taken as the plan says: buffered whole (JSON, small bodies, a body that may be
//! sent again) within the deadline and the memory budgets, or streamed.

use super::caller::CallerBody;
use super::routing::Route;
use super::{ConnCtx, SMALL_BODY};
use crate::config::Protocol;
use crate::errors::Reject;
use crate::errors::GRPC_ENCODING;
use crate::memory::Held;
use crate::request::{self, ContentType};
use crate::schema;
use bytes::Bytes;
use http::HeaderMap;
use http_body::Body as _;
use std::sync::Arc;
use tokio::time::Instant;

/// How a request's body is checked on its way.
pub(super) struct BodyPlan {
    /// The size limit: of each gRPC message, or of the whole body.
    pub limit: schema::Limit,
    /// Each gRPC message checked against the method's schema.
    pub framer: Option<Box<schema::Framer>>,
    /// With `validate_responses`: the answer's messages are checked too (type, limit).
    pub response: Option<(schema::ProtoCheck, u64)>,
}

pub(super) fn plan(
    headers: &HeaderMap,
    body: &CallerBody,
    conn: &ConnCtx,
    route: &Route<'_, '_>,
) -> Result<BodyPlan, Reject> {
    let (service, ct, grpc) = (route.service, &route.ct, route.grpc);
    let carries_body = !body.is_end_stream() || *ct != ContentType::Absent;
    let accepted = match ct {
        ContentType::Many | ContentType::Invalid => !route.checks_formats,
        _ if service.formats.is_empty() && service.protocol == Protocol::Grpc => {
            matches!(ct, ContentType::One(m) if schema::GRPC_FORMATS.iter().any(|f| m.is(f)))
        }
        ContentType::One(m) => schema::format_accepted(&service.formats, *m),
        ContentType::Absent => service.formats.is_empty(),
    };
    if carries_body && !accepted {
        return Err(Reject::Format(service.name.clone(), ct.essence()));
    }
    // a body validated as JSON goes on only as JSON: under another type (a form, say)
    // the service would parse what was never validated
    let json = matches!(ct, ContentType::One(m) if m.is_json());
    if route.json.is_some() && carries_body && !json {
        return Err(Reject::Format(service.name.clone(), ct.essence()));
    }
    // a body fedport validates goes on as it was validated: a service (or its
    // framework: Express's body-parser, ASP.NET's request decompression) that decodes a
    // Content-Encoding would read other bytes than those checked
    let validated = route.json.is_some() || route.schema.is_some();
    if validated && carries_body {
        if let Some(enc) = request::content_encoding(headers) {
            return Err(Reject::Encoding {
                service: service.name.clone(),
                encoding: enc,
                accepted: "identity".into(),
            });
        }
    }
    let limit = match service.max_message_bytes {
        Some(max) if grpc => schema::Limit::GrpcMessage(max),
        Some(max) => {
            if let Some(n) = body.size_hint().exact().filter(|n| *n > max) {
                return Err(Reject::TooLarge(service.name.clone(), n, max));
            }
            schema::Limit::Body(max)
        }
        None => schema::Limit::Body(u64::MAX),
    };
    // compressed messages: only in an encoding the service accepts
    let mut gzip = false;
    if let Some(enc) = headers.get(GRPC_ENCODING).filter(|_| grpc) {
        // one field, one coding: a service may read the last of two, or a list, and
        // decode other bytes than fedport validated
        let mut fields = headers.get_all(GRPC_ENCODING).iter();
        let (_, second) = (fields.next(), fields.next());
        let e = match second {
            Some(_) => "(two grpc-encoding fields)".to_owned(),
            None => enc.to_str().unwrap_or("?").to_ascii_lowercase(),
        };
        if e != "identity" && !service.encodings.contains(&e) {
            let accepted = std::iter::once("identity")
                .chain(service.encodings.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(",");
            return Err(Reject::Encoding {
                service: service.name.clone(),
                encoding: e,
                accepted,
            });
        }
        gzip = e == "gzip";
    }
    let max = service
        .max_message_bytes
        .unwrap_or(schema::DEFAULT_GRPC_LIMIT);
    let check = |message: &Arc<schema::wire::Compiled>, strict| schema::ProtoCheck {
        message: message.clone(),
        strict,
    };
    let framer = route.schema.map(|(p, m)| {
        Box::new(
            schema::Framer::new(check(&m.input, p.strict), max, gzip).within(conn.memory.clone()),
        )
    });
    let response = route
        .schema
        .filter(|(p, _)| p.validate_responses)
        .map(|(p, m)| (check(&m.output, p.strict), max));
    Ok(BodyPlan {
        limit,
        framer,
        response,
    })
}

/// A body as it goes out: what was buffered whole (to be sent, and sent again if need
/// be), else the guarded stream.
pub(super) struct Outgoing {
    pub replay: Option<Bytes>,
    pub stream: Option<schema::Guarded>,
    /// What is buffered, held against the memory budgets until the request ends.
    pub buffered: Held,
}

/// How a body is taken.
#[derive(Clone, Copy)]
pub(super) enum Take<'w> {
    /// Validated whole against a JSON Schema route (bounded by the service's limit).
    Json(&'w crate::config::JsonRoute),
    /// Small with a known length: sent in one piece.
    Small,
    /// Somewhere else to go if the first target fails: a body that has arrived whole
    /// (a unary call, a GET) is kept to be sent again.
    IfWhole,
    Stream,
}

impl Take<'_> {
    /// `size`: the body's length, when it is known.
    pub fn of(
        json: Option<&crate::config::JsonRoute>,
        grpc: bool,
        size: Option<u64>,
        alternatives: bool,
    ) -> Take<'_> {
        let small = !grpc && size.is_some_and(|n| n > 0 && n <= SMALL_BODY);
        match json {
            Some(r) => Take::Json(r),
            None if small => Take::Small,
            None if alternatives => Take::IfWhole,
            None => Take::Stream,
        }
    }
}

/// Takes the body as `take` says, within the deadline.
pub(super) async fn take(
    take: Take<'_>,
    mut body: schema::Guarded,
    service: &crate::config::Service,
    conn: &ConnCtx,
    aim: &super::dispatch::Aim,
    tripped: &schema::Tripped,
) -> Result<Outgoing, Reject> {
    let (deadline, timeout_ms) = (aim.deadline, aim.timeout_ms);
    let too_large = |n: u64, max: u64| Reject::TooLarge(service.name.clone(), n, max);
    let timed_out = || Reject::Timeout(service.name.clone(), timeout_ms);
    // what is buffered whole counts against the connection's and the node's budgets
    let mut buffered = Held::new(conn.memory.clone());
    let (replay, stream) = match take {
        Take::Json(route) => {
            let max = service
                .max_message_bytes
                .unwrap_or(schema::DEFAULT_JSON_LIMIT);
            let collect = Box::pin(schema::collect(body, max, &mut buffered));
            let bytes = match tokio::time::timeout_at(deadline, collect).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    return Err(match (tripped.get(), e) {
                        (Some(n), _) => too_large(n, max),
                        (None, schema::Collect::TooLarge) => too_large(max + 1, max),
                        (None, schema::Collect::Memory(over)) => Reject::Memory(over),
                        (None, schema::Collect::Failed) => {
                            Reject::BadRequest("request body ended early")
                        }
                    })
                }
            };
            schema::validate_json(route, &bytes).map_err(|violations| Reject::Schema {
                service: service.name.clone(),
                route: route.route.to_string(),
                violations,
            })?;
            (Some(bytes), None)
        }
        Take::Small => {
            // a caller that stalls mid-body holds its limit slot no longer than its time
            let collect = Box::pin(schema::collect(body, SMALL_BODY, &mut buffered));
            let bytes = tokio::time::timeout_at(deadline, collect)
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| match e {
                    schema::Collect::Memory(over) => Reject::Memory(over),
                    _ => Reject::BadRequest("request body ended early"),
                })?;
            (Some(bytes), None)
        }
        Take::IfWhole => match body.take_if_whole(&mut buffered) {
            Ok(Some(whole)) => (Some(whole), None),
            Ok(None) => (None, Some(body)),
            Err(schema::Refused) => return Err(super::dispatch::refusal(service, tripped)),
        },
        Take::Stream => (None, Some(body)),
    };
    // a body collected within the deadline may have used it up: refused here, before it
    // is sent (a service that cannot answer in no time is no failing endpoint, and a
    // caller timing its body to the deadline must not get endpoints ejected)
    if replay.is_some() && !matches!(take, Take::IfWhole) && Instant::now() >= deadline {
        return Err(timed_out());
    }
    Ok(Outgoing {
        replay,
        stream,
        buffered,
    })
}
