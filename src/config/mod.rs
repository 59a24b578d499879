//! The one TOML file: parsed into [`raw`] types that keep positions, checked for every
//! problem at once ([`diag`]), and compiled into the runtime [`Config`].

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
    pub upstream_max_requests: u64,
    pub upstream_connections: usize,
    /// The share of requests with an access log line (0: none, 1: all).
    pub access_log: f64,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `http://`: HTTP/1.1 cleartext.
    Http1,
    /// `h2c://`: HTTP/2 cleartext, prior knowledge.
    H2c,
    /// `https://`: TLS, ALPN h2 preferred.
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub url: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
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
    pub address: String,
    pub identity: String,
    pub services: Vec<String>,
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
    let cfg = Checker {
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

struct Checker<'a> {
    sink: &'a mut Sink,
    base: PathBuf,
}

fn span<T>(s: &S<T>) -> std::ops::Range<usize> {
    s.span()
}

impl Checker<'_> {
    fn run(&mut self, raw: RawConfig, path: &Path, text: &str) -> Option<Config> {
        let node = self.node(&raw.node);
        let tls = raw.tls.as_ref().map(|t| self.tls(t));
        let admin = raw.admin.as_ref().and_then(|a| {
            let addr = self.socket_addr(&a.get_ref().bind)?;
            if !addr.ip().is_loopback() {
                self.sink.warn(
                    span(&a.get_ref().bind),
                    format!("admin port {addr} is not on loopback"),
                    "the admin port shows config and metrics; bind it to 127.0.0.1 or firewall it to monitoring only",
                );
            }
            Some(addr)
        });

        let admin_allow: Vec<IpNet> = raw
            .admin
            .iter()
            .flat_map(|a| a.get_ref().allow.iter().flatten())
            .filter_map(|c| self.cidr(c))
            .collect();
        let services = self.services(&raw.service);
        let service_names: HashMap<&str, ()> =
            services.iter().map(|s| (s.name.as_str(), ())).collect();
        let listeners = self.listeners(&raw.listener, &service_names, admin);
        let peers = self.peers(&raw.peer);
        let peer_names: HashMap<&str, ()> = peers.iter().map(|p| (p.name.as_str(), ())).collect();
        self.federation(&raw, &peers, &service_names);
        let rules = self.rules(&raw.allow, &service_names, &peer_names);
        if raw.allow.is_empty() && !raw.service.is_empty() && !raw.listener.is_empty() {
            self.sink.warn(
                span(&raw.node),
                "no [[allow]] rule: every request will be refused (default deny)",
                "add [[allow]] from = \"spiffe://DOMAIN/node/*\" to = \"SERVICE\" for the callers that may reach each service",
            );
        }
        if raw.listener.is_empty() {
            self.sink.warn(
                span(&raw.node),
                "no [[listener]] is configured: fedport will accept nothing",
                "add a [[listener]] with a name and a bind address",
            );
        }
        let needs_tls = listeners.iter().any(|l| l.role == Role::Peer);
        if needs_tls && raw.tls.is_none() {
            let first = raw
                .listener
                .iter()
                .find(|l| l.get_ref().role.as_ref().map(|r| r.get_ref().as_str()) != Some("local"));
            if let Some(l) = first {
                self.sink.error(
                    span(l),
                    format!("peer listener {:?} needs mutual TLS but there is no [tls] section", l.get_ref().name.get_ref()),
                    "add [tls] with cert, key and ca, or make the listener role = \"local\" on loopback",
                );
            }
        }

        let spikes = raw
            .spikes
            .as_ref()
            .map(|s| self.spikes(s))
            .unwrap_or_default();
        let tracing = self.tracing(raw.tracing.as_ref());
        let registry = raw.registry.as_ref().map(|r| self.registry(r, &raw.peer));
        let limits = raw
            .limit
            .iter()
            .map(|l| {
                let r = l.get_ref();
                if !raw
                    .peer
                    .iter()
                    .any(|p| p.get_ref().name.get_ref() == r.from.get_ref())
                {
                    self.identity_pattern(&r.from);
                }
                IdentityLimit {
                    from: r.from.get_ref().clone(),
                    limits: self.limits(r.rate.as_ref(), r.burst.as_ref(), r.concurrency.as_ref()),
                }
            })
            .collect();
        let tls = tls.flatten();
        let node = node?;
        if self.sink.has_errors() {
            return None;
        }
        Some(Config {
            path: path.to_owned(),
            hash: text_hash(text),
            node,
            tls,
            admin,
            admin_allow,
            listeners,
            services,
            peers,
            rules,
            spikes,
            tracing,
            limits,
            registry,
        })
    }

    fn registry(&mut self, r: &raw::RawRegistry, static_peers: &[S<raw::RawPeer>]) -> Registry {
        let e = r.etcd.get_ref();
        if e.endpoints.is_empty() {
            self.sink.error(
                span(&r.etcd),
                "the etcd registry has no endpoints",
                "endpoints = [\"http://127.0.0.1:2379\"] (every member's client URL)",
            );
        }
        let mut endpoints = Vec::new();
        for ep in &e.endpoints {
            let v = ep.get_ref();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                self.sink.error(
                    span(ep),
                    format!("etcd endpoint {v:?} is not an http:// or https:// URL"),
                    "e.g. \"http://10.0.0.1:2379\"",
                );
            }
            endpoints.push(v.clone());
        }
        let prefix = e
            .prefix
            .as_ref()
            .map(|p| p.get_ref().trim_end_matches('/').to_owned())
            .unwrap_or_else(|| "/fedport".into());
        let ttl = self.duration(e.ttl.as_ref(), Duration::from_secs(10));
        if ttl < Duration::from_secs(1) {
            if let Some(t) = &e.ttl {
                self.sink.error(
                    span(t),
                    "the lease ttl is at least 1s",
                    "etcd leases count whole seconds; the default is 10s",
                );
            }
        }
        let client = match (&e.cert, &e.key) {
            (Some(c), Some(k)) => Some((self.path(c.get_ref()), self.path(k.get_ref()))),
            (None, None) => None,
            (Some(c), None) | (None, Some(c)) => {
                self.sink.error(
                    span(c),
                    "cert and key for etcd come together",
                    "give both, or neither",
                );
                None
            }
        };
        if !static_peers.is_empty() {
            self.sink.warn(
                span(&r.etcd),
                format!(
                    "{} static [[peer]] {} precedence over registry members with the same name or identity",
                    static_peers.len(),
                    if static_peers.len() == 1 { "entry takes" } else { "entries take" }
                ),
                "the registry adds members; it never overrides what this file says",
            );
        }
        let members = e.members.as_ref().map(|m| {
            let text = m.get_ref();
            match crate::grammar::Pattern::parse(text) {
                Ok(crate::grammar::Pattern::Any | crate::grammar::Pattern::Local) => {
                    self.sink.error(
                        span(m),
                        format!("members = {text:?} would let any caller register as a peer"),
                        "the nodes' identities, e.g. \"spiffe://fed.example/node/*\"",
                    );
                }
                Ok(_) => {}
                Err(err) => self.sink.error(
                    span(m),
                    err.to_string(),
                    "the nodes' identities, e.g. \"spiffe://fed.example/node/*\"",
                ),
            }
            text.clone()
        });
        Registry {
            members,
            endpoints,
            prefix,
            ttl,
            advertise: e.advertise.as_ref().map(|a| a.get_ref().clone()),
            ca: e.ca.as_ref().map(|c| self.path(c.get_ref())),
            client,
        }
    }

    fn tracing(&mut self, t: Option<&S<raw::RawTracing>>) -> Tracing {
        let mut out = Tracing {
            otlp: None,
            service_name: "fedport".into(),
            sample: 1.0,
        };
        let Some(t) = t else { return out };
        let r = t.get_ref();
        if let Some(n) = &r.service_name {
            out.service_name = n.get_ref().clone();
        }
        if let Some(x) = &r.sample {
            if (0.0..=1.0).contains(x.get_ref()) {
                out.sample = *x.get_ref();
            } else {
                self.sink.error(
                    span(x),
                    "sample is a share between 0 and 1",
                    "1 samples every trace started here",
                );
            }
        }
        if let Some(u) = &r.otlp {
            let url = u.get_ref();
            let parsed = url.strip_prefix("http://").and_then(|rest| {
                let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
                let (host, port) = hostport.rsplit_once(':')?;
                let path = if path.is_empty() {
                    "/v1/traces".to_owned()
                } else {
                    format!("/{path}")
                };
                Some((
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port.parse().ok()?,
                    path,
                ))
            });
            match parsed {
                Some(p) => out.otlp = Some(p),
                None => self.sink.error(
                    span(u),
                    format!("OTLP endpoint {url:?} is not http://host:port/path"),
                    "e.g. \"http://127.0.0.1:4318/v1/traces\" (OTLP/HTTP, JSON)",
                ),
            }
            if cfg!(not(feature = "otlp")) {
                self.sink.warn(
                    span(u),
                    "this fedport was built without the otlp feature: spans are not exported",
                    "build with `--features otlp` (on by default)",
                );
            }
        }
        out
    }

    fn spikes(&mut self, s: &S<raw::RawSpikes>) -> Spikes {
        let r = s.get_ref();
        let d = Spikes::default();
        let mut positive = |v: &Option<S<f64>>, default: f64, what: &str| match v {
            Some(x) if !(*x.get_ref() >= 0.0 && x.get_ref().is_finite()) => {
                self.sink.error(
                    span(x),
                    format!("{what} must be a number not below 0"),
                    "see docs/config.md, [spikes]",
                );
                default
            }
            Some(x) => *x.get_ref(),
            None => default,
        };
        let sensitivity = positive(&r.sensitivity, d.sensitivity, "sensitivity");
        let min_rate = positive(&r.min_rate, d.min_rate, "min_rate");
        let min_error_ratio = positive(&r.min_error_ratio, d.min_error_ratio, "min_error_ratio");
        Spikes {
            warmup: self.duration(r.warmup.as_ref(), d.warmup),
            window: self.duration(r.window.as_ref(), d.window),
            sensitivity,
            sustain: self.duration(r.sustain.as_ref(), d.sustain),
            min_rate,
            min_error_ratio,
        }
    }

    fn node(&mut self, n: &S<raw::RawNode>) -> Option<Node> {
        let r = n.get_ref();
        self.name(&r.name, "node");
        let workers = match &r.workers {
            Some(w) if *w.get_ref() < 1 || *w.get_ref() > 1024 => {
                self.sink.error(
                    span(w),
                    "workers must be between 1 and 1024",
                    "leave it out for one worker per core",
                );
                1
            }
            Some(w) => *w.get_ref() as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let drain_timeout = self.duration(r.drain_timeout.as_ref(), Duration::from_secs(30));
        let upstream_max_requests = match &r.upstream_max_requests {
            Some(v) if *v.get_ref() < 1 => {
                self.sink.error(
                    span(v),
                    "upstream_max_requests must be at least 1",
                    "the default is 100000",
                );
                1
            }
            Some(v) => *v.get_ref() as u64,
            None => 100_000,
        };
        let upstream_connections = match &r.upstream_connections {
            Some(v) if *v.get_ref() < 1 || *v.get_ref() > 64 => {
                self.sink.error(
                    span(v),
                    "upstream_connections must be between 1 and 64",
                    "the default is 2 per worker per endpoint",
                );
                1
            }
            Some(v) => *v.get_ref() as usize,
            None => 2,
        };
        let max_hops = match &r.max_hops {
            Some(v) if !(1..=16).contains(v.get_ref()) => {
                self.sink.error(
                    span(v),
                    "max_hops must be between 1 and 16",
                    "the default, 2, lets a request cross to a peer and one transit node",
                );
                2
            }
            Some(v) => *v.get_ref() as u8,
            None => 2,
        };
        let (mut retry_ratio, mut retry_min_per_second) = (0.2, 10.0);
        if let Some(b) = &r.retry_budget {
            if let Some(x) = &b.get_ref().ratio {
                if !(0.0..=1.0).contains(x.get_ref()) {
                    self.sink.error(
                        span(x),
                        "retry_budget.ratio must be between 0 and 1",
                        "0.2 allows retries to add at most 20% to the load",
                    );
                } else {
                    retry_ratio = *x.get_ref();
                }
            }
            if let Some(x) = &b.get_ref().min_per_second {
                if *x.get_ref() < 0 {
                    self.sink.error(
                        span(x),
                        "retry_budget.min_per_second must not be negative",
                        "the default is 10",
                    );
                } else {
                    retry_min_per_second = *x.get_ref() as f64;
                }
            }
        }
        Some(Node {
            name: r.name.get_ref().clone(),
            region: r.region.get_ref().clone(),
            zone: r.zone.as_ref().map(|z| z.get_ref().clone()),
            workers,
            drain_timeout,
            upstream_max_requests,
            upstream_connections,
            access_log: match r.access_log.as_ref().map(|a| (a, *a.get_ref())) {
                None | Some((_, raw::AccessLog::All(false))) => 0.0,
                Some((_, raw::AccessLog::All(true))) => 1.0,
                Some((_, raw::AccessLog::Sample(x))) if (0.0..=1.0).contains(&x) => x,
                Some((a, raw::AccessLog::Sample(_))) => {
                    self.sink.error(
                        span(a),
                        "access_log is true, false, or the share of requests to log (0 to 1)",
                        "e.g. access_log = 0.01 logs one request in a hundred",
                    );
                    0.0
                }
            },
            request_metrics: r.request_metrics.unwrap_or(true),
            transit: r.transit.unwrap_or(false),
            max_hops,
            retry_ratio,
            retry_min_per_second,
            peer_ping_interval: self
                .duration(r.peer_ping_interval.as_ref(), Duration::from_secs(1)),
            peer_ping_timeout: self.duration(r.peer_ping_timeout.as_ref(), Duration::from_secs(1)),
            memory_budget: self.size(r.memory_budget.as_ref(), DEFAULT_MEMORY_BUDGET),
        })
    }

    /// What peers offer must be declared here (routes and schemas are local), every
    /// service must be reachable somewhere, and failover names peers or regions.
    fn federation(&mut self, raw: &RawConfig, peers: &[Peer], services: &HashMap<&str, ()>) {
        for p in &raw.peer {
            for s in &p.get_ref().services {
                if !services.contains_key(s.get_ref().as_str()) {
                    self.sink.error(
                        span(s),
                        format!("peer {:?} offers service {:?}, which is not declared here", p.get_ref().name.get_ref(), s.get_ref()),
                        "declare it as a [[service]] (its routes and schema; endpoints may be empty when only peers host it)",
                    );
                }
            }
        }
        for s in &raw.service {
            let r = s.get_ref();
            let name = r.name.get_ref();
            let offered = peers.iter().any(|p| p.services.contains(name));
            if r.endpoints.is_empty() && !offered && raw.registry.is_some() {
                self.sink.warn(
                    span(&r.name),
                    format!("service {name:?} has no endpoints and no static peer offers it: only registry members can serve it"),
                    "until a member that hosts it registers, calls are refused with 503",
                );
            } else if r.endpoints.is_empty() && !offered {
                self.sink.error(
                    span(&r.name),
                    format!("service {name:?} has no endpoints and no peer offers it"),
                    "give it endpoints, or list it in the services of the [[peer]] that hosts it",
                );
            }
            for f in r.failover.iter().flatten() {
                let v = f.get_ref();
                if !peers.iter().any(|p| &p.name == v || &p.region == v) && raw.registry.is_none() {
                    self.sink.error(
                        span(f),
                        format!("failover target {v:?} is neither a peer nor a peer's region"),
                        "name a [[peer]] or the region of one",
                    );
                } else if !peers
                    .iter()
                    .any(|p| (&p.name == v || &p.region == v) && p.services.contains(name))
                {
                    self.sink.warn(
                        span(f),
                        format!("failover target {v:?} does not offer service {name:?}"),
                        "add the service to that peer's services, or remove the target",
                    );
                }
            }
        }
    }

    fn limits(
        &mut self,
        rate: Option<&S<i64>>,
        burst: Option<&S<i64>>,
        concurrency: Option<&S<i64>>,
    ) -> Limits {
        let mut positive = |v: Option<&S<i64>>, what: &str| match v {
            Some(x) if !(1..=u32::MAX as i64).contains(x.get_ref()) => {
                self.sink.error(
                    span(x),
                    format!("{what} must be a positive whole number"),
                    "see [[limit]] in docs/config.md",
                );
                None
            }
            Some(x) => Some(*x.get_ref() as u32),
            None => None,
        };
        let rate = positive(rate, "rate");
        let burst = positive(burst, "burst");
        let concurrency = positive(concurrency, "concurrency").map(|c| c as usize);
        Limits {
            rate,
            burst,
            concurrency,
        }
    }

    fn health(&mut self, h: &S<raw::RawHealth>) -> HealthCheck {
        let r = h.get_ref();
        let interval = self.duration(r.interval.as_ref(), Duration::from_secs(5));
        let timeout = self.duration(r.timeout.as_ref(), Duration::from_secs(1));
        let mut threshold = |v: &Option<S<i64>>, default: u32| match v {
            Some(n) if !(1..=100).contains(n.get_ref()) => {
                self.sink.error(
                    span(n),
                    "a health threshold is between 1 and 100 checks",
                    "the defaults: 2 failures mark unhealthy, 2 successes healthy again",
                );
                default
            }
            Some(n) => *n.get_ref() as u32,
            None => default,
        };
        HealthCheck {
            interval,
            timeout,
            path: r
                .path
                .as_ref()
                .map_or("/healthz".into(), |p| p.get_ref().clone()),
            grpc_service: r
                .grpc_service
                .as_ref()
                .map_or(String::new(), |p| p.get_ref().clone()),
            unhealthy_threshold: threshold(&r.unhealthy_threshold, 2),
            healthy_threshold: threshold(&r.healthy_threshold, 2),
        }
    }

    fn outlier(&mut self, o: &S<raw::RawOutlier>) -> Outlier {
        let r = o.get_ref();
        let d = Outlier::default();
        let consecutive_failures = match &r.consecutive_failures {
            Some(n) if *n.get_ref() < 1 => {
                self.sink.error(
                    span(n),
                    "consecutive_failures must be at least 1",
                    "the default is 5",
                );
                d.consecutive_failures
            }
            Some(n) => *n.get_ref() as u32,
            None => d.consecutive_failures,
        };
        let max_ejected_percent = match &r.max_ejected_percent {
            Some(n) if !(0..=100).contains(n.get_ref()) => {
                self.sink.error(
                    span(n),
                    "max_ejected_percent is between 0 and 100",
                    "the default is 50",
                );
                d.max_ejected_percent
            }
            Some(n) => *n.get_ref() as u32,
            None => d.max_ejected_percent,
        };
        Outlier {
            consecutive_failures,
            ejection: self.duration(r.ejection.as_ref(), d.ejection),
            max_ejected_percent,
        }
    }

    fn name(&mut self, n: &S<String>, what: &str) {
        let s = n.get_ref();
        if s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            self.sink.error(
                span(n),
                format!("{what} name {s:?} is not a valid name"),
                "use letters, digits, '-', '_' and '.' only",
            );
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn duration(&mut self, v: Option<&S<String>>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match units::parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(e) => {
                    self.sink.error(
                        span(s),
                        e,
                        "write a number with a unit: \"250ms\", \"2s\", \"1m\"",
                    );
                    default
                }
            },
        }
    }

    /// A size (`"32MiB"`, or bytes) that must not be zero.
    fn size(&mut self, v: Option<&S<SizeValue>>, default: u64) -> u64 {
        let Some(m) = v else { return default };
        let n = match m.get_ref() {
            SizeValue::Bytes(n) if *n > 0 => Ok(*n as u64),
            SizeValue::Bytes(_) => Err("a size must be more than 0".to_owned()),
            SizeValue::Text(t) => units::parse_size(t),
        };
        match n {
            Ok(0) | Err(_) => {
                let e = n
                    .err()
                    .unwrap_or_else(|| "a size must be more than 0".into());
                self.sink.error(
                    span(m),
                    e,
                    "write a size such as \"32MiB\", \"512KiB\" or a number of bytes",
                );
                default
            }
            Ok(n) => n,
        }
    }

    /// A duration that must not be zero.
    fn nonzero_duration(&mut self, v: Option<&S<String>>, default: Duration) -> Duration {
        let d = self.duration(v, default);
        if d.is_zero() {
            if let Some(s) = v {
                self.sink
                    .error(span(s), "this timeout must be more than 0", "e.g. \"60s\"");
            }
            return default;
        }
        d
    }

    fn socket_addr(&mut self, s: &S<String>) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.sink.error(
                    span(s),
                    format!("{:?} is not an address:port", s.get_ref()),
                    "write an IP address and a port: \"127.0.0.1:7443\" or \"[::1]:7443\"",
                );
                None
            }
        }
    }

    fn cidr(&mut self, s: &S<String>) -> Option<IpNet> {
        let t = s.get_ref().trim();
        let parsed = t
            .parse::<IpNet>()
            .ok()
            .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from));
        if parsed.is_none() {
            self.sink.error(
                span(s),
                format!("{t:?} is not a CIDR range"),
                "write an address range such as \"10.0.0.0/8\", \"127.0.0.1/32\" or \"fd00::/8\"",
            );
        }
        parsed
    }

    fn tls(&mut self, t: &S<raw::RawTls>) -> Option<Tls> {
        let r = t.get_ref();
        let files = TlsFiles {
            cert: self.path(r.cert.get_ref()),
            key: self.path(r.key.get_ref()),
            ca: self.path(r.ca.get_ref()),
        };
        let handshake_timeout =
            self.duration(r.handshake_timeout.as_ref(), Duration::from_secs(10));
        let mut ok = true;
        match identity::check_cert_file(&files.cert) {
            Ok((_, not_after)) => {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left < Duration::from_secs(14 * 86_400) {
                    self.sink.warn(
                        span(&r.cert),
                        format!(
                            "certificate {} expires in {} days",
                            files.cert.display(),
                            left.as_secs() / 86_400
                        ),
                        "rotate it soon: fedport reloads certificates without a restart",
                    );
                }
            }
            Err(e) => {
                ok = false;
                self.sink.error(span(&r.cert), e.to_string(), cert_hint(&e));
            }
        }
        match identity::check_cert_file(&files.ca) {
            Ok(_) => {}
            Err(e) => {
                ok = false;
                self.sink.error(span(&r.ca), e.to_string(), cert_hint(&e));
            }
        }
        match identity::load_key(&files.key) {
            Err(e) => {
                ok = false;
                self.sink.error(
                    span(&r.key),
                    e.to_string(),
                    "the key file must hold a PEM private key (PKCS#8, PKCS#1 or SEC1)",
                );
            }
            Ok(_) if ok => {
                if let Err(e) = identity::load_certified_key(&files) {
                    ok = false;
                    self.sink.error(
                        span(&r.key),
                        e.to_string(),
                        "the key must be the private half of the certificate's public key",
                    );
                }
            }
            Ok(_) => {}
        }
        let crl = r.crl.as_ref().map(|c| {
            let p = self.path(c.get_ref());
            if let Err(e) = identity::load_crls(&p) {
                self.sink.error(
                    span(c),
                    e.to_string(),
                    "give the path of a PEM CRL signed by the federation CA",
                );
            }
            p
        });
        let allow_tls12 = match r.min_version.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "1.3")) => false,
            Some((_, "1.2")) => true,
            Some((v, other)) => {
                self.sink.error(
                    span(v),
                    format!("unsupported TLS min_version {other:?}"),
                    "min_version is \"1.3\" (the default) or \"1.2\"",
                );
                false
            }
        };
        ok.then_some(Tls {
            files,
            allow_tls12,
            crl,
            handshake_timeout,
        })
    }

    fn listeners(
        &mut self,
        raw: &[S<raw::RawListener>],
        services: &HashMap<&str, ()>,
        admin: Option<SocketAddr>,
    ) -> Vec<Listener> {
        let mut out = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut binds: Vec<(SocketAddr, String)> = admin
            .map(|a| (a, "the admin port".to_owned()))
            .into_iter()
            .collect();
        for l in raw {
            let r = l.get_ref();
            self.name(&r.name, "listener");
            if names.insert(r.name.get_ref().clone(), ()).is_some() {
                self.sink.error(
                    span(&r.name),
                    format!("listener name {:?} is used twice", r.name.get_ref()),
                    "give every listener its own name",
                );
            }
            let role = match r.role.as_ref().map(|s| s.get_ref().as_str()) {
                None | Some("peer") => Role::Peer,
                Some("local") => Role::Local,
                Some(other) => {
                    let s = r.role.as_ref().map(span).unwrap_or(0..0);
                    self.sink.error(s, format!("unknown listener role {other:?}"), "role is \"peer\" (mutual TLS, the default) or \"local\" (loopback, cleartext)");
                    Role::Peer
                }
            };
            let allow: Vec<IpNet> = r
                .allow
                .iter()
                .flatten()
                .filter_map(|c| self.cidr(c))
                .collect();
            let proxy_trusted = r.proxy_protocol.as_ref().map(|p| {
                p.get_ref()
                    .trusted
                    .iter()
                    .filter_map(|c| self.cidr(c))
                    .collect::<Vec<_>>()
            });
            let Some(bind) = self.socket_addr(&r.bind) else {
                continue;
            };
            if role == Role::Local && !bind.ip().is_loopback() {
                self.sink.error(
                    span(&r.bind),
                    format!("listener {:?} has no mutual TLS (role = \"local\") but binds {bind}, which is not loopback", r.name.get_ref()),
                    "a local listener must bind 127.0.0.1 or ::1; use role = \"peer\" for a port other hosts reach",
                );
            }
            for (other, who) in &binds {
                let same_port = other.port() == bind.port() && bind.port() != 0;
                // listeners bind IPv6 addresses v6-only, so 0.0.0.0:P and [::]:P are
                // two ports; the admin port on [::] is dual-stack and takes both
                let admin = who == "the admin port";
                let families = other.is_ipv4() == bind.is_ipv4()
                    || (admin && other.ip().is_unspecified() && other.is_ipv6());
                let overlap = families
                    && (other.ip() == bind.ip()
                        || other.ip().is_unspecified()
                        || bind.ip().is_unspecified());
                if same_port && overlap {
                    self.sink.error(
                        span(&r.bind),
                        format!("{bind} overlaps {who} ({other})"),
                        "every listener needs a port of its own",
                    );
                }
            }
            binds.push((bind, format!("listener {:?}", r.name.get_ref())));
            if role == Role::Peer {
                for c in r.allow.iter().flatten() {
                    if matches!(c.get_ref().trim(), "0.0.0.0/0" | "::/0") {
                        self.sink.warn(span(c), format!("peer listener {:?} admits every address ({})", r.name.get_ref(), c.get_ref()), "list the federation's own ranges; an internal port is never a public endpoint");
                    }
                }
            }
            let proxy_timeout = self.duration(
                r.proxy_protocol
                    .as_ref()
                    .and_then(|p| p.get_ref().timeout.as_ref()),
                Duration::from_secs(3),
            );
            let idle_timeout = self.duration(r.idle_timeout.as_ref(), Duration::from_secs(300));
            let header_timeout = self.duration(r.header_timeout.as_ref(), Duration::from_secs(10));
            let stream_idle_timeout =
                self.nonzero_duration(r.stream_idle_timeout.as_ref(), DEFAULT_STREAM_IDLE);
            let max_connections = match &r.max_connections {
                Some(m) if *m.get_ref() < 1 => {
                    self.sink.error(
                        span(m),
                        "max_connections must be at least 1",
                        "the default is 10000",
                    );
                    1
                }
                Some(m) => *m.get_ref() as usize,
                None => 10_000,
            };
            if let Some(s) = &r.service {
                if !services.contains_key(s.get_ref().as_str()) {
                    self.sink.error(
                        span(s),
                        format!(
                            "listener {:?} is dedicated to unknown service {:?}",
                            r.name.get_ref(),
                            s.get_ref()
                        ),
                        &known(services, "services"),
                    );
                }
            }
            let max_streams = match &r.max_streams {
                Some(m) if !(1..=100_000).contains(m.get_ref()) => {
                    self.sink.error(
                        span(m),
                        "max_streams is between 1 and 100000",
                        "the default is 1024",
                    );
                    1024
                }
                Some(m) => *m.get_ref() as u32,
                None => 1024,
            };
            out.push(Listener {
                max_streams,
                name: r.name.get_ref().clone(),
                bind,
                role,
                allow,
                proxy_trusted,
                service: r.service.as_ref().map(|s| s.get_ref().clone()),
                max_connections,
                proxy_timeout,
                idle_timeout,
                header_timeout,
                stream_idle_timeout,
                connection_memory_budget: self.size(
                    r.connection_memory_budget.as_ref(),
                    DEFAULT_CONNECTION_MEMORY,
                ),
            });
        }
        out
    }

    fn services(&mut self, raw: &[S<raw::RawService>]) -> Vec<Service> {
        let mut out = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut grpc_owner: BTreeMap<String, String> = BTreeMap::new();
        for s in raw {
            let r = s.get_ref();
            self.name(&r.name, "service");
            if names.insert(r.name.get_ref().clone(), ()).is_some() {
                self.sink.error(
                    span(&r.name),
                    format!("service name {:?} is used twice", r.name.get_ref()),
                    "give every service its own name",
                );
            }
            let protocol = match r.protocol.get_ref().as_str() {
                "grpc" => Protocol::Grpc,
                "http" => Protocol::Http,
                other => {
                    self.sink.error(
                        span(&r.protocol),
                        format!("unknown protocol {other:?}"),
                        "protocol is \"grpc\" or \"http\"",
                    );
                    Protocol::Http
                }
            };
            let mut endpoints = Vec::new();
            for e in &r.endpoints {
                if let Some(ep) = self.endpoint(e) {
                    if protocol == Protocol::Grpc && ep.scheme == Scheme::Http1 {
                        self.sink.error(
                            span(e),
                            format!(
                                "gRPC service {:?} needs HTTP/2, but {} is HTTP/1.1",
                                r.name.get_ref(),
                                ep.url
                            ),
                            "use h2c://host:port for cleartext HTTP/2 or https:// for TLS",
                        );
                    }
                    endpoints.push(ep);
                }
            }
            let mut grpc_services: Vec<String> = r
                .grpc_services
                .iter()
                .flatten()
                .map(|g| g.get_ref().clone())
                .collect();
            let mut json = Vec::new();
            let mut proto = None;
            if let Some(schema) = &r.schema {
                grpc_services.extend(self.schema(schema, &mut json, &mut proto));
            }
            grpc_services.sort();
            grpc_services.dedup();
            for g in &grpc_services {
                if let Some(prev) = grpc_owner.insert(g.clone(), r.name.get_ref().clone()) {
                    self.sink.error(
                        span(&r.name),
                        format!(
                            "gRPC service {g} is hosted by both {prev:?} and {:?}",
                            r.name.get_ref()
                        ),
                        "a gRPC service name must route to one fedport service",
                    );
                }
            }
            if protocol == Protocol::Grpc && grpc_services.is_empty() {
                self.sink.warn(span(&r.name), format!("gRPC service {:?} declares no gRPC services: it is reachable only on a dedicated listener", r.name.get_ref()), "add grpc_services = [\"pkg.Service\"] or schema = { proto = [...] }");
            }
            let max_message_bytes = r.max_message_bytes.as_ref().and_then(|m| {
                let v = match m.get_ref() {
                    SizeValue::Bytes(n) if *n >= 0 => Ok(*n as u64),
                    SizeValue::Bytes(_) => Err("size must not be negative".to_owned()),
                    SizeValue::Text(t) => units::parse_size(t),
                };
                v.map_err(|e| {
                    self.sink.error(
                        span(m),
                        e,
                        "write a size such as \"1MiB\", \"512KiB\" or a number of bytes",
                    )
                })
                .ok()
            });
            let timeout = self.duration(r.timeout.as_ref(), DEFAULT_TIMEOUT);
            let mut encodings = Vec::new();
            for e in r.encodings.iter().flatten() {
                let name = e.get_ref().to_ascii_lowercase();
                if name == "identity" {
                    continue;
                }
                if proto.is_some() && name != "gzip" {
                    self.sink.error(
                        span(e),
                        format!("messages in grpc-encoding {name:?} cannot be validated against the service's proto schema"),
                        "fedport decompresses gzip to validate; list only \"gzip\" (or \"identity\")",
                    );
                }
                encodings.push(name);
            }
            if r.encodings.is_none() {
                encodings.push("gzip".to_owned());
            }
            let mut idempotent: Vec<crate::grammar::MethodRule> = if protocol == Protocol::Http {
                ["GET /", "HEAD /", "OPTIONS /"]
                    .iter()
                    .filter_map(|m| crate::grammar::MethodRule::parse(m).ok())
                    .collect()
            } else {
                Vec::new()
            };
            for m in r.idempotent.iter().flatten() {
                if let Some(rule) = self.method_rule(m, "idempotent") {
                    idempotent.push(rule);
                }
            }
            let health = r.health.as_ref().map(|h| self.health(h));
            let outlier = match &r.outlier {
                Some(o) => self.outlier(o),
                None => Outlier::default(),
            };
            let limits = r
                .limits
                .as_ref()
                .map(|l| {
                    let l = l.get_ref();
                    self.limits(l.rate.as_ref(), l.burst.as_ref(), l.concurrency.as_ref())
                })
                .unwrap_or_default();
            let authority = match &r.authority {
                None => r.name.get_ref().clone(),
                Some(a) => {
                    let v = a.get_ref();
                    let ok = v.parse::<http::uri::Authority>().is_ok()
                        && !v.contains('@')
                        && !v.is_empty();
                    if !ok {
                        self.sink.error(
                            span(a),
                            format!("authority {v:?} is not host[:port]"),
                            "e.g. authority = \"inventory.internal.example\" (what the service's endpoints are told as Host)",
                        );
                    }
                    v.clone()
                }
            };
            let stream_idle_timeout = r
                .stream_idle_timeout
                .as_ref()
                .map(|t| self.nonzero_duration(Some(t), DEFAULT_STREAM_IDLE));
            let max_connections = match &r.max_connections {
                Some(m) if !(1..=1_000_000).contains(m.get_ref()) => {
                    self.sink.error(
                        span(m),
                        "max_connections is between 1 and 1000000",
                        "the default is 256 HTTP/1.1 connections per endpoint",
                    );
                    DEFAULT_UPSTREAM_CONNECTIONS
                }
                Some(m) => *m.get_ref() as usize,
                None => DEFAULT_UPSTREAM_CONNECTIONS,
            };
            out.push(Service {
                forwarded_headers: r.forwarded_headers.unwrap_or(false),
                max_connections,
                stream_idle_timeout,
                authority,
                limits,
                idempotent: crate::grammar::Methods::Some(idempotent),
                failover: r
                    .failover
                    .iter()
                    .flatten()
                    .map(|f| f.get_ref().clone())
                    .collect(),
                health,
                outlier,
                encodings,
                name: r.name.get_ref().clone(),
                protocol,
                endpoints,
                grpc_services,
                formats: r
                    .formats
                    .iter()
                    .flatten()
                    .map(|f| f.get_ref().clone())
                    .collect(),
                max_message_bytes,
                timeout,
                json,
                proto,
            });
        }
        out
    }

    /// Compiles the service's proto files and JSON Schema routes (`schema::compile`);
    /// returns the gRPC services the proto files declare.
    fn schema(
        &mut self,
        s: &S<raw::RawSchema>,
        json: &mut Vec<JsonRoute>,
        proto: &mut Option<ProtoSchema>,
    ) -> Vec<String> {
        let r = s.get_ref();
        let mut pools = Vec::new();
        let refused = |sink: &mut diag::Sink, at, e: schema::CompileError| {
            sink.error(at, e.to_string(), e.hint())
        };
        for p in r.proto.iter().flatten() {
            let file = self.path(p.get_ref());
            let mut includes: Vec<PathBuf> = r
                .include
                .iter()
                .flatten()
                .map(|i| self.path(i.get_ref()))
                .collect();
            includes.push(file.parent().map(Path::to_owned).unwrap_or_default());
            match schema::proto(&file, &includes) {
                Ok(pool) => pools.push(pool),
                Err(e) => refused(self.sink, span(p), e),
            }
        }
        if let Some(d) = &r.descriptor_set {
            match schema::descriptor_set(&self.path(d.get_ref())) {
                Ok(pool) => pools.push(pool),
                Err(e) => refused(self.sink, span(d), e),
            }
        }
        let names = pools
            .iter()
            .flat_map(|p| p.services().map(|sv| sv.full_name().to_owned()))
            .collect();
        if !pools.is_empty() {
            let (strict, responses) = (
                r.strict.unwrap_or(false),
                r.validate_responses.unwrap_or(false),
            );
            *proto = Some(schema::methods(&pools, strict, responses));
        }
        for (key, f) in r.json.iter().flatten() {
            match schema::json_route(key, &self.path(f.get_ref()), text_hash) {
                Ok(route) => json.push(route),
                Err(e) => refused(self.sink, span(f), e),
            }
        }
        names
    }

    fn endpoint(&mut self, e: &S<String>) -> Option<Endpoint> {
        let text = e.get_ref();
        let hint =
            "write scheme://host:port with scheme http (HTTP/1.1), h2c (HTTP/2 cleartext) or https";
        let Some((scheme, rest)) = text.split_once("://") else {
            self.sink
                .error(span(e), format!("endpoint {text:?} has no scheme"), hint);
            return None;
        };
        let scheme = match scheme {
            "http" => Scheme::Http1,
            "h2c" => Scheme::H2c,
            "https" => Scheme::Https,
            other => {
                self.sink.error(
                    span(e),
                    format!("endpoint {text:?} has unknown scheme {other:?}"),
                    hint,
                );
                return None;
            }
        };
        let authority = rest.trim_end_matches('/');
        let parsed: Option<http::uri::Authority> = authority
            .parse()
            .ok()
            .filter(|_| !authority.contains('/') && !authority.contains('@'));
        let Some(auth) = parsed else {
            self.sink.error(
                span(e),
                format!("endpoint {text:?} is not scheme://host:port"),
                hint,
            );
            return None;
        };
        let port = auth.port_u16().unwrap_or(match scheme {
            Scheme::Https => 443,
            _ => 80,
        });
        Some(Endpoint {
            url: text.clone(),
            scheme,
            host: auth
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }

    fn peers(&mut self, raw: &[S<raw::RawPeer>]) -> Vec<Peer> {
        let mut out = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        for p in raw {
            let r = p.get_ref();
            self.name(&r.name, "peer");
            if names.insert(r.name.get_ref().clone(), ()).is_some() {
                self.sink.error(
                    span(&r.name),
                    format!("peer name {:?} is used twice", r.name.get_ref()),
                    "give every peer its own name",
                );
            }
            let addr = r.address.get_ref();
            let ok_addr = addr.parse::<SocketAddr>().is_ok()
                || addr
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok_addr {
                self.sink.error(
                    span(&r.address),
                    format!("peer address {addr:?} is not host:port"),
                    "write the peer's internal port, e.g. \"10.1.0.7:7443\"",
                );
            }
            let id = r.identity.get_ref();
            if !crate::grammar::pattern::is_identity(id) {
                self.sink.error(
                    span(&r.identity),
                    format!("peer identity {id:?} is neither a SPIFFE ID nor a DNS name"),
                    "write the SAN the peer's certificate carries: \"spiffe://domain/node/NAME\" (a lower-case trust domain; segments of letters, digits, '.', '-', '_') or a lower-case DNS name",
                );
            }
            out.push(Peer {
                name: r.name.get_ref().clone(),
                region: r.region.get_ref().clone(),
                zone: r.zone.as_ref().map(|z| z.get_ref().clone()),
                address: addr.clone(),
                identity: id.clone(),
                services: r.services.iter().map(|s| s.get_ref().clone()).collect(),
            });
        }
        out
    }

    fn rules(
        &mut self,
        raw: &[S<raw::RawAllow>],
        services: &HashMap<&str, ()>,
        peers: &HashMap<&str, ()>,
    ) -> Vec<Rule> {
        let mut out = Vec::new();
        for a in raw {
            let r = a.get_ref();
            let to = r.to.get_ref();
            if to != "*" && !services.contains_key(to.as_str()) {
                self.sink.error(
                    span(&r.to),
                    format!("rule allows access to unknown service {to:?}"),
                    &known(services, "services"),
                );
            }
            let from = r.from.get_ref();
            // A bare word is a peer's name; identities are URIs or DNS names.
            let bare = !from.contains(':')
                && !from.contains('.')
                && !from.contains('*')
                && from != "local";
            if bare && !peers.contains_key(from.as_str()) {
                self.sink.error(
                    span(&r.from),
                    format!("rule allows unknown peer {from:?}"),
                    &format!(
                        "{}; or write an identity pattern such as \"spiffe://fed.example/node/*\"",
                        known(peers, "peers")
                    ),
                );
            }
            if !bare || !peers.contains_key(from.as_str()) {
                self.identity_pattern(&r.from);
            }
            let methods: Vec<String> = r
                .methods
                .iter()
                .flatten()
                .map(|m| m.get_ref().clone())
                .collect();
            for m in r.methods.iter().flatten() {
                self.method_rule(m, "rule");
            }
            out.push(Rule {
                from: from.clone(),
                to: to.clone(),
                methods,
            });
        }
        out
    }
}

impl Checker<'_> {
    /// Checks an identity pattern (`[[allow]] from`, `[[limit]] from`).
    fn identity_pattern(&mut self, p: &S<String>) {
        match crate::grammar::Pattern::parse(p.get_ref()) {
            Err(e) => self.sink.error(
                span(p),
                e.to_string(),
                "a SPIFFE pattern is spiffe://DOMAIN/seg/… with * for one whole segment and a final ** for more; a DNS pattern is labels with * for one whole label and a leading ** for more; * alone is every identity",
            ),
            Ok(pat) if pat.any_trust_domain() => self.sink.warn(
                span(p),
                format!("{:?} matches every trust domain", p.get_ref()),
                "name the trust domain: any CA the node trusts could otherwise issue a certificate this rule admits",
            ),
            Ok(_) => {}
        }
    }

    /// Compiles a method entry of a rule or of `idempotent`, reporting what is wrong.
    fn method_rule(&mut self, m: &S<String>, what: &str) -> Option<crate::grammar::MethodRule> {
        match crate::grammar::MethodRule::parse(m.get_ref()) {
            Err(e) => {
                self.sink.error(
                    span(m),
                    e.to_string(),
                    "write \"pkg.Service/Method\", \"pkg.Service/*\" or \"VERB /path\" (the path and the paths below it; * for one whole segment)",
                );
                None
            }
            Ok(rule) => {
                if rule.verb_is_miscased() {
                    let verb = m.get_ref().split(' ').next().unwrap_or("").to_owned();
                    self.sink.warn(
                        span(m),
                        format!("this {what} entry matches nothing: methods are case-sensitive, and a request with method {verb:?} is refused as a misspelling of {:?}", verb.to_ascii_uppercase()),
                        "write the verb in upper case",
                    );
                }
                Some(rule)
            }
        }
    }
}

fn cert_hint(e: &identity::IdentityError) -> &'static str {
    use identity::IdentityError::*;
    match e {
        Read(..) => "fix the path; relative paths start at the config file's directory",
        Expired(..) => "issue a new certificate; fedport refuses to serve an expired one",
        NotYetValid(..) => "check the clock, or wait until the certificate is valid",
        _ => "the file must hold PEM certificates (-----BEGIN CERTIFICATE-----)",
    }
}

fn known(names: &HashMap<&str, ()>, what: &str) -> String {
    let mut v: Vec<&str> = names.keys().copied().collect();
    v.sort();
    if v.is_empty() {
        format!("no {what} are defined")
    } else {
        format!("known {what}: {}", v.join(", "))
    }
}

pub fn text_hash(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}
