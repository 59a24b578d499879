//! The life of a request, top to bottom: route → identity headers → pick an endpoint →
//! forward with the service's timeout → stream the answer back. Each refusal leaves
//! through [`crate::errors::Reject`], counted and logged once.

pub mod body;

use crate::config::{Config, Protocol};
use crate::errors::Reject;
use crate::policy::Call;
use crate::route;
use crate::schema;
use crate::telemetry::{Metrics, ServiceMetrics};
use crate::upstream::{self, EndpointPool, ProxyBody};
use body::{Finish, Tracked};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

/// What fedport answers with: an upstream body passed through, or its own small body.
pub type RespBody = Either<Tracked, Full<Bytes>>;

/// Bodies up to this size with a known length are sent upstream in one piece.
const SMALL_BODY: u64 = 16 * 1024;

pub const FED_PEER: HeaderName = HeaderName::from_static("fed-peer");
pub const FED_ORIGIN: HeaderName = HeaderName::from_static("fed-origin");
pub const FED_HOPS: HeaderName = HeaderName::from_static("fed-hops");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A worker's view of one configuration generation: the compiled config, its route
/// table and this worker's upstream pools (by service index).
pub struct Worker {
    pub config: Arc<Config>,
    pub table: route::Table,
    pub upstreams: Vec<Vec<Arc<EndpointPool>>>,
    pub metrics: Arc<Metrics>,
    pub policy: crate::policy::Policy,
    /// Identities of configured peer nodes: only their `fed-origin`/`fed-hops` are believed.
    pub peer_identities: std::collections::HashSet<String>,
    /// This node's name as `fed-origin` for requests that enter the federation here.
    pub origin: HeaderValue,
    /// Request metrics by listener index, then service index + 1 (0: no service).
    by_service: Vec<Vec<Arc<ServiceMetrics>>>,
}

impl Worker {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, settings: &upstream::Settings) -> Self {
        let upstreams = config
            .services
            .iter()
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| EndpointPool::new(e.clone(), &s.name, settings.clone()))
                    .collect()
            })
            .collect();
        let by_service = config
            .listeners
            .iter()
            .map(|l| {
                std::iter::once("-")
                    .chain(config.services.iter().map(|s| s.name.as_str()))
                    .map(|s| Arc::new(ServiceMetrics::new(&metrics, &l.name, s)))
                    .collect()
            })
            .collect();
        Self {
            table: route::Table::new(&config),
            policy: crate::policy::Policy::new(&config),
            peer_identities: config.peers.iter().map(|p| p.identity.clone()).collect(),
            origin: HeaderValue::from_str(&config.node.name)
                .unwrap_or(HeaderValue::from_static("unknown")),
            config,
            upstreams,
            metrics,
            by_service,
        }
    }

    fn service_metrics(&self, listener: usize, service: Option<usize>) -> Arc<ServiceMetrics> {
        self.by_service[listener][service.map_or(0, |i| i + 1)].clone()
    }
}

/// What a connection knows about its caller, fixed at accept and handshake.
pub struct ConnCtx {
    pub listener: Arc<str>,
    /// The listener's index in the config.
    pub listener_idx: usize,
    /// `fedport_streams_active` of this listener.
    pub streams: Gauge,
    /// The service of a dedicated listener.
    pub dedicated: Option<String>,
    /// The verified identity (`fed-peer`), or `local`.
    pub identity: HeaderValue,
    /// The caller is a configured peer node: its `fed-origin` and `fed-hops` are believed.
    pub from_peer: bool,
    /// The caller's address: the TCP peer, or what a trusted PROXY header carried.
    pub remote: std::net::SocketAddr,
    /// Requests in flight on the connection, for its idle timeout.
    pub activity: Arc<crate::listen::Activity>,
    /// What the `[[allow]]` rules grant this identity.
    pub grants: Arc<crate::policy::Grants>,
    pub worker: Arc<Worker>,
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => {
            let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("0"))
        }
    }
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), which must not cross a hop
/// and which HTTP/2 forbids.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// Callers never set fedport's own headers: every inbound `fed-*` header is removed.
fn strip_fed_headers(h: &mut HeaderMap) {
    let owned: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("fed-"))
        .cloned()
        .collect();
    for k in owned {
        h.remove(k);
    }
}

/// Serves one request on a connection.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnCtx>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let w = conn.worker.clone();
    let grpc = is_grpc(req.headers());
    let rid = request_id(req.headers());
    conn.streams.inc();
    let mut routed = Routed::default();
    let busy = conn.activity.begin();
    let access = w.config.node.access_log.then(|| {
        Box::new(body::AccessEntry {
            remote: conn.remote,
            identity: conn.identity.clone(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            request_id: rid.clone(),
            listener: conn.listener.clone(),
        })
    });
    let finish = |service: Option<usize>, method: Option<Arc<str>>| Finish {
        tripped: None,
        method,
        response_check: None,
        response_refusal: None,
        access: access.map(|a| {
            let name = service.map_or("-", |i| w.config.services[i].name.as_str());
            (a, name.to_owned())
        }),
        busy: None,
        metrics: w.service_metrics(conn.listener_idx, service),
        streams: conn.streams.clone(),
        start,
        grpc_status: grpc.then(String::new),
        http_status: 0,
        outstanding: None,
        h1: None,
    };
    match forward(req, &conn, &w, grpc, &rid, &mut routed).await {
        Ok(fwd) => {
            let (mut rparts, rbody) = fwd.resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            let mut f = finish(routed.service, routed.method.take());
            f.response_check = fwd.response.map(|(check, max)| {
                let gzip = rparts
                    .headers
                    .get("grpc-encoding")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
                schema::Framer::new(check, max, gzip)
            });
            f.http_status = rparts.status.as_u16();
            if grpc {
                // a trailers-only answer carries the status in the headers
                if let Some(s) = rparts
                    .headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                {
                    f.grpc_status = Some(s.to_owned());
                }
            }
            f.outstanding = Some(fwd.outstanding);
            f.tripped = grpc.then_some(fwd.tripped);
            f.busy = Some(busy);
            f.h1 = fwd.h1;
            Ok(Response::from_parts(
                rparts,
                Either::Left(Tracked::new(rbody, f)),
            ))
        }
        Err(reject) => {
            let service = routed.service;
            let reason = reject.reason();
            w.metrics.reject(&conn.listener, reason);
            tracing::info!(
                request_id = rid.to_str().unwrap_or("-"),
                listener = &*conn.listener,
                service = service.map_or("-", |i| w.config.services[i].name.as_str()),
                reason,
                "request refused: {reject}"
            );
            let resp = reject.to_response(grpc, rid.to_str().unwrap_or("-"));
            let mut f = finish(service, routed.method.take());
            if matches!(reason, "format" | "encoding" | "size" | "schema") {
                let method = f.method.as_deref().unwrap_or("other");
                f.metrics.message_rejected(method, reason);
            }
            f.http_status = resp.status().as_u16();
            if grpc {
                f.grpc_status = Some((reject.grpc_code() as u8).to_string());
            }
            drop(f);
            Ok(resp.map(Either::Right))
        }
    }
}

/// What routing decided, kept for the request's metrics and log line.
#[derive(Default)]
struct Routed {
    service: Option<usize>,
    /// The schema method (`pkg.S/M`) or JSON Schema route the request matched.
    method: Option<Arc<str>>,
}

/// An upstream's answer, with what must live as long as its body.
struct Forwarded {
    /// With `validate_responses`: the answer's messages are checked too (type, limit).
    response: Option<(schema::ProtoCheck, u64)>,
    resp: Response<Incoming>,
    outstanding: upstream::Outstanding,
    h1: Option<upstream::H1Return>,
    /// Set when the request body refused a message after the answer had begun.
    tripped: Arc<schema::Tripped>,
}

/// Reads and drops what is left of a refused request's body — at most 64 KiB, for at
/// most 100 ms — so that HTTP/1.1 keeps the connection and HTTP/2 ends the stream
/// cleanly instead of resetting it under a client still sending.
async fn discard(mut body: Incoming) {
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), async {
        let mut read = 0usize;
        while read < 64 * 1024 {
            match body.frame().await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
    })
    .await;
}

async fn forward(
    req: Request<Incoming>,
    conn: &ConnCtx,
    w: &Worker,
    grpc: bool,
    rid: &HeaderValue,
    routed: &mut Routed,
) -> Result<Forwarded, Reject> {
    let (mut parts, body) = req.into_parts();
    // Everything decided before a byte goes upstream; a refusal here first reads and
    // drops a small request body, so the caller gets a clean answer instead of a reset.
    let body_ref = &body;
    let checked = (move || -> Result<_, Reject> {
        let idx = match &conn.dedicated {
            Some(name) => w
                .table
                .by_name(name)
                .ok_or_else(|| Reject::UnknownService(name.clone()))?,
            None => w.table.route(&parts, grpc)?,
        };
        let service = &w.config.services[idx];
        routed.service = Some(idx);
        let method = match (&service.proto, grpc) {
            (Some(p), true) => {
                let m = parts.uri.path().trim_start_matches('/');
                let schema = p.methods.get(m).ok_or_else(|| {
                    Reject::UnknownService(format!("gRPC method {m} (not in the service's schema)"))
                })?;
                routed.method = Some(schema.name.clone());
                Some((p, schema))
            }
            _ => None,
        };
        let json_route = if grpc {
            None
        } else {
            let (m, p) = (parts.method.as_str(), parts.uri.path());
            service.json.iter().find(|r| r.matches(m, p))
        };
        if let Some(r) = json_route {
            routed.method = Some(r.route.clone());
        }
        let call = match route::grpc_path(parts.uri.path()) {
            Some(_) if grpc => Call::Grpc(&parts.uri.path()[1..]),
            _ => Call::Http(parts.method.as_str(), parts.uri.path()),
        };
        if !conn.grants.allows(idx, call) {
            return Err(Reject::Denied {
                identity: conn.identity.to_str().unwrap_or("?").to_owned(),
                service: service.name.clone(),
                call: call.to_string(),
                node: w.config.node.name.clone(),
            });
        }

        let pool = upstream::pick(&w.upstreams[idx])
            .ok_or_else(|| Reject::NoHealthyTarget(service.name.clone()))?
            .clone();

        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| service.name.clone());
        let h = &mut parts.headers;
        strip_hop_by_hop(h);
        let (origin, hops) = if conn.from_peer {
            let hops = h
                .get(&FED_HOPS)
                .filter(|v| v.to_str().is_ok_and(|s| s.parse::<u8>().is_ok()))
                .cloned();
            (h.get(&FED_ORIGIN).cloned(), hops)
        } else {
            (None, None)
        };
        strip_fed_headers(h);
        h.insert(FED_PEER, conn.identity.clone());
        h.insert(FED_ORIGIN, origin.unwrap_or_else(|| w.origin.clone()));
        if let Some(hops) = hops {
            h.insert(FED_HOPS, hops);
        }
        h.insert(REQUEST_ID, rid.clone());

        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if pool.speaks_h2() {
            let scheme = if pool.endpoint.scheme == crate::config::Scheme::Https {
                "https"
            } else {
                "http"
            };
            parts.uri = Uri::builder()
                .scheme(scheme)
                .authority(authority.as_str())
                .path_and_query(pq)
                .build()
                .map_err(|_| Reject::BadRequest("request target cannot be forwarded"))?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        } else {
            parts.uri = Uri::try_from(pq).map_err(|_| Reject::BadRequest("bad request target"))?;
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }

        // what the service accepts: its content types, and its message size
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let carries_body = !body_ref.is_end_stream() || !content_type.is_empty();
        let accepted = if service.formats.is_empty() && service.protocol == Protocol::Grpc {
            schema::GRPC_FORMATS
                .iter()
                .any(|f| schema::essence(content_type) == *f)
        } else {
            schema::format_accepted(&service.formats, content_type)
        };
        if carries_body && !accepted {
            return Err(Reject::Format(
                service.name.clone(),
                schema::essence(content_type),
            ));
        }
        let too_large = |n: u64, max: u64| Reject::TooLarge(service.name.clone(), n, max);
        let limit = match service.max_message_bytes {
            Some(max) if grpc => schema::Limit::GrpcMessage(max),
            Some(max) => {
                if let Some(n) = body_ref.size_hint().exact().filter(|n| *n > max) {
                    return Err(too_large(n, max));
                }
                schema::Limit::Body(max)
            }
            None => schema::Limit::Body(u64::MAX),
        };
        // compressed messages: only in an encoding the service accepts
        let mut gzip = false;
        if let Some(enc) = parts.headers.get("grpc-encoding").filter(|_| grpc) {
            let e = enc.to_str().unwrap_or("?").to_ascii_lowercase();
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
        let framer = method.map(|(p, m)| schema::Framer::new(check(&m.input, p.strict), max, gzip));
        let response = method
            .filter(|(p, _)| p.validate_responses)
            .map(|(p, m)| (check(&m.output, p.strict), max));
        Ok((parts, idx, pool, limit, framer, response, json_route))
    })();
    let (parts, idx, pool, limit, framer, response, json_route) = match checked {
        Ok(c) => c,
        Err(r) => {
            discard(body).await;
            return Err(r);
        }
    };
    let service = &w.config.services[idx];
    let too_large = |n: u64, max: u64| Reject::TooLarge(service.name.clone(), n, max);
    let tripped = Arc::new(schema::Tripped::default());
    let small = !grpc
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n > 0 && n <= SMALL_BODY);
    let body = schema::Guarded::new(body, limit, tripped.clone(), framer);
    if let Some(route) = json_route {
        // validated whole, so buffered: bounded by the service's limit (default 1 MiB)
        let max = service
            .max_message_bytes
            .unwrap_or(schema::DEFAULT_JSON_LIMIT);
        let bytes = match Limited::new(body, max as usize).collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => {
                return Err(match tripped.get() {
                    Some(n) => too_large(n, max),
                    None => too_large(max + 1, max),
                })
            }
        };
        schema::validate_json(route, &bytes).map_err(|violations| Reject::Schema {
            service: service.name.clone(),
            route: route.route.to_string(),
            violations,
        })?;
        return send(
            pool,
            parts,
            Either::Right(Full::new(bytes)),
            service,
            tripped,
        )
        .await;
    }
    let response_check = response;
    let body: ProxyBody = if small {
        let bytes = Limited::new(body, SMALL_BODY as usize)
            .collect()
            .await
            .map_err(|_| Reject::BadRequest("request body ended early"))?
            .to_bytes();
        Either::Right(Full::new(bytes))
    } else {
        Either::Left(body)
    };
    let mut fwd = send(pool, parts, body, service, tripped).await?;
    fwd.response = response_check;
    Ok(fwd)
}

/// Forwards the request within the service's timeout and maps what can go wrong.
async fn send(
    pool: Arc<EndpointPool>,
    parts: http::request::Parts,
    body: ProxyBody,
    service: &crate::config::Service,
    tripped: Arc<schema::Tripped>,
) -> Result<Forwarded, Reject> {
    let too_large = |n: u64, max: u64| Reject::TooLarge(service.name.clone(), n, max);
    let max = service.max_message_bytes.unwrap_or(0);

    let outstanding = pool.begin();
    let sent = tokio::time::timeout(service.timeout, pool.send(Request::from_parts(parts, body)))
        .await
        .map_err(|_| Reject::Timeout(service.name.clone(), service.timeout.as_millis() as u64))?;
    let (resp, h1) = match sent {
        Ok(r) => r,
        Err(upstream::UpstreamError::Connect(url, e)) => {
            tracing::warn!(service = %service.name, endpoint = %url, error = %e, "upstream unreachable");
            return Err(Reject::NoHealthyTarget(service.name.clone()));
        }
        Err(upstream::UpstreamError::Exchange(e)) => {
            // the body refused to carry a message: that is the caller's fault
            if let Some(n) = tripped.get() {
                return Err(too_large(n, max));
            }
            if let Some(e) = tripped.schema_error() {
                return Err(Reject::Schema {
                    service: service.name.clone(),
                    route: "its gRPC method".into(),
                    violations: vec![crate::errors::Violation {
                        path: String::new(),
                        keyword: "protobuf".into(),
                        message: e,
                    }],
                });
            }
            return Err(Reject::Upstream(service.name.clone(), e));
        }
    };
    Ok(Forwarded {
        response: None,
        resp,
        outstanding,
        h1,
        tripped,
    })
}
