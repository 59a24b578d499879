//! The life of a request, top to bottom, one stage a file (docs/lifecycle.md):
//!
//! | stage | file | gives |
//! |---|---|---|
//! | 1. hygiene | `hygiene.rs` | one reading of the head, its header list held |
//! | 2. route | `routing.rs` | the service, its content type, schema method or JSON route |
//! | 3. admit | `admit.rs` | authorized; a place under the limits |
//! | 4. federation headers, deadline | `journey.rs` | hops, origin, caller; the time it has |
//! | 5. body plan | `plan.rs` | formats, encodings, size, schema checks; the body taken |
//! | 6. targets | `targets.rs` | local endpoints, then peers, best first |
//! | 7. dispatch | `dispatch.rs` | attempts, and retries as each failure's `Retry` allows |
//! | 8. outcome | `outcome.rs`, [`body`] | the answer passed on and recorded, or a refusal |
//!
//! [`handle`] shows the whole path. Every refusal is a [`crate::errors::Reject`] with
//! its [`crate::reason::Reason`], answered in the caller's protocol, counted and logged
//! once.

pub mod activity;
mod admit;
pub mod body;
pub mod deadline;
mod dispatch;
mod hygiene;
pub mod journey;
mod outcome;
mod plan;
pub mod replay;
mod routing;
pub mod targets;

use crate::caller::{self, CallerBody, StreamState};
use crate::config::Config;
use crate::errors::Reject;
use crate::headers;
use crate::request;
use crate::route;
use crate::schema;
use crate::telemetry::{Metrics, ServiceMetrics};
use crate::upstream::{self, EndpointPool};
use body::Tracked;
use bytes::Bytes;
use dispatch::{Aim, Forwarded};
pub(crate) use headers::strip_fed_headers;
use headers::strip_hop_by_hop;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use outcome::{Exchange, Routed};
use prometheus_client::metrics::gauge::Gauge;
use std::convert::Infallible;
use std::sync::Arc;
use targets::Targets;

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
    /// This worker's connections to each peer for TCP services' CONNECT streams.
    pub tunnel_pools: Vec<Arc<EndpointPool>>,
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
    pub memory: Arc<crate::memory::Node>,
    /// Started streams reset, per caller identity, shared by every worker.
    pub resets: Arc<crate::limits::resets::Resets>,
    /// Where access lines go when `access_log_file` is set.
    pub access_file: Option<Arc<crate::telemetry::accesslog::AccessFile>>,
}

/// What every worker of a node shares: endpoint and peer health, the traffic counts
/// behind spike detection, and the span queue.
#[derive(Clone)]
pub struct Shared {
    pub limits: Arc<crate::limits::Limiter>,
    /// The node's memory budget for what is held for callers.
    pub memory: Arc<crate::memory::Node>,
    /// Started streams reset, per caller identity.
    pub resets: Arc<crate::limits::resets::Resets>,
    pub fleet: Arc<crate::federation::Fleet>,
    pub traffic: Arc<crate::telemetry::spike::Traffic>,
    pub spans: Option<crate::telemetry::otlp::Spans>,
    /// `access_log_file`'s writer.
    pub access_file: Option<Arc<crate::telemetry::accesslog::AccessFile>>,
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
            access_file,
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
        let pools = |window: Option<u32>| -> Vec<Arc<EndpointPool>> {
            config
                .peers
                .iter()
                .zip(peer_settings)
                .map(|(p, st)| {
                    let mut st = st.clone();
                    // a peer that dials this node: its links' window, whatever carries
                    if let Some(w) = window.filter(|_| st.reverse.is_none()) {
                        st.stream_window = w;
                    }
                    let (host, port) = p.address.rsplit_once(':').unwrap_or((&p.address, "0"));
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let endpoint = crate::config::Endpoint {
                        // a peer that dials this node is reached over the links it opened
                        url: if p.accepts_reverse() {
                            format!("reverse://{}", p.name)
                        } else {
                            format!("https://{}", p.address)
                        },
                        scheme: crate::config::Scheme::Https,
                        zone: p.zone.clone(),
                        host: host.to_owned(),
                        port: port.parse().unwrap_or(0),
                    };
                    EndpointPool::new(
                        endpoint,
                        &format!("peer:{}", p.name),
                        st,
                        upstream::UNCAPPED,
                    )
                })
                .collect()
        };
        let peer_pools = pools(None);
        // TCP connections carried to peers ride connections of their own, with the
        // stream window of a local endpoint's: what one holds unread is charged to its
        // caller (src/tcp), and HTTP to the peer shares no connection budget with them
        let tunnel_pools = pools(Some(upstream::STREAM_WINDOW));
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
            tunnel_pools,
            budgets,
            counters,
            traffic,
            peer_inbound,
            spans,
            limits,
            memory,
            resets,
            access_file,
        }
    }

    fn service_metrics(&self, listener: usize, service: Option<usize>) -> Arc<ServiceMetrics> {
        self.by_service[listener][service.map_or(0, |i| i + 1)].clone()
    }
}

/// A listener under the configuration now in force, as `listen` keeps it across
/// reloads: what a connection's requests follow.
pub trait Generations: Send + Sync {
    /// Whether `worker` is of the generation now in force.
    fn is(&self, worker: &Arc<Worker>) -> bool;

    /// The listener in the generation now in force, if that is not `worker`'s.
    fn since(&self, worker: &Arc<Worker>) -> Option<Generation>;

    /// The worker of the generation now in force.
    fn worker(&self) -> Arc<Worker>;
}

/// A listener in one configuration generation.
pub struct Generation {
    pub worker: Arc<Worker>,
    /// The listener's index in the config.
    pub index: usize,
    /// The service of a dedicated listener.
    pub dedicated: Option<String>,
}

/// What a connection knows about its caller, fixed at accept and handshake.
#[derive(Clone)]
pub struct ConnCtx {
    /// The listener's accepting state as configuration generations come: requests
    /// on an existing connection follow a reload.
    pub current: Arc<dyn Generations>,
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
    pub memory: Arc<crate::memory::Connection>,
    /// Requests in flight on the connection, for its idle timeout.
    pub activity: Arc<activity::Activity>,
    /// What the `[[allow]]` rules grant this identity.
    pub grants: Arc<crate::policy::Grants>,
    /// The `[[limit]]` this identity is under, resolved once (no lock per request).
    pub limits: Arc<crate::limits::Caller>,
    /// This connection's view under the generation that replaced its own, worked out
    /// once for all its later requests (kept by the connection's first view only, so
    /// that no view holds itself).
    pub refreshed: Arc<arc_swap::ArcSwapOption<ConnCtx>>,
    pub worker: Arc<Worker>,
}

fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => {
            // 32 hex digits, written without the formatting machinery (it was 2% of a
            // request's instructions)
            let mut id = [0u8; 32];
            crate::telemetry::trace::hex_u64(&mut id[..16], fastrand::u64(..));
            crate::telemetry::trace::hex_u64(&mut id[16..], fastrand::u64(..));
            HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
        }
    }
}

/// The connection's view under the configuration now in force: after a reload, the
/// listener's new index and dedicated service, the caller's grants under the new rules,
/// and whether it is (still) a peer. A listener that was removed keeps its old view
/// while its connections drain.
pub fn current(conn: Arc<ConnCtx>) -> Arc<ConnCtx> {
    if conn.current.is(&conn.worker) {
        return conn;
    }
    if let Some(r) = conn.refreshed.load_full() {
        if conn.current.is(&r.worker) {
            return r;
        }
    }
    let Some(now) = conn.current.since(&conn.worker) else {
        return conn;
    };
    let w = now.worker;
    let id = conn.identity.to_str().unwrap_or_default();
    let mut c = (*conn).clone();
    c.listener_idx = now.index;
    c.dedicated = now.dedicated;
    c.grants = w.policy.grants(id);
    c.limits = Arc::new(w.limits.caller(id));
    // as at accept: whoever presents a peer's identity is that peer, on any listener
    c.peer = w.peer_by_identity.get(id).copied();
    c.from_peer = w.peer_identities.contains(id);
    c.worker = w;
    c.refreshed = Arc::default();
    let c = Arc::new(c);
    conn.refreshed.store(Some(c.clone()));
    c
}

/// Serves one request on a connection: docs/lifecycle.md's stages, in order.
///
/// `stream`: what an HTTP/2 stream's task shares with its request (`None` on HTTP/1.1).
pub async fn handle(
    mut req: Request<CallerBody>,
    conn: Arc<ConnCtx>,
    stream: Option<Arc<StreamState>>,
) -> Result<Response<RespBody>, Infallible> {
    let conn = current(conn);
    // first of all: the headers the caller named in Connection are no part of the
    // request (RFC 9110 7.6.1), so nothing may check one that is then taken away
    // (`Connection: content-type` sent a validated JSON body on untyped)
    strip_hop_by_hop(req.headers_mut());
    let ct = request::ContentTypeField::of(req.headers());
    let ex = Exchange::begin(&mut req, &conn, ct.claims_grpc());
    if let Some(s) = &stream {
        s.answer_as(ex.grpc, &ex.rid);
    }
    let mut routed = Routed::default();
    let forwarded = forward(req, &conn, &ct, &ex, &mut routed, stream.as_deref()).await;
    let w = &*conn.worker;
    Ok(match forwarded {
        Ok((fwd, kept)) => {
            // what the codec may take in of the answer while the caller does not read
            // it: the service's stream window, or what its length still owes; charged
            // by the stream if the caller's window stalls it (peer nodes' streams
            // carry callers bounded at their own nodes)
            if let Some(s) = stream.as_ref().filter(|_| !conn.from_peer) {
                let window = u64::from(fwd.window);
                let owed = fwd.resp.body().size_hint().exact();
                s.set_answer_window(owed.map_or(window, |n| n.min(window)));
            }
            ex.answered(fwd, kept, &conn, w, routed)
        }
        Err(reject) => ex.refused(reject, &conn, w, routed),
    })
}

/// What must live as long as the answer's body: the request's place under its
/// concurrency limits, its header list held against the memory budgets, and with
/// `validate_responses` the check of the answer's messages.
struct Kept {
    admit: Option<crate::limits::Admit>,
    held: crate::memory::Held,
    response: Option<(schema::ProtoCheck, u64)>,
}

/// Everything decided about a request before a byte of it goes upstream.
struct Decided<'w> {
    aim: Aim,
    plan: plan::BodyPlan,
    json: Option<&'w crate::config::JsonRoute>,
    admit: Option<crate::limits::Admit>,
    headers_held: crate::memory::Held,
}

/// Stages 1–5: hygiene → route → admit → federation headers and deadline → body plan.
fn decide<'w>(
    parts: &mut http::request::Parts,
    body: &CallerBody,
    conn: &'w ConnCtx,
    ct: &request::ContentTypeField,
    ex: &Exchange,
    routed: &mut Routed,
    stream: Option<&StreamState>,
) -> Result<Decided<'w>, Reject> {
    let w = &*conn.worker;
    let hygiene::Clean { host, headers_held } = hygiene::check(parts, conn)?;
    let (route, call) = routing::route(w, conn, parts, host, ct, routed)?;
    let admitted = admit::admit(w, conn, &route, call, stream)?;
    routed.would_deny = admitted.would_deny;
    // what the audit records, taken before the headers change (the call borrows them)
    let audited = admitted
        .would_deny
        .then(|| crate::telemetry::audit::bounded(call, routed.method.as_deref()));
    let idempotent = route.service.idempotent.allows(call);
    let journey = journey::prepare(&mut parts.headers, w, conn, &route, &ex.rid)?;
    let plan = plan::plan(&parts.headers, body, conn, &route)?;
    let service = route.service;
    let aim = Aim {
        service: route.idx,
        authority: service.authority.clone(),
        hops: journey.hops,
        idempotent,
        deadline_header: journey.asked.is_some(),
        caller_deadline: journey.asked.is_some_and(|t| t < service.timeout),
        deadline: ex.start + journey.timeout,
        timeout_ms: journey.timeout.as_millis() as u64,
        grpc: route.grpc,
        would_deny: admitted.would_deny,
    };
    if let Some(method) = audited {
        // past every other check: what enforcement alone would have refused
        w.metrics
            .audit
            .would_deny(&service.name, conn.identity.to_str().unwrap_or("?"), method);
    }
    Ok(Decided {
        aim,
        plan,
        json: route.json,
        admit: admitted.limits,
        headers_held,
    })
}

/// Stages 1–7 for one request; its answer, or why there is none.
async fn forward(
    req: Request<CallerBody>,
    conn: &ConnCtx,
    ct: &request::ContentTypeField,
    ex: &Exchange,
    routed: &mut Routed,
    stream: Option<&StreamState>,
) -> Result<(Forwarded, Kept), Reject> {
    let w = &*conn.worker;
    let (mut parts, body) = req.into_parts();
    // a refusal before a byte goes upstream first reads and drops a small request body,
    // so the caller gets a clean answer instead of a reset
    let d = match decide(&mut parts, &body, conn, ct, ex, routed, stream) {
        Ok(d) => d,
        Err(r) => {
            Box::pin(discard(body)).await;
            return Err(r);
        }
    };
    let service = &w.config.services[d.aim.service];
    let tripped = Arc::new(schema::Tripped::default());
    let size = body.size_hint().exact();
    let guarded = schema::Guarded::new(body, d.plan.limit, tripped.clone(), d.plan.framer);
    let mut targets = Targets::new(
        w,
        conn,
        d.aim.service,
        parts.headers.get(&FED_ORIGIN),
        d.aim.hops,
        d.aim.would_deny,
    )?;
    let take = plan::Take::of(d.json, d.aim.grpc, size, targets.alternatives());
    let out = plan::take(take, guarded, service, conn, &d.aim, &tripped).await?;
    let fwd = Box::pin(dispatch::dispatch(
        w,
        &d.aim,
        parts,
        out.stream,
        out.replay,
        &mut targets,
        tripped,
    ))
    .await?;
    drop(out.buffered);
    let kept = Kept {
        admit: d.admit,
        held: d.headers_held,
        response: d.plan.response,
    };
    Ok((fwd, kept))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_is_kept_or_made_of_32_hex_digits() {
        let mut h = HeaderMap::new();
        let made: Vec<_> = (0..2).map(|_| request_id(&h)).collect();
        for id in &made {
            let id = id.to_str().unwrap();
            assert_eq!(id.len(), 32, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        assert_ne!(made[0], made[1]);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }

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
