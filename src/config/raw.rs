//! The TOML file as written: serde types that deny unknown keys and keep each value's
//! position, so that every later check can point at `file:line:col`.

use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node: S<RawNode>,
    pub tls: Option<S<RawTls>>,
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub listener: Vec<S<RawListener>>,
    #[serde(default)]
    pub service: Vec<S<RawService>>,
    #[serde(default)]
    pub peer: Vec<S<RawPeer>>,
    #[serde(default)]
    pub allow: Vec<S<RawAllow>>,
    pub spikes: Option<S<RawSpikes>>,
    pub tracing: Option<S<RawTracing>>,
    #[serde(default)]
    pub limit: Vec<S<RawLimit>>,
    #[serde(default)]
    pub trust_domain: Vec<S<RawTrustDomain>>,
    /// `[bundle_endpoint]`: where this node serves its own trust domain's bundle.
    pub bundle_endpoint: Option<S<RawServeBundle>>,
    /// Not spanned: `[registry.etcd]` leaves `registry` an implicit table.
    pub registry: Option<RawRegistry>,
}

/// Membership from a registry: `registry = { etcd = { ... } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub etcd: S<RawEtcd>,
}

/// An endpoint: its URL, or its URL and the zone it is in.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawEndpoint {
    Url(String),
    Zoned(RawZoned),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZoned {
    pub url: String,
    pub zone: Option<String>,
}

impl RawEndpoint {
    pub fn url(&self) -> &str {
        match self {
            RawEndpoint::Url(u) => u,
            RawEndpoint::Zoned(z) => &z.url,
        }
    }

    pub fn zone(&self) -> Option<&str> {
        match self {
            RawEndpoint::Url(_) => None,
            RawEndpoint::Zoned(z) => z.zone.as_deref(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    /// Client URLs of the etcd members, e.g. "http://10.0.0.1:2379".
    pub endpoints: Vec<S<String>>,
    /// Key prefix shared by the federation; default "/fedport".
    pub prefix: Option<S<String>>,
    /// Lease time to live: a node that stops renewing is gone after this; default 10s.
    pub ttl: Option<S<String>>,
    /// The address peers reach this node's internal port at; default the first peer
    /// listener's bound address.
    pub advertise: Option<S<String>>,
    /// TLS to etcd: CA bundle, and a client certificate and key when etcd asks for one.
    pub ca: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    /// The identities members may have (an identity pattern); default this node's own
    /// identity with its last segment or label `*`.
    pub members: Option<S<String>>,
}

/// Trace export.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// OTLP/HTTP (JSON) traces endpoint, e.g. "http://127.0.0.1:4318/v1/traces".
    pub otlp: Option<S<String>>,
    pub service_name: Option<S<String>>,
    /// The share of new traces (started here) that are sampled; default 1.
    pub sample: Option<S<f64>>,
}

/// Traffic-spike detection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpikes {
    pub warmup: Option<S<String>>,
    pub window: Option<S<String>>,
    pub sensitivity: Option<S<f64>>,
    pub sustain: Option<S<String>>,
    pub min_rate: Option<S<f64>>,
    pub min_error_ratio: Option<S<f64>>,
}

/// `true`/`false`, or the share of requests logged.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(untagged)]
pub enum AccessLog {
    All(bool),
    Sample(f64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: S<String>,
    pub region: S<String>,
    pub zone: Option<S<String>>,
    /// Worker threads, each a single-threaded runtime with its own listeners; default: one per core.
    pub workers: Option<S<i64>>,
    /// How long in-flight requests may take to finish after SIGTERM; default 30s.
    pub drain_timeout: Option<S<String>>,
    /// After a binary upgrade, how long busy connections may stay with the old process
    /// before they are drained as on SIGTERM; default 60s.
    pub upgrade_drain_timeout: Option<S<String>>,
    /// Upstream connections are replaced after this many requests; default 100000.
    pub upstream_max_requests: Option<S<i64>>,
    /// One log line per request (target `fedport::access`); default false.
    pub access_log: Option<S<AccessLog>>,
    /// The access log's lines go to this file, JSON lines; reopened on SIGUSR1.
    pub access_log_file: Option<S<String>>,
    /// `"enforce"` (default): a call no rule allows is refused; `"audit"`: it is served,
    /// counted and logged as `would_deny`.
    pub authorization: Option<S<String>>,
    /// Per-request metrics (counts, latency, bytes); default true.
    pub request_metrics: Option<bool>,
    /// Upstream HTTP/2 connections per worker per endpoint; default 2.
    pub upstream_connections: Option<S<i64>>,
    /// Requests that came from a peer may be forwarded to another peer; default false.
    pub transit: Option<bool>,
    /// The most peer-to-peer forwards a request may take; default 2.
    pub max_hops: Option<S<i64>>,
    /// Retries of requests that may have reached a service, as a share of requests.
    pub retry_budget: Option<S<RawRetryBudget>>,
    /// How often each peer is pinged (HTTP/2 PING) for liveness and round-trip time; default 1s.
    pub peer_ping_interval: Option<S<String>>,
    /// A peer whose PING is not answered within this is down; default 1s.
    pub peer_ping_timeout: Option<S<String>>,
    /// Bytes the node may hold for callers (messages held for validation, buffered
    /// bodies, header lists); default 256MiB.
    pub memory_budget: Option<S<SizeValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    /// Retries allowed per request sent; default 0.2.
    pub ratio: Option<S<f64>>,
    /// Retries allowed per second whatever the traffic; default 10.
    pub min_per_second: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    /// HTTP services: the path that answers 2xx when healthy; default "/healthz".
    pub path: Option<S<String>>,
    /// gRPC services: the name asked of grpc.health.v1; default "" (the whole server).
    pub grpc_service: Option<S<String>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub healthy_threshold: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<S<i64>>,
    pub ejection: Option<S<String>>,
    pub max_ejected_percent: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: S<String>,
    pub key: S<String>,
    pub ca: S<String>,
    pub crl: Option<S<String>>,
    /// Handshake must finish within this; default 10s.
    pub handshake_timeout: Option<S<String>>,
    /// `"1.3"` (default) or `"1.2"` (TLS 1.2 with AEAD suites as well).
    pub min_version: Option<S<String>>,
}

/// `[[trust_domain]]`: another organisation's SPIFFE trust domain and the bundle that
/// alone may vouch for its identities.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrustDomain {
    /// The trust domain, e.g. `"b.example"`.
    pub name: S<String>,
    /// Its CA bundle (PEM); or
    pub ca: Option<S<String>>,
    /// its SPIFFE bundle (JWKS), where a fetch from `bundle_endpoint` keeps it.
    pub bundle: Option<S<String>>,
    pub crl: Option<S<String>>,
    /// DNS-SAN identities it may vouch for (`"db.b.example"`, `"*.svc.b.example"`).
    pub dns_names: Option<Vec<S<String>>>,
    pub bundle_endpoint: Option<S<RawBundleEndpoint>>,
}

/// `bundle_endpoint = { url, profile, spiffe_id }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundleEndpoint {
    pub url: S<String>,
    /// `"https_spiffe"` (the default) or `"https_web"`.
    pub profile: Option<S<String>>,
    /// The SPIFFE ID the endpoint presents (`https_spiffe`).
    pub spiffe_id: Option<S<String>>,
}

/// `[bundle_endpoint]`: this node's own bundle, served over TLS (its own certificate,
/// no client certificate asked for) at `/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServeBundle {
    pub bind: S<String>,
    /// `spiffe_refresh_hint` of the served bundle; default 5m.
    pub refresh_hint: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: S<String>,
    /// Monitoring ranges admitted besides loopback.
    pub allow: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub bind: S<String>,
    pub role: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
    pub proxy_protocol: Option<S<RawProxyProtocol>>,
    pub service: Option<S<String>>,
    /// Open connections allowed on this listener (all workers together); default 10000.
    pub max_connections: Option<S<i64>>,
    /// A connection with no request in flight for this long is closed; default 5m.
    pub idle_timeout: Option<S<String>>,
    /// Concurrent HTTP/2 streams per connection; default 1024.
    pub max_streams: Option<S<i64>>,
    /// How long request headers (an HTTP/2 header block, the HTTP/2 preface, HTTP/1.1
    /// request headers) may take to arrive; default 10s.
    pub header_timeout: Option<S<String>>,
    /// A stream with no bytes moving either way for this long is reset; default 60s.
    pub stream_idle_timeout: Option<S<String>>,
    /// Bytes one connection's requests may have held at once; default 32MiB.
    pub connection_memory_budget: Option<S<SizeValue>>,
}

/// A rate (requests per second, with a burst) and a concurrency limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub rate: Option<S<i64>>,
    pub burst: Option<S<i64>>,
    pub concurrency: Option<S<i64>>,
}

/// `[[limit]]`: limits for each identity a pattern matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimit {
    pub from: S<String>,
    pub rate: Option<S<i64>>,
    pub burst: Option<S<i64>>,
    pub concurrency: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    pub trusted: Vec<S<String>>,
    /// How long the header may take to arrive; default 3s.
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: S<String>,
    pub protocol: S<String>,
    /// `"enforce"` or `"audit"` for this service; default: the node's.
    pub authorization: Option<S<String>>,
    #[serde(default)]
    pub endpoints: Vec<S<RawEndpoint>>,
    /// Shares of the traffic by zone, e.g. `{ a = 80, b = 20 }`.
    pub locality_weights: Option<S<std::collections::BTreeMap<String, S<i64>>>>,
    /// The node's zone is preferred while at least this share of its endpoints there is
    /// healthy; below it, traffic spills to the other zones. Default 0.7.
    pub zone_spill_below: Option<S<f64>>,
    pub grpc_services: Option<Vec<S<String>>>,
    pub formats: Option<Vec<S<String>>>,
    pub schema: Option<S<RawSchema>>,
    pub max_message_bytes: Option<S<SizeValue>>,
    pub timeout: Option<S<String>>,
    /// `grpc-encoding`s accepted besides identity; default `["gzip"]`.
    pub encodings: Option<Vec<S<String>>>,
    /// Methods safe to send twice (`pkg.S/M`, `pkg.S/*`, `VERB /prefix`); HTTP GET,
    /// HEAD and OPTIONS always are.
    pub idempotent: Option<Vec<S<String>>>,
    /// Peers or regions to fail over to, in order, before the default order.
    pub failover: Option<Vec<S<String>>>,
    pub health: Option<S<RawHealth>>,
    pub outlier: Option<S<RawOutlier>>,
    /// Rate and concurrency for the whole service.
    pub limits: Option<S<RawLimits>>,
    /// The authority (`Host` / `:authority`) its endpoints are told; default its name.
    pub authority: Option<S<String>>,
    /// A stream to this service with no bytes moving either way for this long is reset.
    pub stream_idle_timeout: Option<S<String>>,
    /// HTTP/1.1 sockets the node may open to each endpoint; default 256.
    pub max_connections: Option<S<i64>>,
    /// Set x-forwarded-for and x-forwarded-proto from what fedport verified.
    pub forwarded_headers: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchema {
    pub proto: Option<Vec<S<String>>>,
    /// Directories searched for `import`s; default: each proto file's own directory.
    pub include: Option<Vec<S<String>>>,
    pub descriptor_set: Option<S<String>>,
    pub strict: Option<bool>,
    pub validate_responses: Option<bool>,
    pub json: Option<BTreeMap<String, S<String>>>,
}

/// A size is either a number of bytes or a string with a unit (`"1MiB"`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: S<String>,
    pub region: S<String>,
    pub zone: Option<S<String>>,
    /// Required, unless `reverse` (then the peer dials this node).
    pub address: Option<S<String>>,
    pub identity: S<String>,
    #[serde(default)]
    pub services: Vec<S<String>>,
    /// The link is opened by the side that has the other's address (a site that can
    /// only dial out), and serves the other side's requests.
    pub reverse: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    pub from: S<String>,
    pub to: S<String>,
    pub methods: Option<Vec<S<String>>>,
}
