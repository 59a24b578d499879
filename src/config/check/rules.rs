//! `[[peer]]` and `[[allow]]`: peer identities, rules, identity patterns and method
//! entries.

use super::*;

impl Checker<'_> {
    pub(super) fn peers(&mut self, raw: &[S<raw::RawPeer>]) -> Vec<Peer> {
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
            let reverse = r.reverse.as_ref().is_some_and(|v| *v.get_ref());
            let addr = r
                .address
                .as_ref()
                .map(|a| a.get_ref().clone())
                .unwrap_or_default();
            match &r.address {
                None if !reverse => self.sink.error(
                    span(&r.name),
                    format!("peer {:?} has no address", r.name.get_ref()),
                    "write the peer's internal port, e.g. address = \"10.1.0.7:7443\"; or, for a site that dials this node, reverse = true",
                ),
                None => {}
                Some(a) => {
                    let ok_addr = addr.parse::<SocketAddr>().is_ok()
                        || addr
                            .rsplit_once(':')
                            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
                    if !ok_addr {
                        self.sink.error(
                            span(a),
                            format!("peer address {addr:?} is not host:port"),
                            "write the peer's internal port, e.g. \"10.1.0.7:7443\"",
                        );
                    }
                }
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
                address: addr,
                identity: id.clone(),
                services: r.services.iter().map(|s| s.get_ref().clone()).collect(),
                reverse,
            });
        }
        out
    }

    /// Reverse peers: either way the link is served on a peer listener that serves
    /// HTTP — the one the peer dials, or the one whose settings the link this node
    /// dials is served with.
    pub(super) fn reverse_peers(&mut self, raw: &[S<raw::RawPeer>], listeners: &[Listener]) {
        let http_peer = listeners
            .iter()
            .any(|l| l.role == Role::Peer && l.service.is_none());
        for p in raw {
            let r = p.get_ref();
            let Some(rev) = r.reverse.as_ref().filter(|v| *v.get_ref()) else {
                continue;
            };
            if http_peer {
                continue;
            }
            let (what, hint) = if r.address.is_some() {
                (
                    format!("this node dials peer {:?} and serves its requests on that link, as a connection of a peer listener: there is none that serves HTTP", r.name.get_ref()),
                    "add a [[listener]] (role = \"peer\", the default, with no service): its rules, limits and timeouts apply to the link; nothing need reach its port",
                )
            } else {
                (
                    format!("peer {:?} dials this node, but no peer listener serves HTTP for it to dial", r.name.get_ref()),
                    "add a [[listener]] (role = \"peer\", the default, with no service) on an address the peer can reach",
                )
            };
            self.sink.error(span(rev), what, hint);
        }
    }

    pub(super) fn rules(
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

    /// Checks an identity pattern (`[[allow]] from`, `[[limit]] from`).
    pub(super) fn identity_pattern(&mut self, p: &S<String>) {
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
    pub(super) fn method_rule(
        &mut self,
        m: &S<String>,
        what: &str,
    ) -> Option<crate::grammar::MethodRule> {
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

    /// Names what changed in a `VERB /path` entry's meaning: entries used to match a
    /// path as a plain prefix of the request's, so `GET /v1/item` also granted (or made
    /// retryable) `/v1/items`. They now match at `/` boundaries only. Where the
    /// service's JSON Schema routes name such a longer path, `check` says so.
    pub(super) fn prefix_changes(
        &mut self,
        allow: &[S<raw::RawAllow>],
        raw_services: &[S<raw::RawService>],
        services: &[Service],
    ) {
        let longer = |svc: &Service, entry: &str| -> Option<String> {
            let (verb, path) = entry.split_once(' ')?;
            if path.contains('*') || path.ends_with('/') {
                return None;
            }
            svc.json.iter().find_map(|r| {
                let (m, template) = r.route.split_once(' ')?;
                let literal = &template[..template.find('{').unwrap_or(template.len())];
                let longer = literal.len() > path.len()
                    && literal.starts_with(path)
                    && literal.as_bytes()[path.len()] != b'/';
                (longer && (verb == "*" || verb == m)).then(|| r.route.to_string())
            })
        };
        let warn = |me: &mut Self, at: &S<String>, what: &str, route: String| {
            me.sink.warn(
                span(at),
                format!("this {what} entry used to match {route:?} as a prefix of its path; it now matches its own path and the paths below it at a '/' boundary only"),
                "to keep the longer path, list it too (or end the entry with /* for the segments below)",
            );
        };
        for a in allow {
            let r = a.get_ref();
            let to = r.to.get_ref();
            for m in r.methods.iter().flatten() {
                let hit = services
                    .iter()
                    .filter(|s| to == "*" || &s.name == to)
                    .find_map(|s| longer(s, m.get_ref()));
                if let Some(route) = hit {
                    warn(self, m, "rule", route);
                }
            }
        }
        for rs in raw_services {
            let r = rs.get_ref();
            let Some(svc) = services.iter().find(|s| &s.name == r.name.get_ref()) else {
                continue;
            };
            for m in r.idempotent.iter().flatten() {
                if let Some(route) = longer(svc, m.get_ref()) {
                    warn(self, m, "idempotent", route);
                }
            }
        }
    }

    /// TCP services: reached through a listener of their own or peers' CONNECT streams,
    /// by rules without methods, with nothing of HTTP's (formats, schemas) to check.
    pub(super) fn tcp_services(&mut self, raw: &raw::RawConfig, services: &[Service]) {
        let tcp = |name: &str| {
            services
                .iter()
                .any(|s| s.name == name && s.protocol == Protocol::Tcp)
        };
        let any_tcp = services.iter().any(|s| s.protocol == Protocol::Tcp);
        for a in &raw.allow {
            let r = a.get_ref();
            let methods = r.methods.as_ref().filter(|m| !m.is_empty());
            // `to = "*"` with no methods admits the TCP services' bytes too
            if any_tcp && r.to.get_ref() == "*" && methods.is_none() {
                self.sink.warn(
                    span(&r.to),
                    "this rule grants every service, the TCP services' connections included",
                    "name the TCP services a rule should open, or give this one methods (which no TCP connection has)",
                );
            }
            if let (true, Some(m)) = (tcp(r.to.get_ref()), methods) {
                self.sink.error(
                    span(&m[0]),
                    format!("a rule for TCP service {:?} names methods", r.to.get_ref()),
                    "a TCP connection has no method: leave methods out (the rule admits the identity to the service)",
                );
            }
        }
        for rs in &raw.service {
            let r = rs.get_ref();
            let Some(s) = services
                .iter()
                .find(|s| &s.name == r.name.get_ref() && s.protocol == Protocol::Tcp)
            else {
                continue;
            };
            if r.schema.is_some() || r.formats.is_some() || r.grpc_services.is_some() {
                self.sink.error(
                    span(&r.protocol),
                    format!("TCP service {:?} has formats, a schema or gRPC services", s.name),
                    "a TCP service's bytes are spliced, not read: remove formats, schema and grpc_services",
                );
            }
            // no listener of its own is no fault: peers reach it by CONNECT streams on
            // the peer listeners (and one with no endpoints is refused above unless a
            // [[peer]] offers it)
        }
    }
}
