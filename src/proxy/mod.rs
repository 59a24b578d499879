//! The life of a request, top to bottom: route → identity headers → pick an endpoint →
//! forward with the service's timeout → stream the answer back. Each refusal leaves
//! through [`crate::errors::Reject`], counted and logged once.

pub mod body;
pub mod caller;
pub mod deadline;
pub mod headers;
pub mod trace;

use crate::reason::{GrpcCode, GrpcStatus, Reason};
use crate::config::{Config, Protocol};
use crate::errors::Reject;
use crate::policy::Call;
use crate::request::{self, ContentType};
use crate::route;
use crate::schema;
use crate::telemetry::{Metrics, ServiceMetrics};
use crate::upstream::{self, EndpointPool, ProxyBody};
use body::{Finish, Tracked};
use bytes::Bytes;
use caller::{CallerBody, StreamState};
pub(crate) use headers::strip_fed_headers;
use headers::strip_hop_by_hop;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
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
/// The identity that entered the federation: `fed-peer` at the first node, carried on
/// across peers (and believed only from them).
pub const FED_CALLER: HeaderName = HeaderName::from_static("fed-caller");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const FED_SERVICE: HeaderName = HeaderName::from_static(route::FED_SERVICE);

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
    /// Health of local endpoints and peers, shared by every worker.
    pub fleet: Arc<crate::federation::Fleet>,
    /// This worker's connections to each peer (by peer index).
    pub peer_pools: Vec<Arc<EndpointPool>>,
    /// Peer index by the identity its certificate carries.
    pub peer_by_identity: std::collections::HashMap<String, usize>,
    /// By service index: the retry budget, and where requests went.
    budgets: Vec<crate::federation::RetryBudget>,
    counters: Vec<Counters>,
    /// Request and error counts for traffic-spike detection, shared by every worker.
    pub traffic: Arc<crate::telemetry::spike::Traffic>,
    /// `fedport_peer_inbound_requests_total` by peer index.
    peer_inbound: Vec<prometheus_client::metrics::counter::Counter>,
    /// Where sampled requests' spans go, when `[tracing] otlp` is set.
    pub spans: Option<crate::telemetry::otlp::Spans>,
    /// Rate and concurrency limits, shared by every worker.
    pub limits: Arc<crate::limits::Limiter>,
    /// The node's memory budget, shared by every worker.
    pub memory: Arc<crate::limits::memory::Node>,
    /// Started streams reset, per caller identity, shared by every worker.
    pub resets: Arc<crate::limits::resets::Resets>,
}

/// What every worker of a node shares: endpoint and peer health, the traffic counts
/// behind spike detection, and the span queue.
#[derive(Clone)]
pub struct Shared {
    pub limits: Arc<crate::limits::Limiter>,
    /// The node's memory budget for what is held for callers.
    pub memory: Arc<crate::limits::memory::Node>,
    /// Started streams reset, per caller identity.
    pub resets: Arc<crate::limits::resets::Resets>,
    pub fleet: Arc<crate::federation::Fleet>,
    pub traffic: Arc<crate::telemetry::spike::Traffic>,
    pub spans: Option<crate::telemetry::otlp::Spans>,
}

/// Where one service's requests went, and its retries (counter handles resolved once).
struct Counters {
    local: prometheus_client::metrics::counter::Counter,
    peers: Vec<prometheus_client::metrics::counter::Counter>,
    unsent: prometheus_client::metrics::counter::Counter,
    idempotent: prometheus_client::metrics::counter::Counter,
    exhausted: prometheus_client::metrics::counter::Counter,
}

impl Worker {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        settings: &upstream::Settings,
        Shared {
            limits,
            memory,
            resets,
            fleet,
            traffic,
            spans,
        }: Shared,
        peer_settings: &[upstream::Settings],
    ) -> Self {
        let peer_inbound = config
            .peers
            .iter()
            .map(|p| {
                metrics
                    .peer_inbound
                    .get_or_create(&crate::telemetry::PeerLabels {
                        peer: p.name.clone(),
                    })
                    .clone()
            })
            .collect();
        let peer_pools = config
            .peers
            .iter()
            .zip(peer_settings)
            .map(|(p, st)| {
                let (host, port) = p.address.rsplit_once(':').unwrap_or((&p.address, "0"));
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let endpoint = crate::config::Endpoint {
                    url: format!("https://{}", p.address),
                    scheme: crate::config::Scheme::Https,
                    host: host.to_owned(),
                    port: port.parse().unwrap_or(0),
                };
                EndpointPool::new(
                    endpoint,
                    &format!("peer:{}", p.name),
                    st.clone(),
                    upstream::UNCAPPED,
                )
            })
            .collect();
        let counters = config
            .services
            .iter()
            .map(|s| {
                let target = |t: &str| {
                    metrics
                        .forwarded
                        .get_or_create(&crate::telemetry::TargetLabels {
                            service: s.name.clone(),
                            target: t.to_owned(),
                        })
                        .clone()
                };
                let retry = |k: &str| {
                    metrics
                        .retries
                        .get_or_create(&crate::telemetry::RetryLabels {
                            service: s.name.clone(),
                            kind: k.to_owned(),
                        })
                        .clone()
                };
                Counters {
                    local: target("local"),
                    peers: config.peers.iter().map(|p| target(&p.name)).collect(),
                    unsent: retry("unsent"),
                    idempotent: retry("idempotent"),
                    exhausted: retry("budget_exhausted"),
                }
            })
            .collect();
        let budgets = config
            .services
            .iter()
            .map(|_| {
                crate::federation::RetryBudget::new(
                    config.node.retry_ratio,
                    config.node.retry_min_per_second,
                )
            })
            .collect();
        let upstreams = config
            .services
            .iter()
            .map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| {
                        // the service's cap, shared evenly among the workers
                        let share = (s.max_connections / config.node.workers).max(1);
                        EndpointPool::new(e.clone(), &s.name, settings.clone(), share)
                    })
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
            peer_by_identity: config
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| (p.identity.clone(), i))
                .collect(),
            config,
            upstreams,
            metrics,
            by_service,
            fleet,
            peer_pools,
            budgets,
            counters,
            traffic,
            peer_inbound,
            spans,
            limits,
            memory,
            resets,
        }
    }

    fn service_metrics(&self, listener: usize, service: Option<usize>) -> Arc<ServiceMetrics> {
        self.by_service[listener][service.map_or(0, |i| i + 1)].clone()
    }
}

/// What a connection knows about its caller, fixed at accept and handshake.
#[derive(Clone)]
pub struct ConnCtx {
    /// The listener's accepting state as configuration generations come: requests
    /// on an existing connection follow a reload.
    pub current: Arc<arc_swap::ArcSwap<crate::listen::Accepting>>,
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
    /// Which peer, by index.
    pub peer: Option<usize>,
    /// The caller's address: the TCP peer, or what a trusted PROXY header carried.
    pub remote: std::net::SocketAddr,
    /// The connection is TLS (a peer listener), not a local listener's cleartext.
    pub tls: bool,
    /// `remote`'s address as `x-forwarded-for` writes it.
    pub forwarded_for: HeaderValue,
    /// What this connection's requests may hold.
    pub memory: Arc<crate::limits::memory::Connection>,
    /// Requests in flight on the connection, for its idle timeout.
    pub activity: Arc<crate::listen::Activity>,
    /// What the `[[allow]]` rules grant this identity.
    pub grants: Arc<crate::policy::Grants>,
    pub worker: Arc<Worker>,
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

/// The connection's view under the configuration now in force: after a reload, the
/// listener's new index and dedicated service, the caller's grants under the new rules,
/// and whether it is (still) a peer. A listener that was removed keeps its old view
/// while its connections drain.
fn current(conn: Arc<ConnCtx>) -> Arc<ConnCtx> {
    let latest = conn.current.load();
    if Arc::ptr_eq(&latest.worker, &conn.worker) {
        return conn;
    }
    let w = latest.worker.clone();
    let id = conn.identity.to_str().unwrap_or_default();
    let mut c = (*conn).clone();
    c.listener_idx = latest.index;
    c.dedicated = latest.spec.service.clone();
    c.grants = w.policy.grants(id);
    // as at accept: whoever presents a peer's identity is that peer, on any listener
    c.peer = w.peer_by_identity.get(id).copied();
    c.from_peer = w.peer_identities.contains(id);
    c.worker = w;
    Arc::new(c)
}

/// Serves one request on a connection.
///
/// `stream`: what an HTTP/2 stream's task shares with its request (`None` on HTTP/1.1).
pub async fn handle(
    req: Request<CallerBody>,
    conn: Arc<ConnCtx>,
    stream: Option<Arc<StreamState>>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let conn = current(conn);
    let w = conn.worker.clone();
    let mut req = req;
    // first of all: the headers the caller named in Connection are no part of the
    // request (RFC 9110 7.6.1), so nothing may check one that is then taken away
    // (`Connection: content-type` sent a validated JSON body on untyped)
    strip_hop_by_hop(req.headers_mut());
    let ct = request::ContentTypeField::of(req.headers());
    let grpc = ct.claims_grpc();
    let head = req.method() == http::Method::HEAD;
    let rid = request_id(req.headers());
    // W3C trace context: the caller's trace goes on with a span of this hop
    let hop = trace::next_hop(req.headers_mut(), w.config.tracing.sample);
    let trace_id = hop.trace_id.clone();
    let span = w
        .spans
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
    let mut routed = Routed::default();
    let busy = conn.activity.begin();
    let sample = w.config.node.access_log;
    let access = (sample >= 1.0 || (sample > 0.0 && fastrand::f64() < sample)).then(|| {
        Box::new(body::AccessEntry {
            remote: conn.remote,
            identity: conn.identity.clone(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            request_id: rid.clone(),
            listener: conn.listener.clone(),
            trace_id,
        })
    });
    let finish = |service: Option<usize>, method: Option<Arc<str>>| Finish {
        admit: None,
        held: None,
        span: span.map(|s| {
            let name = service.map_or("-", |i| w.config.services[i].name.as_str());
            Box::new((s, name.to_owned(), conn.identity.clone()))
        }),
        record: w.config.node.request_metrics,
        request_bytes: None,
        response_bytes: 0,
        target: None,
        reason: None,
        traffic: service.map(|s| (w.traffic.clone(), s, conn.peer)),
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
        grpc_status: grpc.then_some(GrpcStatus::Absent),
        http_status: 0,
        outstanding: None,
        h1: None,
    };
    if let Some(s) = &stream {
        s.answer_as(grpc, &rid);
    }
    let forwarded = forward(req, &conn, &w, &ct, &rid, &mut routed, stream.as_deref())
        .await
        .inspect(|fwd| {
            // what the codec may take in of the answer while the caller does not read
            // it: the service's stream window, or what its length still owes; charged
            // by the stream if the caller's window stalls it (peer nodes' streams
            // carry callers bounded at their own nodes)
            if let Some(s) = stream.as_ref().filter(|_| !conn.from_peer) {
                let window = u64::from(fwd.window);
                let owed = fwd.resp.body().size_hint().exact();
                s.set_answer_window(owed.map_or(window, |n| n.min(window)));
            }
        });
    open.hand_over();
    match forwarded {
        Ok(fwd) => {
            let (mut rparts, rbody) = fwd.resp.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            let mut f = finish(routed.service, routed.method.take());
            f.response_check = fwd.response.map(|(check, max)| {
                let gzip = rparts
                    .headers
                    .get("grpc-encoding")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
                Box::new(schema::Framer::new(check, max, gzip).within(conn.memory.clone()))
            });
            f.http_status = rparts.status.as_u16();
            if grpc {
                // a trailers-only answer carries the status in the headers
                if let Some(s) = rparts.headers.get("grpc-status") {
                    f.grpc_status = Some(GrpcStatus::of(s.as_bytes()));
                }
            }
            f.outstanding = Some(fwd.outstanding);
            f.target = Some(fwd.target);
            f.admit = fwd.admit;
            f.held = fwd.held;
            f.request_bytes = Some(fwd.tripped.clone());
            f.tripped = Some(fwd.tripped);
            f.busy = Some(busy);
            f.h1 = fwd.h1;
            // an answer that declares its length owes that many bytes (RFC 9110 8.6),
            // except to HEAD and in a 1xx, 204 or 304
            let status = rparts.status.as_u16();
            let owes_length = !head && status >= 200 && status != 204 && status != 304;
            Ok(Response::from_parts(
                rparts,
                Either::Left(Tracked::new(rbody, f, owes_length)),
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
                reason = reason.as_str(),
                "request refused: {reject}"
            );
            let resp = reject.to_response(grpc, rid.to_str().unwrap_or("-"));
            let mut f = finish(service, routed.method.take());
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
    /// The request's place under its concurrency limits, held until it ends.
    admit: Option<crate::limits::Admit>,
    /// The request's header list, held against the memory budgets until it ends.
    held: Option<crate::limits::memory::Held>,
    /// The stream window the target's connection grants.
    window: u32,
    /// The endpoint (or peer) that answered.
    target: Arc<str>,
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
async fn discard(mut body: CallerBody) {
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
    req: Request<CallerBody>,
    conn: &ConnCtx,
    w: &Worker,
    ct: &request::ContentTypeField,
    rid: &HeaderValue,
    routed: &mut Routed,
    stream: Option<&StreamState>,
) -> Result<Forwarded, Reject> {
    let grpc = ct.claims_grpc();
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    // Everything decided before a byte goes upstream; a refusal here first reads and
    // drops a small request body, so the caller gets a clean answer instead of a reset.
    let body_ref = &body;
    let checked = (move || -> Result<_, Reject> {
        // the header list, held while the request is, against the connection's budget
        let headers_held = crate::limits::memory::Held::connection_only(
            conn.memory.clone(),
            crate::limits::memory::header_list_size(&parts.headers),
        )
        .map_err(Reject::Memory)?;
        if !request::path_is_normal(parts.uri.path()) {
            return Err(Reject::BadRequest(
                "the path has dot segments or encoded separators; send it normalised (RFC 3986 section 5.2.4)",
            ));
        }
        if request::overrides_method(&parts.headers, parts.uri.query()) {
            return Err(Reject::BadRequest(
                "the request names another method (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override or _method); send that method itself",
            ));
        }
        if !request::method_is_canonical(parts.method.as_str()) {
            return Err(Reject::BadRequest(
                "the method is a standard method in another case; methods are case-sensitive (RFC 9110 section 9.1): send it in upper case",
            ));
        }
        let host = request::host(&parts.uri, &parts.headers)
            .map_err(|e| Reject::BadRequest(e.message()))?;
        let idx = match &conn.dedicated {
            Some(name) => w
                .table
                .by_name(name)
                .ok_or_else(|| Reject::UnknownService(name.clone()))?,
            None => w
                .table
                .route(parts.uri.path(), &parts.headers, host.as_ref(), grpc)?,
        };
        let service = &w.config.services[idx];
        routed.service = Some(idx);
        // which of two content types would the service read? and what is not a media
        // type is none: refused by a service that checks formats, before anything else
        let ct = ct.parse();
        let checks_formats = !service.formats.is_empty()
            || service.protocol == Protocol::Grpc
            || service.proto.is_some()
            || !service.json.is_empty();
        if checks_formats && ct.is_ambiguous() {
            return Err(Reject::Format(service.name.clone(), ct.essence()));
        }
        let grpc = grpc && ct.is_grpc();
        // a host naming another service than the one the request is for: the service
        // would be told one name and fedport have checked another
        if let Some(h) = &host {
            if w.table.by_name(h.first_label()).is_some_and(|o| o != idx) {
                return Err(Reject::Misdirected {
                    service: service.name.clone(),
                    host: h.0.to_string(),
                });
            }
        }
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
        // looked up whatever the content type says: a body for a JSON Schema route is
        // validated as JSON even when it claims to be gRPC
        let json_route = {
            let (m, p) = (parts.method.as_str(), parts.uri.path());
            service.json.iter().find(|r| r.matches(m, p))
        };
        if let Some(r) = json_route {
            routed.method = Some(r.route.clone());
        }
        // a call is read as its service's protocol reads it: a gRPC content type makes a
        // gRPC call of a gRPC service only, never of an HTTP service's route
        let call = match route::grpc_path(parts.uri.path()) {
            Some(_) if grpc && service.protocol == Protocol::Grpc => {
                Call::Grpc(&parts.uri.path()[1..])
            }
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
        // routed and authorized: work starts, and the service's own idle timeout holds
        if let Some(s) = stream {
            s.start();
            if let Some(idle) = service.stream_idle_timeout {
                s.set_idle(idle);
            }
        }

        // limits: refused early, never queued
        let admit = if w.limits.is_empty() {
            None
        } else {
            let id = conn.identity.to_str().unwrap_or("?");
            Some(
                w.limits
                    .admit(idx, id, &service.name)
                    .map_err(|o| match o {
                        crate::limits::Over::Rate(who) => Reject::RateLimited(who),
                        crate::limits::Over::Concurrency(who) => Reject::Overloaded(who),
                    })?,
            )
        };
        let idempotent = service.idempotent.allows(call);
        let h = &mut parts.headers;
        let (origin, hops, caller) = if conn.from_peer {
            // a peer always says how far the request came; a value that cannot be
            // read counts as the farthest allowed, never as a fresh request
            let hops = match h.get(&FED_HOPS) {
                None => 0,
                Some(v) => v
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse::<u8>().ok())
                    .unwrap_or(w.config.node.max_hops),
            };
            (
                h.get(&FED_ORIGIN).cloned(),
                hops,
                h.get(&FED_CALLER).cloned(),
            )
        } else {
            (None, 0, None)
        };
        // the caller's deadline, if it set one, within the service's timeout
        let asked = deadline::asked(h, grpc).map_err(Reject::BadRequest)?;
        let carried = if conn.from_peer {
            headers::Carried::from_peer(h)
        } else {
            headers::Carried::default()
        };
        headers::strip_claims(h);
        if service.forwarded_headers {
            headers::set_forwarded(h, carried, &conn.forwarded_for, conn.tls);
        }
        h.insert(FED_PEER, conn.identity.clone());
        h.insert(FED_ORIGIN, origin.unwrap_or_else(|| w.origin.clone()));
        h.insert(FED_CALLER, caller.unwrap_or_else(|| conn.identity.clone()));
        h.insert(REQUEST_ID, rid.clone());
        let timeout = asked.map_or(service.timeout, |t| t.min(service.timeout));
        if asked.is_some_and(|t| t.is_zero()) {
            return Err(Reject::Timeout(service.name.clone(), 0));
        }

        // what the service accepts: its content types, and its message size
        let carries_body = !body_ref.is_end_stream() || ct != ContentType::Absent;
        let accepted = match ct {
            ContentType::Many | ContentType::Invalid => !checks_formats,
            _ if service.formats.is_empty() && service.protocol == Protocol::Grpc => {
                matches!(ct, ContentType::One(m) if schema::GRPC_FORMATS.iter().any(|f| m.is(f)))
            }
            ContentType::One(m) => schema::format_accepted(&service.formats, m),
            ContentType::Absent => service.formats.is_empty(),
        };
        if carries_body && !accepted {
            return Err(Reject::Format(service.name.clone(), ct.essence()));
        }
        // a body validated as JSON goes on only as JSON: under another type (a form, say)
        // the service would parse what was never validated
        let json = matches!(ct, ContentType::One(m) if m.is_json());
        if json_route.is_some() && carries_body && !json {
            return Err(Reject::Format(service.name.clone(), ct.essence()));
        }
        // a body fedport validates goes on as it was validated: a service (or its
        // framework: Express's body-parser, ASP.NET's request decompression) that
        // decodes a Content-Encoding would read other bytes than those checked
        let validated = json_route.is_some() || method.is_some();
        if validated && carries_body {
            if let Some(enc) = request::content_encoding(&parts.headers) {
                return Err(Reject::Encoding {
                    service: service.name.clone(),
                    encoding: enc,
                    accepted: "identity".into(),
                });
            }
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
        let framer = method.map(|(p, m)| {
            Box::new(
                schema::Framer::new(check(&m.input, p.strict), max, gzip)
                    .within(conn.memory.clone()),
            )
        });
        let response = method
            .filter(|(p, _)| p.validate_responses)
            .map(|(p, m)| (check(&m.output, p.strict), max));
        let aim = Aim {
            authority: service.authority.clone(),
            hops,
            idempotent,
            deadline_header: asked.is_some(),
            caller_deadline: asked.is_some_and(|t| t < service.timeout),
            timeout_ms: timeout.as_millis() as u64,
            grpc,
        };
        Ok((
            parts,
            idx,
            aim,
            timeout,
            limit,
            framer,
            response,
            json_route,
            (admit, headers_held),
        ))
    })();
    let (parts, idx, aim, timeout, limit, framer, response, json_route, (admit, headers_held)) =
        match checked {
            Ok(c) => c,
            Err(r) => {
                Box::pin(discard(body)).await;
                return Err(r);
            }
        };
    let service = &w.config.services[idx];
    let too_large = |n: u64, max: u64| Reject::TooLarge(service.name.clone(), n, max);
    let deadline = start + timeout;
    let tripped = Arc::new(schema::Tripped::default());
    let small = !grpc
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n > 0 && n <= SMALL_BODY);
    let mut body = Some(schema::Guarded::new(body, limit, tripped.clone(), framer));
    let mut targets = Targets::new(w, conn, idx, &parts.headers, &aim)?;
    // what is buffered whole counts against the connection's and the node's budgets
    let mut buffered = crate::limits::memory::Held::new(conn.memory.clone());
    let replay: Option<Bytes> = if let Some(route) = json_route {
        // validated whole, so buffered: bounded by the service's limit (default 1 MiB)
        let max = service
            .max_message_bytes
            .unwrap_or(schema::DEFAULT_JSON_LIMIT);
        let whole = body.take().expect("the body is there");
        let collect = Box::pin(schema::collect(whole, max, &mut buffered));
        let bytes = match tokio::time::timeout_at(deadline.into(), collect).await {
            Err(_) => return Err(Reject::Timeout(service.name.clone(), aim.timeout_ms)),
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
        Some(bytes)
    } else if small {
        // a caller that stalls mid-body holds its limit slot no longer than its time
        let whole = body.take().expect("the body is there");
        let collect = Box::pin(schema::collect(whole, SMALL_BODY, &mut buffered));
        let bytes = tokio::time::timeout_at(deadline.into(), collect)
            .await
            .map_err(|_| Reject::Timeout(service.name.clone(), aim.timeout_ms))?
            .map_err(|e| match e {
                schema::Collect::Memory(over) => Reject::Memory(over),
                _ => Reject::BadRequest("request body ended early"),
            })?;
        Some(bytes)
    } else if targets.alternatives() {
        // somewhere else to go if this fails: a body that has already arrived whole
        // (a unary call, a GET) can be sent again
        match body.as_mut().map(|b| b.take_if_whole(&mut buffered)) {
            Some(Ok(whole)) => whole,
            Some(Err(schema::Refused)) => return Err(refusal(service, &tripped)),
            None => None,
        }
    } else {
        None
    };
    let mut fwd = Box::pin(dispatch(
        w,
        idx,
        parts,
        body,
        replay,
        &aim,
        &mut targets,
        deadline,
        tripped,
    ))
    .await?;
    fwd.response = response;
    fwd.admit = admit;
    fwd.held = Some(headers_held);
    Ok(fwd)
}

/// How a request is aimed at each target, decided once.
struct Aim {
    /// The authority the service's endpoints are told (`authority`, by default the
    /// service's name).
    authority: String,
    /// `fed-hops` as it arrived (0 unless from a peer).
    hops: u8,
    /// The method may be sent twice.
    idempotent: bool,
    /// The caller gave a deadline (`grpc-timeout` / `fed-timeout`): pass on what is left.
    deadline_header: bool,
    /// The caller's deadline is shorter than the service's timeout: running out of it
    /// is no sign of a failing endpoint.
    caller_deadline: bool,
    /// The time the request was given (the caller's deadline or the service's timeout).
    timeout_ms: u64,
    /// The request is a gRPC call.
    grpc: bool,
}

/// Where a request may go, best first, worked out as far as needed: available local
/// endpoints (power of two choices first), then peers in the fleet's order.
enum Target {
    Local(usize),
    Peer(usize),
}

struct Targets<'a> {
    w: &'a Worker,
    service: usize,
    locals: Vec<usize>,
    next_local: usize,
    /// Why peers may not be used (loop prevention), if they may not.
    no_peers: Option<&'static str>,
    peers: Option<Vec<usize>>,
    next_peer: usize,
    /// Peers not to go back to: the caller's node and the request's origin.
    exclude: [Option<&'a str>; 2],
}

impl<'a> Targets<'a> {
    fn new(
        w: &'a Worker,
        conn: &ConnCtx,
        service: usize,
        headers: &HeaderMap,
        aim: &Aim,
    ) -> Result<Self, Reject> {
        let cfg = &w.config;
        let n = w.upstreams[service].len();
        let mut locals: Vec<usize> = (0..n).filter(|&e| w.fleet.available(service, e)).collect();
        let no_peers = if conn.from_peer && !cfg.node.transit {
            Some("it came from a peer and this node is not a transit node")
        } else if aim.hops >= cfg.node.max_hops {
            Some("it has taken max_hops hops already")
        } else {
            None
        };
        if locals.is_empty() {
            if w.fleet.has_peers(service) {
                if let Some(why) = no_peers {
                    return Err(Reject::Loop {
                        service: cfg.services[service].name.clone(),
                        node: cfg.node.name.clone(),
                        why,
                    });
                }
            } else {
                // every endpoint is out and nowhere else has the service: try them all
                // rather than refuse (Envoy's panic mode)
                locals = (0..n).collect();
            }
        }
        // the first local endpoint by power of two choices; the others follow it
        if let Some(k) = upstream::p2c(locals.len(), |k| {
            w.upstreams[service][locals[k]].outstanding()
        }) {
            locals.swap(0, k);
        }
        let caller = conn
            .identity
            .to_str()
            .ok()
            .and_then(|id| w.peer_by_identity.get(id))
            .map(|&i| cfg.peers[i].name.as_str());
        let origin = headers
            .get(&FED_ORIGIN)
            .and_then(|v| v.to_str().ok())
            .and_then(|o| cfg.peers.iter().find(|p| p.name == o))
            .map(|p| p.name.as_str());
        Ok(Self {
            w,
            service,
            locals,
            next_local: 0,
            no_peers,
            peers: None,
            next_peer: 0,
            exclude: [caller, origin],
        })
    }

    /// Whether more than one target could be tried.
    fn alternatives(&self) -> bool {
        self.locals.len() > 1 || (self.no_peers.is_none() && self.w.fleet.has_peers(self.service))
    }

    fn next(&mut self) -> Option<Target> {
        if let Some(&e) = self.locals.get(self.next_local) {
            self.next_local += 1;
            return Some(Target::Local(e));
        }
        if self.no_peers.is_some() {
            return None;
        }
        let w = self.w;
        let (service, exclude) = (self.service, self.exclude);
        let peers = self
            .peers
            .get_or_insert_with(|| w.fleet.peer_order(&w.config, service, &exclude));
        let p = peers.get(self.next_peer).copied()?;
        self.next_peer += 1;
        Some(Target::Peer(p))
    }
}

/// The refusal a tripped request guard stands for (the caller's fault), else a
/// generic one.
fn refusal(service: &crate::config::Service, tripped: &schema::Tripped) -> Reject {
    if let Some(over) = tripped.memory() {
        return Reject::Memory(over);
    }
    if let Some(n) = tripped.get() {
        return Reject::TooLarge(
            service.name.clone(),
            n,
            service.max_message_bytes.unwrap_or(0),
        );
    }
    if let Some(e) = tripped.schema_error() {
        return Reject::Schema {
            service: service.name.clone(),
            route: "its gRPC method".into(),
            violations: vec![crate::errors::Violation {
                path: String::new(),
                keyword: "protobuf".into(),
                message: e,
            }],
        };
    }
    Reject::BadRequest("the request body ended with an error")
}

/// Points a request at one target: its URI and version for that connection, and the
/// federation headers — `fed-hops` one more and `fed-service` for a peer, what is left
/// of the caller's deadline.
fn aim_at(
    req: &mut Request<ProxyBody>,
    pool: &EndpointPool,
    to_peer: bool,
    aim: &Aim,
    service: &str,
    left: std::time::Duration,
    grpc: bool,
) -> Result<(), Reject> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    // the service is told the name of the service the request was routed and
    // authorized for, never the caller's: a peer routes it by fed-service and names it
    // to its own endpoints the same way
    let authority = if to_peer {
        service
    } else {
        aim.authority.as_str()
    };
    let h2 = pool.speaks_h2();
    if h2 {
        let scheme = if pool.endpoint.scheme == crate::config::Scheme::Https {
            "https"
        } else {
            "http"
        };
        *req.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|_| Reject::BadRequest("request target cannot be forwarded"))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.uri_mut() = Uri::try_from(pq).map_err(|_| Reject::BadRequest("bad request target"))?;
        *req.version_mut() = Version::HTTP_11;
        match HeaderValue::from_str(authority) {
            Ok(v) => {
                req.headers_mut().insert(header::HOST, v);
            }
            Err(_) => return Err(Reject::BadRequest("request target cannot be forwarded")),
        }
    }
    let h = req.headers_mut();
    let hops = if to_peer { aim.hops + 1 } else { aim.hops };
    if hops > 0 {
        h.insert(FED_HOPS, HeaderValue::from(u16::from(hops)));
    } else {
        h.remove(&FED_HOPS);
    }
    if to_peer {
        if let Ok(v) = HeaderValue::from_str(service) {
            h.insert(FED_SERVICE, v);
        }
    } else {
        h.remove(&FED_SERVICE);
    }
    if aim.deadline_header {
        deadline::pass_on(h, grpc, left);
    }
    Ok(())
}

/// Sends the request to its best target, and on to the next when that one fails in a
/// way that allows it: never sent (connect refused, connection closing), refused
/// unprocessed (REFUSED_STREAM, or a peer's own refusal) with a body that can be sent
/// again, or — for idempotent methods only, within the retry budget — any failure.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    w: &Worker,
    idx: usize,
    parts: http::request::Parts,
    body: Option<schema::Guarded>,
    replay: Option<Bytes>,
    aim: &Aim,
    targets: &mut Targets<'_>,
    deadline: Instant,
    tripped: Arc<schema::Tripped>,
) -> Result<Forwarded, Reject> {
    let service = &w.config.services[idx];
    let grpc = aim.grpc;
    let budget = &w.budgets[idx];
    budget.deposit();
    // what a maybe-sent request is rebuilt from; kept only when it could be resent
    let keep = replay.as_ref().filter(|_| targets.alternatives()).map(|_| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    // sent whole from the start: nothing of it is left for the caller to send
    let whole = replay.is_some() || body.as_ref().is_none_or(|b| b.is_end_stream());
    let first_body = match (&replay, body) {
        (Some(b), _) => Either::Right(Full::new(b.clone())),
        (None, Some(g)) => Either::Left(g),
        (None, None) => Either::Right(Full::default()),
    };
    let mut pending = Some(Request::from_parts(parts, first_body));
    let mut target = targets.next();
    let mut last = Reject::NoHealthyTarget(service.name.clone());
    let counters = &w.counters[idx];
    while let Some(t) = target.take() {
        let mut req = match pending.take() {
            Some(r) => r,
            None => {
                let (Some((m, u, h)), Some(b)) = (&keep, &replay) else {
                    break;
                };
                let mut r = Request::new(Either::Right(Full::new(b.clone())));
                *r.method_mut() = m.clone();
                *r.uri_mut() = u.clone();
                *r.headers_mut() = h.clone();
                r
            }
        };
        let (pool, to_peer, local) = match t {
            Target::Local(e) => (w.upstreams[idx][e].clone(), false, Some(e)),
            Target::Peer(p) => (w.peer_pools[p].clone(), true, None),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Reject::Timeout(service.name.clone(), 0));
        }
        aim_at(&mut req, &pool, to_peer, aim, &service.name, left, grpc)?;
        match t {
            Target::Local(_) => counters.local.inc(),
            Target::Peer(p) => counters.peers[p].inc(),
        };
        let outstanding = pool.begin();
        let sent = tokio::time::timeout(left, pool.send(req, deadline)).await;
        let Ok(sent) = sent else {
            // a service that has not answered while the caller had not sent all of its
            // body may be waiting for it: no failure of the endpoint (a caller that
            // trickles its body would otherwise eject healthy endpoints)
            let sent_whole = whole || tripped.ended();
            if let Some(e) = local.filter(|_| !aim.caller_deadline && sent_whole) {
                w.fleet.record(idx, e, false);
            }
            return Err(Reject::Timeout(service.name.clone(), aim.timeout_ms));
        };
        let can_resend = replay.is_some() && keep.is_some();
        match sent {
            Ok((mut resp, h1)) => {
                if local.is_some() {
                    // fedport's own headers are fedport's to set: a service cannot
                    // claim, say, a peer's refusal and have its request sent again
                    strip_fed_headers(resp.headers_mut());
                }
                let unavailable = matches!(resp.status().as_u16(), 502..=504)
                    || resp.headers().get("grpc-status").is_some_and(|s| {
                        GrpcStatus::of(s.as_bytes()) == GrpcStatus::Code(GrpcCode::Unavailable)
                    });
                if let Some(e) = local {
                    w.fleet.record(idx, e, !unavailable);
                }
                let refused_by_peer = to_peer
                    && resp
                        .headers()
                        .get(crate::errors::FED_REFUSED)
                        .and_then(|r| Reason::parse(r.as_bytes()))
                        .is_some_and(Reason::elsewhere_may_serve);
                let next = if (unavailable || refused_by_peer) && can_resend {
                    targets.next()
                } else {
                    None
                };
                if let Some(next) = next {
                    if refused_by_peer {
                        counters.unsent.inc();
                        target = Some(next);
                        continue;
                    }
                    if aim.idempotent {
                        if budget.withdraw() {
                            counters.idempotent.inc();
                            target = Some(next);
                            continue;
                        }
                        counters.exhausted.inc();
                    }
                }
                return Ok(Forwarded {
                    admit: None,
                    held: None,
                    window: pool.stream_window(),
                    target: pool.label.clone(),
                    response: None,
                    resp,
                    outstanding,
                    h1,
                    tripped,
                });
            }
            Err(failed) => {
                // refused by fedport's own guard, or the caller's body failed: the
                // caller's doing, which neither counts against the endpoint nor is
                // sent anywhere else
                if tripped.refused() {
                    return Err(refusal(service, &tripped));
                }
                if tripped.caller_failed() {
                    return Err(Reject::BadRequest("the request body ended with an error"));
                }
                let upstream::Failed { error, unsent } = failed;
                // busy sockets are fedport's own cap, no sign of a failing endpoint
                let busy = matches!(error, upstream::UpstreamError::Busy(..));
                if let Some(e) = local.filter(|_| !busy) {
                    w.fleet.record(idx, e, false);
                }
                tracing::debug!(service = %service.name, target = %pool.endpoint.url, error = %error, "attempt failed");
                last = match &error {
                    upstream::UpstreamError::Connect(..) => {
                        Reject::NoHealthyTarget(service.name.clone())
                    }
                    upstream::UpstreamError::Busy(url, max) => Reject::Overloaded(format!(
                        "service {} (the {max} HTTP/1.1 connections this worker may open to {url} stayed busy)",
                        service.name
                    )),
                    e => Reject::Upstream(service.name.clone(), e.to_string()),
                };
                let Some(next) = targets.next() else { break };
                if let Some(back) = unsent {
                    // it never left fedport: it goes on as it is
                    counters.unsent.inc();
                    pending = Some(back);
                    target = Some(next);
                    continue;
                }
                if !can_resend {
                    break;
                }
                if matches!(error, upstream::UpstreamError::Refused(_)) {
                    counters.unsent.inc();
                    target = Some(next);
                    continue;
                }
                if !aim.idempotent {
                    break;
                }
                if !budget.withdraw() {
                    counters.exhausted.inc();
                    break;
                }
                counters.idempotent.inc();
                target = Some(next);
            }
        }
    }
    if let Reject::NoHealthyTarget(_) = &last {
        tracing::warn!(service = %service.name, "no target could take the request");
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_resolve_elsewhere_are_not_normal() {
        for p in [
            "/",
            "/v1/orders",
            "/v1/orders/42",
            "/pkg.Service/Method",
            "/v1/file.json",
            "/v1/a..b/.hidden",
            "/v1/%41%42",
            "/v1/orders;v=1",
        ] {
            assert!(request::path_is_normal(p), "{p}");
        }
        for p in [
            "/public/../admin",
            "/public/./x",
            "/public/..",
            "/public/%2e%2e/admin",
            "/public/%2E./admin",
            "/public/..;/admin",
            "/public%2f..%2fadmin",
            "/public%2Fx",
            "/public\\..\\admin",
            "/public%5cadmin",
            "/a%00b",
        ] {
            assert!(!request::path_is_normal(p), "{p}");
        }
    }
}
