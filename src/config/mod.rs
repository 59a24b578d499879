//! The one TOML file: parsed into [`raw`] types that keep positions, checked for every
//! problem at once ([`diag`]), and compiled into the runtime [`Config`].

mod check;
pub mod diag;
pub mod raw;
pub mod units;

use crate::schema::compile as schema;
pub use crate::schema::compile::{JsonRoute, MethodSchema, ProtoSchema, Segment};

use crate::identity::{self, TlsFiles};
use diag::{Report, Sink};
use ipnet::IpNet;
use raw::{RawConfig, SizeValue, S};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A checked, compiled configuration: what the daemon runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// Hash of the file's text, for the `fedport_config_info` metric and `/config`.
    pub hash: String,
    pub node: Node,
    pub tls: Option<Tls>,
    pub admin: Option<SocketAddr>,
    /// Monitoring ranges admitted to the admin port besides loopback (empty: any).
    pub admin_allow: Vec<IpNet>,
    pub listeners: Vec<Listener>,
    pub services: Vec<Service>,
    pub peers: Vec<Peer>,
    pub rules: Vec<Rule>,
    pub spikes: Spikes,
    pub tracing: Tracing,
    /// `[[limit]]`, in order: the first that matches an identity applies.
    pub limits: Vec<IdentityLimit>,
    /// Where peers and the services they host are found besides `[[peer]]`.
    pub registry: Option<Registry>,
}

/// An etcd registry: this node registers itself under a lease it keeps alive, and
/// watches the prefix for the others (`src/registry`).
#[derive(Debug, Clone, PartialEq)]
pub struct Registry {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ttl: Duration,
    pub advertise: Option<String>,
    pub ca: Option<PathBuf>,
    /// Client certificate and key for etcd.
    pub client: Option<(PathBuf, PathBuf)>,
    /// The identity pattern members' identities must match (`members`); `None`: this
    /// node's own identity with its last segment or label `*`.
    pub members: Option<String>,
}

/// Trace export (`[tracing]`): finished spans of sampled traces go to an OTLP/HTTP
/// collector as JSON.
#[derive(Debug, Clone)]
pub struct Tracing {
    /// `(host, port, path)` of the OTLP/HTTP traces endpoint.
    pub otlp: Option<(String, u16, String)>,
    pub service_name: String,
    /// The share of traces started here that are sampled.
    pub sample: f64,
}

/// Traffic-spike detection (`[spikes]`).
#[derive(Debug, Clone)]
pub struct Spikes {
    /// Nothing is judged before this much traffic history.
    pub warmup: Duration,
    /// The baseline's memory (EWMA span).
    pub window: Duration,
    /// Deviations from the baseline that make a departure.
    pub sensitivity: f64,
    /// How long a departure must last to start (and a return to end) an event.
    pub sustain: Duration,
    /// Requests per second below which nothing is a spike.
    pub min_rate: f64,
    /// An error ratio below this is never a spike.
    pub min_error_ratio: f64,
}

impl Default for Spikes {
    fn default() -> Self {
        Self {
            warmup: Duration::from_secs(30),
            window: Duration::from_secs(30),
            sensitivity: 4.0,
            sustain: Duration::from_secs(3),
            min_rate: 10.0,
            min_error_ratio: 0.05,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub region: String,
    pub zone: Option<String>,
    pub workers: usize,
    pub drain_timeout: Duration,
    /// After a binary upgrade, how long the old process serves connections that stay
    /// busy (idle ones move at once) before draining them.
    pub upgrade_drain_timeout: Duration,
    pub upstream_max_requests: u64,
    pub upstream_connections: usize,
    /// The share of requests with an access log line (0: none, 1: all).
    pub access_log: f64,
    /// `access_log_file`: where the access log's lines go instead of the log.
    pub access_log_file: Option<PathBuf>,
    /// What a call no rule allows gets, for services that do not say.
    pub authorization: Authorization,
    /// Per-request metrics are recorded (off only to measure what they cost).
    pub request_metrics: bool,
    /// Requests from peers may be forwarded on to other peers.
    pub transit: bool,
    pub max_hops: u8,
    /// Retry budget: retries per request sent, and per second whatever the traffic.
    pub retry_ratio: f64,
    pub retry_min_per_second: f64,
    pub peer_ping_interval: Duration,
    pub peer_ping_timeout: Duration,
    /// Bytes the node may hold for callers (`src/limits/memory.rs`).
    pub memory_budget: u64,
}

/// Active health checking of a service's endpoints.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// HTTP: the path asked; gRPC: the service name asked of grpc.health.v1.
    pub path: String,
    pub grpc_service: String,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// Passive outlier ejection of a service's endpoints.
#[derive(Debug, Clone)]
pub struct Outlier {
    pub consecutive_failures: u32,
    /// First ejection; each further one in a row doubles it (at most 5 minutes).
    pub ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection: Duration::from_secs(10),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub files: TlsFiles,
    /// TLS 1.2 (AEAD suites only) is accepted besides 1.3.
    pub allow_tls12: bool,
    pub crl: Option<PathBuf>,
    pub handshake_timeout: Duration,
    /// `[[trust_domain]]`: the other organisations' bundles, each vouching only for
    /// its own domain's identities.
    pub trust_domains: Vec<crate::identity::domains::DomainSpec>,
    /// `[bundle_endpoint]`: this node serves its own domain's bundle.
    pub serve_bundle: Option<ServeBundle>,
}

/// Where and how this node serves its own trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeBundle {
    pub bind: std::net::SocketAddr,
    pub refresh_hint: Duration,
}

/// What a call that no `[[allow]]` rule allows gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Authorization {
    /// Refused: 403 / PERMISSION_DENIED.
    #[default]
    Enforce,
    /// Served, and counted and logged as `would_deny`: to try default-deny rules on
    /// live traffic before enforcing them.
    Audit,
}

impl Authorization {
    pub fn as_str(self) -> &'static str {
        match self {
            Authorization::Enforce => "enforce",
            Authorization::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The internal port: TLS 1.3 with a verified client certificate.
    Peer,
    /// Loopback only, cleartext HTTP/1.1 and HTTP/2, identity `local`.
    Local,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub role: Role,
    /// Source addresses admitted; empty means any.
    pub allow: Vec<IpNet>,
    /// Balancer addresses whose PROXY protocol header is believed; `None`: no PROXY protocol.
    pub proxy_trusted: Option<Vec<IpNet>>,
    /// A dedicated listener routes everything to this service.
    pub service: Option<String>,
    pub max_connections: usize,
    /// How long a trusted balancer may take to send the PROXY header.
    pub proxy_timeout: Duration,
    /// A connection with nothing in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// How long request headers may take to arrive once started (slowloris).
    pub header_timeout: Duration,
    /// A stream (an HTTP/1.1 connection with a request in flight) with no body bytes
    /// moving either way for this long is reset (closed).
    pub stream_idle_timeout: Duration,
    /// Bytes one connection's requests may hold at once.
    pub connection_memory_budget: u64,
}

/// A rate limit (token bucket: `rate` per second, `burst` at once) and a concurrency
/// limit (requests in flight); either may be absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub concurrency: Option<usize>,
}

/// `[[limit]]`: limits each identity matching `from` gets for itself.
#[derive(Debug, Clone)]
pub struct IdentityLimit {
    pub from: String,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
    /// Bytes spliced to `tcp://` endpoints, through a listener dedicated to the service.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `http://`: HTTP/1.1 cleartext.
    Http1,
    /// `h2c://`: HTTP/2 cleartext, prior knowledge.
    H2c,
    /// `https://`: TLS, ALPN h2 preferred.
    Https,
    /// `tcp://`: a TCP service's endpoint, bytes spliced as they come.
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub url: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The zone it is in; `None`: the node's own.
    pub zone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    /// `locality_weights`: shares of the traffic by zone (empty: the node's zone first).
    pub locality_weights: Vec<(String, u32)>,
    /// `zone_spill_below`: the healthy share of the node's zone under which traffic
    /// spills to the other zones.
    pub zone_spill_below: f64,
    /// Fully qualified gRPC service names (`pkg.Service`) this service hosts.
    pub grpc_services: Vec<String>,
    pub formats: Vec<String>,
    pub max_message_bytes: Option<u64>,
    pub timeout: Duration,
    /// JSON Schema validation by route (`schema.json`).
    pub json: Vec<JsonRoute>,
    /// Protobuf validation of gRPC requests (`schema.proto` / `descriptor_set`).
    pub proto: Option<ProtoSchema>,
    /// `grpc-encoding`s accepted besides `identity` (default: gzip).
    pub encodings: Vec<String>,
    /// Methods that may be sent twice (retried after they may have reached a service).
    pub idempotent: crate::grammar::Methods,
    /// Peer names or regions to try first, in order, when no local endpoint is healthy.
    pub failover: Vec<String>,
    pub health: Option<HealthCheck>,
    pub outlier: Outlier,
    /// Rate and concurrency for the whole service.
    pub limits: Limits,
    /// What its endpoints are told as `Host` / `:authority`: always this, never what
    /// the caller sent.
    pub authority: String,
    /// Overrides the listener's `stream_idle_timeout` for streams to this service.
    pub stream_idle_timeout: Option<Duration>,
    /// Overrides the node's `authorization`.
    pub authorization: Option<Authorization>,
    /// HTTP/1.1 sockets the node may open to each endpoint, shared evenly among the
    /// workers.
    pub max_connections: usize,
    /// Its endpoints are told `x-forwarded-for` and `x-forwarded-proto` (callers' own
    /// copies are removed either way).
    pub forwarded_headers: bool,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub region: String,
    pub zone: Option<String>,
    /// Empty for a reverse peer that dials this node.
    pub address: String,
    pub identity: String,
    pub services: Vec<String>,
    /// `reverse = true`: one link, opened by the side that has the other's address.
    pub reverse: bool,
}

impl Peer {
    /// This node dials the peer and serves the peer's requests on that link (this node
    /// is the site that can only dial out).
    pub fn dials_reverse(&self) -> bool {
        self.reverse && !self.address.is_empty()
    }

    /// The peer dials this node, and this node's requests to it go over the links the
    /// peer opened.
    pub fn accepts_reverse(&self) -> bool {
        self.reverse && self.address.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub from: String,
    pub to: String,
    pub methods: Vec<String>,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a stream may sit with no body bytes moving before it is reset. Envoy's
/// default is 5 minutes; nginx gives a stalled peer 60 s (`proxy_read_timeout`,
/// `send_timeout`). A stalled stream holds a stream window of memory and a stream of
/// a connection to its service that other callers share, so fedport holds it no
/// longer than nginx would; a service whose streams are silent for longer (long
/// polls, sparse server streams) sets its own.
pub const DEFAULT_STREAM_IDLE: Duration = Duration::from_secs(60);

/// HTTP/1.1 sockets a node may open to one endpoint: each carries one request at a
/// time, so this is also the endpoint's concurrency through this node. Envoy's circuit
/// breaker allows 1024 per cluster; 256 per endpoint keeps a thousand endpoints within
/// a few file-descriptor limits' worth.
pub const DEFAULT_UPSTREAM_CONNECTIONS: usize = 256;

/// What a node may hold for callers, sized for a node with 1 GiB: a quarter of it,
/// leaving the rest for the codec's windows, TLS, the runtime and the schemas.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

/// What one connection's requests may hold: eight gRPC messages of the default 4 MiB
/// limit held for validation at once, so that no one connection can take more than an
/// eighth of the node's budget.
pub const DEFAULT_CONNECTION_MEMORY: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(Report),
}

/// Reads, checks and compiles a config file. Warnings come back beside the config;
/// any error refuses the whole file, with every problem found listed.
pub fn load(path: &Path) -> Result<(Config, Report), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Read(path.to_owned(), e))?;
    compile(path, &text).map_err(LoadError::Invalid)
}

/// Checks and compiles config text; `path` locates relative files and names the file in
/// diagnostics.
pub fn compile(path: &Path, text: &str) -> Result<(Config, Report), Report> {
    let mut sink = Sink::new(path, text);
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_owned();
            let hint = if msg.contains("unknown field") {
                "remove the key or fix its spelling; docs/config.md lists every key"
            } else if msg.contains("missing field") {
                "add the key; docs/config.md says what it means"
            } else if msg.contains("invalid type") || msg.contains("data did not match") {
                "the value has the wrong type; docs/config.md shows an example"
            } else {
                "this is not valid TOML here; check quotes, brackets and commas"
            };
            sink.error(span, msg, hint);
            return Err(sink.report);
        }
    };
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    let cfg = check::Checker {
        sink: &mut sink,
        base,
    }
    .run(raw, path, text);
    let mut report = std::mem::take(&mut sink.report);
    report.sort();
    match cfg {
        Some(c) if report.errors.is_empty() => Ok((c, report)),
        _ => Err(report),
    }
}

pub fn text_hash(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}
