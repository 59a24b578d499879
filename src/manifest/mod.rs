//! The port manifest and the access plan. `describe` states what a config exposes —
//! every port with its protocol, TLS mode and allowlist, who may reach which services
//! and methods, the limits — as Markdown or JSON. `plan` compares two configs by that
//! effect, not by text: ports opened, closed or moved, identities that gain or lose
//! access, allowlist ranges added or removed, limits and schemas changed.

pub mod replay;

use crate::config::{Config, Protocol, Role};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Port {
    pub name: String,
    pub bind: String,
    pub protocol: String,
    pub tls: String,
    pub allow: Vec<String>,
    pub proxy_protocol_from: Option<Vec<String>>,
    pub service: Option<String>,
    pub max_connections: usize,
    pub max_streams: u32,
    pub idle_timeout_ms: u64,
    pub header_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Service {
    pub name: String,
    pub protocol: String,
    pub endpoints: Vec<String>,
    /// Peers that also serve it.
    pub peers: Vec<String>,
    pub formats: Vec<String>,
    pub max_message_bytes: Option<u64>,
    pub timeout_ms: u64,
    /// Declared methods: gRPC `pkg.S/M`, JSON Schema routes.
    pub methods: Vec<String>,
    /// Changes whenever a schema does.
    pub schema: Option<String>,
    /// gRPC services (`pkg.Service`) it serves besides those in its schema.
    pub grpc_services: Vec<String>,
    /// Its rate and concurrency limits (`-` when none).
    pub limits: String,
    /// What may be sent twice (`idempotent`), as matched.
    pub idempotent: Vec<String>,
    /// What its endpoints are told as `Host` / `:authority`.
    pub authority: String,
    /// `enforce` or `audit`: what a call no rule allows gets.
    pub authorization: String,
}

/// A file whose contents matter, not just its name.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileRef {
    pub path: String,
    /// A hash of its contents when the manifest was made.
    pub contents: String,
}

/// What callers' certificates are checked against.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Trust {
    /// The node's own trust domain (its certificate's SPIFFE ID's), whose bundle is `ca`.
    pub own_domain: Option<String>,
    pub ca: FileRef,
    pub crl: Option<FileRef>,
    /// Other organisations' trust domains, each vouching only for its own identities.
    pub domains: Vec<DomainTrust>,
}

/// One `[[trust_domain]]`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DomainTrust {
    pub name: String,
    /// Its authorities' file: `ca` (PEM) or `bundle` (SPIFFE bundle).
    pub ca: FileRef,
    /// `"pem"` or `"spiffe"`.
    pub format: &'static str,
    pub crl: Option<FileRef>,
    pub dns_names: Vec<String>,
    /// `url profile [spiffe_id]` of its bundle endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<String>,
}

/// An identity pattern's access to a service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub from: String,
    pub service: String,
    /// `*` for every method.
    pub method: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Manifest {
    pub node: String,
    pub region: String,
    pub config_hash: String,
    pub ports: Vec<Port>,
    pub admin: Option<Port>,
    pub services: Vec<Service>,
    pub access: Vec<Access>,
    pub peers: Vec<String>,
    /// Node-wide limits: name → value.
    pub limits: BTreeMap<String, String>,
    pub trust: Option<Trust>,
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

pub fn manifest(cfg: &Config) -> Manifest {
    let ports = cfg
        .listeners
        .iter()
        .map(|l| Port {
            name: l.name.clone(),
            bind: l.bind.to_string(),
            protocol: {
                let tcp = l.service.as_ref().is_some_and(|n| {
                    cfg.services
                        .iter()
                        .any(|s| &s.name == n && s.protocol == Protocol::Tcp)
                });
                match (l.role, tcp) {
                    (Role::Peer, false) => "HTTP/2 (h2) and HTTP/1.1 over TLS".into(),
                    (Role::Local, false) => "HTTP/1.1 and h2c, cleartext".into(),
                    (Role::Peer, true) => "TCP over TLS, spliced to the service".into(),
                    (Role::Local, true) => "TCP, cleartext, spliced to the service".into(),
                }
            },
            tls: match (l.role, &cfg.tls) {
                (Role::Local, _) => "none (loopback only)".into(),
                (Role::Peer, Some(t)) if t.allow_tls12 => {
                    "mutual TLS 1.3 (1.2 allowed), client certificate required".into()
                }
                (Role::Peer, _) => "mutual TLS 1.3, client certificate required".into(),
            },
            allow: l.allow.iter().map(|n| n.to_string()).collect(),
            proxy_protocol_from: l
                .proxy_trusted
                .as_ref()
                .map(|v| v.iter().map(|n| n.to_string()).collect()),
            service: l.service.clone(),
            max_connections: l.max_connections,
            max_streams: l.max_streams,
            idle_timeout_ms: ms(l.idle_timeout),
            header_timeout_ms: ms(l.header_timeout),
        })
        .collect();
    let admin = cfg.admin.map(|a| Port {
        name: "admin".into(),
        bind: a.to_string(),
        protocol: "HTTP/1.1, cleartext: /healthz /readyz /metrics /config".into(),
        tls: "none".into(),
        allow: cfg.admin_allow.iter().map(|n| n.to_string()).collect(),
        proxy_protocol_from: None,
        service: None,
        max_connections: 0,
        max_streams: 0,
        idle_timeout_ms: 0,
        header_timeout_ms: 0,
    });
    let services = cfg
        .services
        .iter()
        .map(|s| {
            let mut methods: Vec<String> = s
                .proto
                .iter()
                .flat_map(|p| p.methods.keys().cloned())
                .chain(s.json.iter().map(|r| r.route.to_string()))
                .collect();
            methods.sort();
            let schema = (s.proto.is_some() || !s.json.is_empty()).then(|| {
                let mut text = String::new();
                if let Some(p) = &s.proto {
                    let sorted: BTreeMap<_, _> = p.methods.iter().collect();
                    for (name, m) in sorted {
                        let _ = write!(text, "{name}:{:?}:{:?};", m.input, m.output);
                    }
                    let _ = write!(
                        text,
                        "strict={};responses={};",
                        p.strict, p.validate_responses
                    );
                }
                for r in &s.json {
                    let _ = write!(text, "{}={};", r.route, r.hash);
                }
                crate::config::text_hash(&text)
            });
            Service {
                name: s.name.clone(),
                protocol: match s.protocol {
                    Protocol::Grpc => "grpc",
                    Protocol::Http => "http",
                    Protocol::Tcp => "tcp",
                }
                .into(),
                endpoints: s.endpoints.iter().map(|e| e.url.clone()).collect(),
                peers: cfg
                    .peers
                    .iter()
                    .filter(|p| p.services.contains(&s.name))
                    .map(|p| p.name.clone())
                    .collect(),
                formats: s.formats.clone(),
                max_message_bytes: s.max_message_bytes,
                timeout_ms: ms(s.timeout),
                methods,
                schema,
                grpc_services: s.grpc_services.clone(),
                limits: limits_text(&s.limits),
                idempotent: match &s.idempotent {
                    crate::grammar::Methods::All => vec!["* (every method)".into()],
                    crate::grammar::Methods::Some(l) => l.iter().map(|m| m.to_string()).collect(),
                },
                authority: s.authority.clone(),
                authorization: s
                    .authorization
                    .unwrap_or(cfg.node.authorization)
                    .as_str()
                    .to_owned(),
            }
        })
        .collect();
    let mut access = BTreeSet::new();
    for r in &cfg.rules {
        let targets: Vec<&str> = if r.to == "*" {
            cfg.services.iter().map(|s| s.name.as_str()).collect()
        } else {
            vec![r.to.as_str()]
        };
        // what each entry matches, not only how it is written
        let methods: Vec<String> = if r.methods.is_empty() {
            vec!["*".into()]
        } else {
            r.methods
                .iter()
                .map(|m| crate::grammar::MethodRule::parse(m).map_or(m.clone(), |m| m.to_string()))
                .collect()
        };
        // a rule naming a peer is access for that peer's identity: a new identity
        // behind the same name is access gained and lost
        let from = match cfg.peers.iter().find(|p| p.name == r.from) {
            Some(p) => format!("{} ({})", p.name, p.identity),
            None => {
                crate::grammar::Pattern::parse(&r.from).map_or(r.from.clone(), |p| p.to_string())
            }
        };
        for t in targets {
            for m in &methods {
                access.insert(Access {
                    from: from.clone(),
                    service: t.to_owned(),
                    method: m.clone(),
                });
            }
        }
    }
    let n = &cfg.node;
    let limits = [
        ("transit", n.transit.to_string()),
        ("max_hops", n.max_hops.to_string()),
        ("drain_timeout_ms", ms(n.drain_timeout).to_string()),
        ("retry_budget_ratio", n.retry_ratio.to_string()),
        (
            "retry_budget_min_per_second",
            n.retry_min_per_second.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(
        cfg.limits
            .iter()
            .map(|l| (format!("limit for {}", l.from), limits_text(&l.limits))),
    )
    .collect();
    let file = |p: &std::path::Path| FileRef {
        path: p.display().to_string(),
        contents: std::fs::read(p)
            .map(|b| crate::config::text_hash(&String::from_utf8_lossy(&b)))
            .unwrap_or_else(|_| "unreadable".into()),
    };
    let trust = cfg.tls.as_ref().map(|t| Trust {
        own_domain: crate::identity::domains::own_domain(&t.files.cert),
        ca: file(&t.files.ca),
        crl: t.crl.as_deref().map(file),
        domains: t
            .trust_domains
            .iter()
            .map(|d| DomainTrust {
                name: d.name.clone(),
                ca: file(d.authorities.path()),
                format: match d.authorities {
                    crate::identity::bundle::Authorities::Pem(_) => "pem",
                    crate::identity::bundle::Authorities::Spiffe(_) => "spiffe",
                },
                crl: d.crl.as_deref().map(file),
                dns_names: d.dns_names.clone(),
                bundle_endpoint: d.endpoint.as_ref().map(|e| match &e.profile {
                    crate::identity::domains::Profile::Web => format!("{} https_web", e.url),
                    crate::identity::domains::Profile::Spiffe(id) => {
                        format!("{} https_spiffe {id}", e.url)
                    }
                }),
            })
            .collect(),
    });
    Manifest {
        node: n.name.clone(),
        region: n.region.clone(),
        config_hash: cfg.hash.clone(),
        ports,
        admin,
        services,
        access: access.into_iter().collect(),
        peers: cfg
            .peers
            .iter()
            .map(|p| format!("{} ({}, {}, {})", p.name, p.region, p.address, p.identity))
            .collect(),
        limits,
        trust,
    }
}

fn limits_text(l: &crate::config::Limits) -> String {
    let mut parts = Vec::new();
    if let Some(r) = l.rate {
        parts.push(format!("rate {r}/s"));
    }
    if let Some(b) = l.burst {
        parts.push(format!("burst {b}"));
    }
    if let Some(c) = l.concurrency {
        parts.push(format!("concurrency {c}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "any".into()
    } else {
        v.join(", ")
    }
}

fn none_or(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The manifest as Markdown.
pub fn markdown(m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Port manifest: node {} (region {})\n",
        m.node, m.region
    );
    let _ = writeln!(s, "Config hash `{}`.\n\n## Ports\n", m.config_hash);
    s.push_str("| port | bind | protocol | TLS | admitted from | PROXY protocol from | service | max connections |\n|---|---|---|---|---|---|---|---:|\n");
    for p in m.ports.iter().chain(m.admin.iter()) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            p.name,
            p.bind,
            p.protocol,
            p.tls,
            if p.name == "admin" && p.allow.is_empty() {
                "any".into()
            } else if p.name == "admin" {
                format!("loopback, {}", p.allow.join(", "))
            } else {
                list(&p.allow)
            },
            p.proxy_protocol_from
                .as_ref()
                .map_or("-".into(), |v| v.join(", ")),
            p.service
                .as_deref()
                .unwrap_or(if p.name == "admin" { "-" } else { "(routed)" }),
            if p.max_connections == 0 {
                "-".into()
            } else {
                p.max_connections.to_string()
            },
        );
    }
    s.push_str("\n## Who may reach what (default deny)\n\n| identity | service | method |\n|---|---|---|\n");
    for a in &m.access {
        let _ = writeln!(s, "| {} | {} | {} |", a.from, a.service, a.method);
    }
    s.push_str("\n## Services\n\n| service | protocol | endpoints | peers | declared methods | formats | max message | timeout |\n|---|---|---|---|---|---|---:|---:|\n");
    for v in &m.services {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} ms |",
            v.name,
            v.protocol,
            if v.endpoints.is_empty() {
                "-".into()
            } else {
                v.endpoints.join(", ")
            },
            if v.peers.is_empty() {
                "-".into()
            } else {
                v.peers.join(", ")
            },
            if v.methods.is_empty() {
                "-".into()
            } else {
                v.methods.join(", ")
            },
            list(&v.formats),
            v.max_message_bytes.map_or("-".into(), |b| format!("{b} B")),
            v.timeout_ms
        );
    }
    s.push_str("\n## Retries and authority\n\n| service | sent again after a failure (idempotent) | endpoints are told |\n|---|---|---|\n");
    for v in &m.services {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            v.name,
            none_or(&v.idempotent),
            v.authority
        );
    }
    if !m.peers.is_empty() {
        s.push_str("\n## Peers\n\n");
        for p in &m.peers {
            let _ = writeln!(s, "- {p}");
        }
    }
    s.push_str("\n## Limits\n\n");
    for (k, v) in &m.limits {
        let _ = writeln!(s, "- {k}: {v}");
    }
    for v in m.services.iter().filter(|v| v.limits != "-") {
        let _ = writeln!(s, "- service {}: {}", v.name, v.limits);
    }
    for v in m.services.iter().filter(|v| v.authorization == "audit") {
        let _ = writeln!(
            s,
            "- service {}: authorization audit: calls no rule allows are served, counted and logged as would_deny",
            v.name
        );
    }
    for v in m.services.iter().filter(|v| !v.grpc_services.is_empty()) {
        let _ = writeln!(
            s,
            "- service {} also serves: {}",
            v.name,
            v.grpc_services.join(", ")
        );
    }
    if let Some(t) = &m.trust {
        let _ = writeln!(
            s,
            "\n## Trust\n\n- own trust domain {}: certificates must chain to {}\n- revoked: {}",
            t.own_domain
                .as_deref()
                .unwrap_or("(none: the node's certificate has no SPIFFE ID)"),
            t.ca.path,
            t.crl.as_ref().map_or("no CRL", |c| c.path.as_str())
        );
        for d in &t.domains {
            let _ = writeln!(
                s,
                "- trust domain {}: its identities (spiffe://{}/…{}) must chain to {}{}; revoked: {}{}",
                d.name,
                d.name,
                if d.dns_names.is_empty() {
                    String::new()
                } else {
                    format!(", and DNS names {}", d.dns_names.join(", "))
                },
                d.ca.path,
                if d.format == "spiffe" { " (SPIFFE bundle)" } else { "" },
                d.crl.as_ref().map_or("no CRL", |c| c.path.as_str()),
                d.bundle_endpoint
                    .as_ref()
                    .map_or(String::new(), |e| format!("; fetched from {e}"))
            );
        }
    }
    s
}

/// One effect of a config change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    /// `port`, `access`, `allowlist`, `limit`, `schema`, `service`, `peer`, `trust`.
    pub kind: &'static str,
    /// `+` gained/opened/added, `-` lost/closed/removed, `~` changed.
    pub sign: char,
    pub what: String,
}

/// What going from `old` to `new` does.
pub fn plan(old: &Manifest, new: &Manifest) -> Vec<Change> {
    let mut out = Vec::new();
    let mut push = |kind, sign, what: String| out.push(Change { kind, sign, what });
    let ports = |m: &Manifest| -> BTreeMap<String, Port> {
        m.ports
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            // the admin port by a key no listener can have
            .chain(m.admin.iter().map(|p| ("[admin]".to_owned(), p.clone())))
            .collect()
    };
    let (po, pn) = (ports(old), ports(new));
    for (name, p) in &pn {
        match po.get(name) {
            None => push(
                "port",
                '+',
                format!("port {name} opens on {} ({})", p.bind, p.tls),
            ),
            Some(o) => {
                if o.bind != p.bind {
                    push(
                        "port",
                        '~',
                        format!("port {name} moves from {} to {}", o.bind, p.bind),
                    );
                }
                if o.tls != p.tls {
                    push(
                        "port",
                        '~',
                        format!("port {name} TLS: {} → {}", o.tls, p.tls),
                    );
                }
                let (a, b): (BTreeSet<_>, BTreeSet<_>) =
                    (o.allow.iter().collect(), p.allow.iter().collect());
                for r in b.difference(&a) {
                    push("allowlist", '+', format!("port {name} admits {r}"));
                }
                for r in a.difference(&b) {
                    push(
                        "allowlist",
                        '-',
                        format!("port {name} no longer admits {r}"),
                    );
                }
                if o.allow.is_empty() != p.allow.is_empty() {
                    push(
                        "allowlist",
                        // no allowlist is every address: a widening
                        if p.allow.is_empty() { '+' } else { '-' },
                        format!(
                            "port {name} admits {}",
                            if p.allow.is_empty() {
                                "any address (no allowlist)"
                            } else {
                                "only its allowlist"
                            }
                        ),
                    );
                }
                if o.proxy_protocol_from != p.proxy_protocol_from {
                    push(
                        "port",
                        '~',
                        format!(
                            "port {name} PROXY protocol from: {:?} → {:?}",
                            o.proxy_protocol_from, p.proxy_protocol_from
                        ),
                    );
                }
                if o.service != p.service {
                    push(
                        "port",
                        '~',
                        format!(
                            "port {name} is dedicated to {:?} (was {:?})",
                            p.service, o.service
                        ),
                    );
                }
                for (what, a, b) in [
                    (
                        "max_connections",
                        o.max_connections as u64,
                        p.max_connections as u64,
                    ),
                    ("max_streams", o.max_streams.into(), p.max_streams.into()),
                    ("idle_timeout_ms", o.idle_timeout_ms, p.idle_timeout_ms),
                    (
                        "header_timeout_ms",
                        o.header_timeout_ms,
                        p.header_timeout_ms,
                    ),
                ] {
                    if a != b {
                        push("limit", '~', format!("port {name} {what}: {a} → {b}"));
                    }
                }
            }
        }
    }
    for (name, p) in &po {
        if !pn.contains_key(name) {
            push("port", '-', format!("port {name} on {} closes", p.bind));
        }
    }
    let (ao, an): (BTreeSet<_>, BTreeSet<_>) =
        (old.access.iter().collect(), new.access.iter().collect());
    for a in an.difference(&ao) {
        push(
            "access",
            '+',
            format!("{} gains {} {}", a.from, a.service, a.method),
        );
    }
    for a in ao.difference(&an) {
        push(
            "access",
            '-',
            format!("{} loses {} {}", a.from, a.service, a.method),
        );
    }
    let services = |m: &Manifest| -> BTreeMap<String, Service> {
        m.services
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect()
    };
    let (so, sn) = (services(old), services(new));
    for (name, s) in &sn {
        let Some(o) = so.get(name) else {
            push(
                "service",
                '+',
                format!("service {name} added ({})", s.protocol),
            );
            continue;
        };
        if o.timeout_ms != s.timeout_ms {
            push(
                "limit",
                '~',
                format!(
                    "service {name} timeout: {} ms → {} ms",
                    o.timeout_ms, s.timeout_ms
                ),
            );
        }
        if o.max_message_bytes != s.max_message_bytes {
            push(
                "limit",
                '~',
                format!(
                    "service {name} max_message_bytes: {:?} → {:?}",
                    o.max_message_bytes, s.max_message_bytes
                ),
            );
        }
        if o.formats != s.formats {
            push(
                "schema",
                '~',
                format!(
                    "service {name} formats: {} → {}",
                    list(&o.formats),
                    list(&s.formats)
                ),
            );
        }
        if o.schema != s.schema {
            push("schema", '~', format!("service {name} schema changed"));
        }
        if o.limits != s.limits {
            push(
                "limit",
                '~',
                format!("service {name} limits: {} → {}", o.limits, s.limits),
            );
        }
        if o.idempotent != s.idempotent {
            push(
                "limit",
                '~',
                format!(
                    "service {name} idempotent (sent again after a failure): {} → {}",
                    none_or(&o.idempotent),
                    none_or(&s.idempotent)
                ),
            );
        }
        if o.authority != s.authority {
            push(
                "service",
                '~',
                format!(
                    "service {name} authority: {} → {}",
                    o.authority, s.authority
                ),
            );
        }
        // audit serves what no rule allows: a switch is access lost or gained
        match (o.authorization.as_str(), s.authorization.as_str()) {
            ("audit", "enforce") => push(
                "access",
                '-',
                format!(
                    "service {name} authorization audit → enforce: calls no rule allows (served and counted as would_deny until now) are refused with 403 / PERMISSION_DENIED"
                ),
            ),
            ("enforce", "audit") => push(
                "access",
                '+',
                format!(
                    "service {name} authorization enforce → audit: calls no rule allows are served (counted and logged as would_deny)"
                ),
            ),
            _ => {}
        }
        // a gRPC service served is every method of it, for whoever may call this one
        for g in s
            .grpc_services
            .iter()
            .filter(|g| !o.grpc_services.contains(g))
        {
            push(
                "access",
                '+',
                format!("service {name} now serves {g}/* to those granted {name}"),
            );
        }
        for g in o
            .grpc_services
            .iter()
            .filter(|g| !s.grpc_services.contains(g))
        {
            push(
                "access",
                '-',
                format!("service {name} no longer serves {g}/*"),
            );
        }
        if o.endpoints != s.endpoints {
            push(
                "service",
                '~',
                format!(
                    "service {name} endpoints: {} → {}",
                    o.endpoints.join(", "),
                    s.endpoints.join(", ")
                ),
            );
        }
        if o.peers != s.peers {
            push(
                "service",
                '~',
                format!(
                    "service {name} peers: {} → {}",
                    o.peers.join(", "),
                    s.peers.join(", ")
                ),
            );
        }
    }
    for name in so.keys() {
        if !sn.contains_key(name) {
            push("service", '-', format!("service {name} removed"));
        }
    }
    let (qo, qn): (BTreeSet<_>, BTreeSet<_>) =
        (old.peers.iter().collect(), new.peers.iter().collect());
    for p in qn.difference(&qo) {
        push("peer", '+', format!("peer {p}"));
    }
    for p in qo.difference(&qn) {
        push("peer", '-', format!("peer {p}"));
    }
    for (k, v) in &new.limits {
        match old.limits.get(k) {
            Some(o) if o != v => push("limit", '~', format!("node {k}: {o} → {v}")),
            Some(_) => {}
            None => push("limit", '+', format!("node {k}: {v}")),
        }
    }
    for (k, o) in &old.limits {
        if !new.limits.contains_key(k) {
            push("limit", '-', format!("node {k}: {o} (removed)"));
        }
    }
    let (to, tn) = (old.trust.as_ref(), new.trust.as_ref());
    if to.map(|t| &t.ca) != tn.map(|t| &t.ca) {
        push(
            "trust",
            '~',
            format!(
                "CA bundle {} → {}: whose certificates are admitted changes",
                to.map_or("none", |t| t.ca.path.as_str()),
                tn.map_or("none", |t| t.ca.path.as_str())
            ),
        );
    }
    match (
        to.and_then(|t| t.crl.as_ref()),
        tn.and_then(|t| t.crl.as_ref()),
    ) {
        (Some(o), None) => push(
            "trust",
            '+',
            format!(
                "CRL {} removed: the certificates it revoked are admitted again",
                o.path
            ),
        ),
        (None, Some(n)) => push(
            "trust",
            '-',
            format!(
                "CRL {} added: the certificates it lists are refused",
                n.path
            ),
        ),
        (Some(o), Some(n)) if o != n => push(
            "trust",
            '~',
            format!("CRL {} → {}: what is revoked changes", o.path, n.path),
        ),
        _ => {}
    }
    // per trust domain: admitted, no longer admitted, or admitted on other terms
    let none = Vec::new();
    let (od, nd) = (
        to.map_or(&none, |t| &t.domains),
        tn.map_or(&none, |t| &t.domains),
    );
    for n in nd {
        match od.iter().find(|o| o.name == n.name) {
            None => push(
                "trust",
                '+',
                format!(
                    "trust domain {}: its identities are admitted, with certificates of {}",
                    n.name, n.ca.path
                ),
            ),
            Some(o) => {
                if o.ca != n.ca {
                    push(
                        "trust",
                        '~',
                        format!(
                            "trust domain {}: bundle {} → {}: which of its certificates are admitted changes",
                            n.name, o.ca.path, n.ca.path
                        ),
                    );
                }
                if o.crl != n.crl {
                    push(
                        "trust",
                        '~',
                        format!("trust domain {}: its CRL changes what is revoked", n.name),
                    );
                }
                if o.bundle_endpoint != n.bundle_endpoint {
                    push(
                        "trust",
                        '~',
                        format!(
                            "trust domain {}: bundle endpoint {} → {}: who may change which of its certificates are admitted changes",
                            n.name,
                            o.bundle_endpoint.as_deref().unwrap_or("none"),
                            n.bundle_endpoint.as_deref().unwrap_or("none")
                        ),
                    );
                }
                if o.dns_names != n.dns_names {
                    push(
                        "trust",
                        '~',
                        format!(
                            "trust domain {}: DNS names it vouches for [{}] → [{}]",
                            n.name,
                            o.dns_names.join(", "),
                            n.dns_names.join(", ")
                        ),
                    );
                }
            }
        }
    }
    for o in od {
        if !nd.iter().any(|n| n.name == o.name) {
            push(
                "trust",
                '-',
                format!(
                    "trust domain {}: its identities are refused (trust_domain)",
                    o.name
                ),
            );
        }
    }
    out
}

/// The plan as text, one change per line.
pub fn plan_text(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no change to access, ports, limits or schemas\n".into();
    }
    let mut s = String::new();
    for c in changes {
        let _ = writeln!(s, "{} {:9} {}", c.sign, c.kind, c.what);
    }
    let _ = writeln!(s, "{} change(s)", changes.len());
    s
}
