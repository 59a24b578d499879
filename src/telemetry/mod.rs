//! Metric families (Prometheus text on the admin port) and log set-up. Labels are
//! bounded: listener, service, code, reason — never a raw path or address.

use crate::reason::{GrpcStatus, Reason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;

pub mod accesslog;
pub mod audit;
pub mod otlp;
pub mod spike;
pub mod trace;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub listener: String,
    pub service: String,
    /// A method declared in the service's schema (`pkg.S/M`) or a JSON Schema route;
    /// everything else is `other`, so a scanner cannot grow the series.
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `node` (this node's certificate) or `ca`.
    pub cert: String,
}

/// A traffic spike: for a service (`peer=""`) or a calling peer (`service=""`);
/// `kind` is `rate` or `error_rate`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpikeLabels {
    pub service: String,
    pub peer: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub listener: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: String,
    pub reason: Reason,
}

/// A message refusal: `method` is a method of the service's schema (`pkg.S/M`), a JSON
/// Schema route (`POST /v1/orders/{id}`), or `other` — never a raw path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub service: String,
    pub method: String,
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

/// Where a request was sent: `local`, or the name of the peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub service: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: String,
    /// `unsent` (certainly never reached a service), `idempotent`, or `budget_exhausted`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub listener: String,
    pub service: String,
    /// `in` (from the caller to the service) or `out`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainResultLabels {
    pub trust_domain: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub service: String,
    pub result: String,
}

fn connection_histogram() -> Histogram {
    // 1 ms … ~1.2 h: connections last from a request to a session
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

fn duration_histogram() -> Histogram {
    // 25 µs … ~52 s: proxy overhead is tens of microseconds
    Histogram::new(exponential_buckets(0.000025, 2.0, 22))
}

/// Every metric fedport exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub rejections: Family<ReasonLabels, Counter>,
    /// Calls served in audit mode that enforcement would refuse.
    pub audit: audit::Audit,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub connections_total: Family<ListenerLabels, Counter>,
    pub streams_active: Family<ListenerLabels, Gauge>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub upstream_connects: Family<UpstreamLabels, Counter>,
    pub tls_reloads: Family<ResultLabels, Counter>,
    pub message_rejections: Family<MessageLabels, Counter>,
    pub peer_up: Family<PeerLabels, Gauge>,
    pub peer_rtt: Family<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub forwarded: Family<TargetLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub request_bytes: Family<ServiceLabels, Counter>,
    pub response_bytes: Family<ServiceLabels, Counter>,
    pub tls_handshakes: Family<ListenerLabels, Counter>,
    pub cert_expiry: Family<CertLabels, Gauge>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub spike: Family<SpikeLabels, Gauge>,
    pub spike_events: Family<SpikeLabels, Counter>,
    pub peer_inbound: Family<PeerLabels, Counter>,
    pub spans: Family<ResultLabels, Counter>,
    config_info: Family<ConfigLabels, Gauge>,
    config_now: std::sync::Mutex<Option<ConfigLabels>>,
    pub ready: Gauge,
    /// The etcd registry: reachable (1/0), members seen, membership changes applied,
    /// sessions that failed.
    pub registry_up: Gauge,
    /// Bytes fedport holds for callers (the node's memory budget).
    pub memory_held: Gauge,
    /// `access_log_file`: lines written, and lines dropped with the queue full.
    pub access_log_lines: Counter,
    pub access_log_dropped: Counter,
    pub registry_members: Gauge,
    pub registry_updates: Counter,
    pub registry_errors: Counter,
    /// Fetches of other trust domains' bundles, by result; the held bundle's sequence,
    /// when it was last fetched, and whether the last fetch failed (the last good one
    /// keeps serving).
    pub bundle_fetches: Family<DomainResultLabels, Counter>,
    /// TCP services: connections open and in all, bytes each way, how long they lasted.
    pub tcp_open: Family<ServiceLabels, Gauge>,
    pub tcp_connections: Family<ServiceLabels, Counter>,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    pub tcp_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub bundle_sequence: Family<DomainLabels, Gauge>,
    pub bundle_last_success: Family<DomainLabels, Gauge>,
    pub bundle_stale: Family<DomainLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub node: String,
    pub hash: String,
}

impl Metrics {
    pub fn new(node: &str, config_hash: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix("fedport");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by listener, service and code (HTTP status, or gRPC status name)",
            requests.clone(),
        );
        let duration = Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response",
            duration.clone(),
        );
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests and connections refused, by reason",
            rejections.clone(),
        );
        let audit = audit::Audit::default();
        registry.register(
            "authorization_audit_would_deny",
            "Calls no rule allows, served because their service's authorization is audit, by service and identity",
            audit.would_deny.clone(),
        );
        let connections_active = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_active",
            "Open downstream connections",
            connections_active.clone(),
        );
        let connections_total = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections",
            "Downstream connections accepted",
            connections_total.clone(),
        );
        let streams_active = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "streams_active",
            "Requests in flight",
            streams_active.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            handshake_failures.clone(),
        );
        let upstream_connects = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_connects",
            "Upstream connection attempts, by service and result",
            upstream_connects.clone(),
        );
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_reloads",
            "Reloads of the TLS certificate, key, CA and CRL, by result",
            tls_reloads.clone(),
        );
        let message_rejections = Family::<MessageLabels, Counter>::default();
        registry.register(
            "message_rejections",
            "Messages refused by what their service accepts (format, encoding, size, schema, response_schema), by service and method",
            message_rejections.clone(),
        );
        let peer_up = Family::<PeerLabels, Gauge>::default();
        registry.register(
            "peer_up",
            "1 while the peer answers its HTTP/2 PINGs",
            peer_up.clone(),
        );
        let peer_rtt = Family::<PeerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "peer_rtt_seconds",
            "Round-trip time to the peer, from its HTTP/2 PINGs (moving average)",
            peer_rtt.clone(),
        );
        let endpoint_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "upstream_healthy",
            "1 while a local endpoint passes its health checks and is not ejected",
            endpoint_healthy.clone(),
        );
        let ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Endpoints ejected after consecutive failures",
            ejections.clone(),
        );
        let forwarded = Family::<TargetLabels, Counter>::default();
        registry.register(
            "forwarded",
            "Requests sent on, by service and target (local, or the peer's name)",
            forwarded.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests sent again to another target, by kind; budget_exhausted counts the retries refused",
            retries.clone(),
        );
        let request_bytes = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "request_bytes",
            "Request body bytes received, by listener and service",
            request_bytes.clone(),
        );
        let response_bytes = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "response_bytes",
            "Response body bytes sent, by listener and service",
            response_bytes.clone(),
        );
        let tls_handshakes = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed",
            tls_handshakes.clone(),
        );
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix time)",
            cert_expiry.clone(),
        );
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        for r in ["ok", "error"] {
            let _ = config_reloads.get_or_create(&ResultLabels { result: r.into() });
        }
        let spike = Family::<SpikeLabels, Gauge>::default();
        registry.register(
            "traffic_spike",
            "1 while a service's or a peer's request rate or error rate departs from its baseline",
            spike.clone(),
        );
        let spike_events = Family::<SpikeLabels, Counter>::default();
        registry.register(
            "traffic_spike_events",
            "Traffic spikes detected",
            spike_events.clone(),
        );
        let peer_inbound = Family::<PeerLabels, Counter>::default();
        registry.register(
            "peer_inbound_requests",
            "Requests received from peer nodes, by peer",
            peer_inbound.clone(),
        );
        let spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Spans of sampled traces sent to the OTLP collector: exported, failed, dropped (queue full)",
            spans.clone(),
        );
        registry.register(
            "build",
            "This fedport build",
            Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the node accepts traffic, 0 while starting or draining",
            ready.clone(),
        );
        let memory_held = Gauge::default();
        registry.register(
            "memory_held_bytes",
            "Bytes held for callers: gRPC messages held whole for validation (also while inflated), JSON and small bodies buffered, request header lists of streams in progress",
            memory_held.clone(),
        );
        let access_log_lines = Counter::default();
        registry.register(
            "access_log_lines",
            "Lines written to access_log_file",
            access_log_lines.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_lines_dropped",
            "Access log lines dropped because the file's writer fell behind (a slow disk) and its queue was full",
            access_log_dropped.clone(),
        );
        let registry_up = Gauge::default();
        registry.register(
            "registry_up",
            "1 while the etcd registry answers; 0 during an outage (the last membership seen keeps serving)",
            registry_up.clone(),
        );
        let registry_members = Gauge::default();
        registry.register(
            "registry_members",
            "Other nodes known from the registry",
            registry_members.clone(),
        );
        let registry_updates = Counter::default();
        registry.register(
            "registry_updates",
            "Membership changes from the registry applied to routing",
            registry_updates.clone(),
        );
        let registry_errors = Counter::default();
        registry.register(
            "registry_errors",
            "Registry sessions that failed (etcd unreachable, no quorum, lease lost)",
            registry_errors.clone(),
        );
        let tcp_open = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "tcp_connections_open",
            "Connections of TCP services spliced to their endpoints now",
            tcp_open.clone(),
        );
        let tcp_connections = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "tcp_connections",
            "Connections of TCP services spliced to an endpoint",
            tcp_connections.clone(),
        );
        let tcp_bytes = Family::<TcpBytesLabels, Counter>::default();
        registry.register(
            "tcp_bytes",
            "Bytes of TCP services: in (caller to service) and out",
            tcp_bytes.clone(),
        );
        let tcp_duration =
            Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                connection_histogram,
            );
        registry.register(
            "tcp_connection_duration_seconds",
            "How long spliced connections of TCP services lasted",
            tcp_duration.clone(),
        );
        let bundle_fetches = Family::<DomainResultLabels, Counter>::default();
        registry.register(
            "trust_bundle_fetches",
            "Fetches of a trust domain's bundle from its bundle endpoint, by result: updated, unchanged, unreachable, invalid, older_sequence, write_error",
            bundle_fetches.clone(),
        );
        let bundle_sequence = Family::<DomainLabels, Gauge>::default();
        registry.register(
            "trust_bundle_sequence",
            "The spiffe_sequence of the bundle held for a trust domain",
            bundle_sequence.clone(),
        );
        let bundle_last_success = Family::<DomainLabels, Gauge>::default();
        registry.register(
            "trust_bundle_last_success_timestamp_seconds",
            "When a trust domain's bundle was last fetched (Unix time)",
            bundle_last_success.clone(),
        );
        let bundle_stale = Family::<DomainLabels, Gauge>::default();
        registry.register(
            "trust_bundle_stale",
            "1 while the last fetch of a trust domain's bundle failed: the last good bundle keeps serving",
            bundle_stale.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        registry.register(
            "config_info",
            "The running configuration: 1 for its node and hash",
            config_info.clone(),
        );
        config_info
            .get_or_create(&ConfigLabels {
                node: node.to_owned(),
                hash: config_hash.to_owned(),
            })
            .set(1);
        Arc::new(Self {
            registry,
            requests,
            duration,
            rejections,
            audit,
            connections_active,
            connections_total,
            streams_active,
            handshake_failures,
            upstream_connects,
            tls_reloads,
            message_rejections,
            peer_up,
            peer_rtt,
            endpoint_healthy,
            ejections,
            forwarded,
            retries,
            request_bytes,
            response_bytes,
            tls_handshakes,
            cert_expiry,
            config_reloads,
            spike,
            spike_events,
            peer_inbound,
            spans,
            config_info,
            config_now: std::sync::Mutex::new(Some(ConfigLabels {
                node: node.to_owned(),
                hash: config_hash.to_owned(),
            })),
            ready,
            memory_held,
            access_log_lines,
            access_log_dropped,
            registry_up,
            registry_members,
            registry_updates,
            registry_errors,
            bundle_fetches,
            tcp_open,
            tcp_connections,
            tcp_bytes,
            tcp_duration,
            bundle_sequence,
            bundle_last_success,
            bundle_stale,
        })
    }

    pub fn reject(&self, listener: &str, reason: Reason) {
        self.rejections
            .get_or_create(&ReasonLabels {
                listener: listener.to_owned(),
                reason,
            })
            .inc();
    }

    /// `fedport_config_info` names the configuration now running (and only it).
    pub fn set_config(&self, node: &str, hash: &str) {
        let now = ConfigLabels {
            node: node.to_owned(),
            hash: hash.to_owned(),
        };
        if let Ok(mut cur) = self.config_now.lock() {
            if let Some(old) = cur.replace(now.clone()).filter(|o| *o != now) {
                self.config_info.remove(&old);
            }
        }
        self.config_info.get_or_create(&now).set(1);
    }

    /// OpenMetrics text, for scrapers that ask for it.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (0.0.4) that promtool and older scrapers read: the
    /// same samples, with counter families named by their `_total` samples, info
    /// families as gauges named `_info`, and no `# UNIT` or `# EOF` lines.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

fn to_prometheus_text(om: &str) -> String {
    let mut types = std::collections::HashMap::new();
    for l in om.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some((name, t)) = rest.split_once(' ') {
                types.insert(name.to_owned(), t.to_owned());
            }
        }
    }
    let rename = |name: &str| match types.get(name).map(String::as_str) {
        Some("counter") => (format!("{name}_total"), "counter"),
        Some("info") => (format!("{name}_info"), "gauge"),
        Some(t) => (name.to_owned(), if t == "unknown" { "untyped" } else { t }),
        None => (name.to_owned(), "untyped"),
    };
    let mut out = String::with_capacity(om.len());
    for l in om.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = l.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name).0));
        } else if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (n, t) = rename(name);
            out.push_str(&format!("# TYPE {n} {t}\n"));
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Sets `fedport_certificate_expiry_timestamp_seconds` for the node's certificate and
/// the federation CA (the earliest expiry in each file).
pub fn record_certificates(config: &crate::config::Config, m: &Metrics) {
    let Some(tls) = &config.tls else { return };
    for (name, path) in [("node", &tls.files.cert), ("ca", &tls.files.ca)] {
        if let Some(t) = crate::identity::earliest_expiry(path) {
            m.cert_expiry
                .get_or_create(&CertLabels { cert: name.into() })
                .set(t);
        }
    }
}

/// Logs to stderr; `FEDPORT_LOG` (or `RUST_LOG`) sets the filter, `FEDPORT_LOG_FORMAT=json`
/// switches to one JSON object per line.
pub fn init_logging() {
    init_logging_as(None)
}

/// [`init_logging`] with the format chosen by a flag (`json` or `text`), which wins
/// over `FEDPORT_LOG_FORMAT`.
pub fn init_logging_as(format: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("FEDPORT_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let env = std::env::var("FEDPORT_LOG_FORMAT").ok();
    if format.or(env.as_deref()) == Some("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// A request counter by method (`None`: other) and code.
type MethodCode = (Option<Arc<str>>, u32, Counter);

/// One (listener, service) pair's request metrics, resolved once per worker so that the
/// request path neither builds label strings nor looks up a family.
pub struct ServiceMetrics {
    requests: Family<RequestLabels, Counter>,
    messages: Family<MessageLabels, Counter>,
    rejections: Family<ReasonLabels, Counter>,
    listener: String,
    service: String,
    pub duration: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    /// Counters by method and code, created on first use: code is the HTTP status, or
    /// 1000 + the gRPC status.
    codes: std::sync::Mutex<Vec<MethodCode>>,
}

impl ServiceMetrics {
    pub fn new(m: &Metrics, listener: &str, service: &str) -> Self {
        let labels = ServiceLabels {
            listener: listener.to_owned(),
            service: service.to_owned(),
        };
        Self {
            requests: m.requests.clone(),
            messages: m.message_rejections.clone(),
            rejections: m.rejections.clone(),
            listener: listener.to_owned(),
            service: service.to_owned(),
            duration: m.duration.get_or_create(&labels).clone(),
            request_bytes: m.request_bytes.get_or_create(&labels).clone(),
            response_bytes: m.response_bytes.get_or_create(&labels).clone(),
            codes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Counts a message refused by what the service accepts.
    /// A refusal of fedport's own after the answer had begun (a streamed message):
    /// counted in `fedport_rejections_total` like one before it.
    pub fn rejected_late(&self, reason: Reason) {
        self.rejections
            .get_or_create(&ReasonLabels {
                listener: self.listener.clone(),
                reason,
            })
            .inc();
    }

    pub fn message_rejected(&self, method: &str, reason: Reason) {
        self.messages
            .get_or_create(&MessageLabels {
                service: self.service.clone(),
                method: method.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts one answered request: by its gRPC status when it has one, else by HTTP
    /// status; by its declared method (`None`: `other`).
    pub fn count(
        &self,
        http_status: u16,
        grpc_status: Option<GrpcStatus>,
        method: Option<&Arc<str>>,
    ) {
        // keyed by the label it gets: "00" is INVALID, not OK, and must not share OK's
        let key = match grpc_status {
            Some(g) => 1000 + g.key(),
            None => u32::from(http_status),
        };
        let same = |m: &Option<Arc<str>>| match (m, method) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        };
        let Ok(mut codes) = self.codes.lock() else {
            return;
        };
        if let Some((_, _, c)) = codes.iter().find(|(m, k, _)| *k == key && same(m)) {
            c.inc();
            return;
        }
        let code = match grpc_status {
            Some(g) => g.label().to_owned(),
            None => http_status.to_string(),
        };
        let c = self
            .requests
            .get_or_create(&RequestLabels {
                listener: self.listener.clone(),
                service: self.service.clone(),
                method: method.map_or("other", |m| m).to_owned(),
                code,
            })
            .clone();
        c.inc();
        codes.push((method.cloned(), key, c));
    }
}

/// Whether a line about `reason` may be logged now: at most one every 10 s for each
/// reason, so that a flood is one line and a metric, never a line per event.
pub fn log_due(reason: Reason) -> bool {
    static LAST: std::sync::Mutex<Vec<(Reason, std::time::Instant)>> =
        std::sync::Mutex::new(Vec::new());
    let now = std::time::Instant::now();
    let Ok(mut last) = LAST.lock() else {
        return false;
    };
    match last.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, t)) if now.duration_since(*t) < std::time::Duration::from_secs(10) => false,
        Some((_, t)) => {
            *t = now;
            true
        }
        None => {
            last.push((reason, now));
            true
        }
    }
}

/// The name of a `grpc-status` value; bounded, so it can be a label.
pub fn grpc_code_name(s: &str) -> &'static str {
    GrpcStatus::of(s.as_bytes()).label()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_are_read_strictly_and_keyed_by_their_label() {
        assert_eq!(grpc_code_name("16"), "UNAUTHENTICATED");
        assert_eq!(grpc_code_name("017"), "INVALID");
        let m = Metrics::new("a", "h");
        let s = ServiceMetrics::new(&m, "internal", "svc");
        for g in ["00", "0", "", "abc"] {
            s.count(200, Some(GrpcStatus::of(g.as_bytes())), None);
        }
        let text = m.encode();
        for code in ["OK", "INVALID", "NONE"] {
            let series = format!(r#"code="{code}""#);
            let line = text
                .lines()
                .find(|l| l.starts_with("fedport_requests_total") && l.contains(&series))
                .unwrap_or_else(|| panic!("no {code} series:\n{text}"));
            let want = if code == "INVALID" { " 2" } else { " 1" };
            assert!(line.ends_with(want), "{line}");
        }
    }
}
