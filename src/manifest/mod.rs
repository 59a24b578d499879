//! The port manifest and the access plan. `describe` states what a config exposes —
//! every port with its protocol, TLS mode and allowlist, who may reach which services
//! and methods, the limits — as Markdown or JSON. `plan` compares two configs by that
//! effect, not by text: ports opened, closed or moved, identities that gain or lose
//! access, allowlist ranges added or removed, limits and schemas changed.

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
            protocol: match l.role {
                Role::Peer => "HTTP/2 (h2) and HTTP/1.1 over TLS".into(),
                Role::Local => "HTTP/1.1 and h2c, cleartext".into(),
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
                protocol: if s.protocol == Protocol::Grpc {
                    "grpc"
                } else {
                    "http"
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
        let methods: Vec<String> = if r.methods.is_empty() {
            vec!["*".into()]
        } else {
            r.methods.clone()
        };
        for t in targets {
            for m in &methods {
                access.insert(Access {
                    from: r.from.clone(),
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
    .collect();
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
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "any".into()
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
        let _ = writeln!(s, "| `{}` | {} | {} |", a.from, a.service, a.method);
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
    s
}

/// One effect of a config change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    /// `port`, `access`, `allowlist`, `limit`, `schema`, `service`, `peer`.
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
            .chain(m.admin.iter())
            .map(|p| (p.name.clone(), p.clone()))
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
                        '~',
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
        if let Some(o) = old.limits.get(k).filter(|o| *o != v) {
            push("limit", '~', format!("node {k}: {o} → {v}"));
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
