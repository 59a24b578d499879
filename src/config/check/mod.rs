//! Checks of the one TOML file, one file a section: every problem found at once, each
//! at its `file:line:col` with a hint, and the runtime [`Config`] compiled from what
//! passes. [`Checker::run`] calls each section's check in the order the file reads.

mod listeners;
mod node;
mod rules;
mod services;

use super::*;

pub(super) struct Checker<'a> {
    pub(super) sink: &'a mut Sink,
    pub(super) base: PathBuf,
}

fn span<T>(s: &S<T>) -> std::ops::Range<usize> {
    s.span()
}

impl Checker<'_> {
    pub(super) fn run(&mut self, raw: RawConfig, path: &Path, text: &str) -> Option<Config> {
        let node = self.node(&raw.node);
        let tls = raw
            .tls
            .as_ref()
            .map(|t| self.tls(t, &raw.trust_domain, raw.bundle_endpoint.as_ref()));
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
        let node_zone = raw
            .node
            .get_ref()
            .zone
            .as_ref()
            .map(|z| z.get_ref().as_str());
        let services = self.services(&raw.service, node_zone);
        let service_names: HashMap<&str, ()> =
            services.iter().map(|s| (s.name.as_str(), ())).collect();
        let listeners = self.listeners(&raw.listener, &service_names, admin);
        let peers = self.peers(&raw.peer);
        let peer_names: HashMap<&str, ()> = peers.iter().map(|p| (p.name.as_str(), ())).collect();
        self.federation(&raw, &peers, &service_names);
        let rules = self.rules(&raw.allow, &service_names, &peer_names);
        self.prefix_changes(&raw.allow, &raw.service, &services);
        self.tcp_services(&raw, &services);
        self.reverse_peers(&raw.peer, &listeners);
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
        if let (Some(b), None) = (&raw.bundle_endpoint, &raw.tls) {
            self.sink.error(
                span(b),
                "[bundle_endpoint] serves this node's trust bundle, but there is no [tls] section",
                "add [tls] with cert, key and ca: the bundle served is [tls] ca, over TLS with [tls] cert",
            );
        }
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
        // a peer is dialled only if a bundle vouches for its identity's domain
        if let Some(t) = &tls {
            let own = crate::identity::domains::own_domain(&t.files.cert);
            for p in &raw.peer {
                let id = &p.get_ref().identity;
                if let crate::identity::domains::Bundle::Refused(why) =
                    crate::identity::domains::bundle_for(
                        own.as_deref(),
                        &t.trust_domains,
                        id.get_ref(),
                    )
                {
                    self.sink.error(
                        span(id),
                        why,
                        "add a [[trust_domain]] for the peer's organisation, with its CA bundle",
                    );
                }
            }
        }
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
