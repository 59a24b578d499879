//! `[node]`, `[tls]`, `[registry]`, `[tracing]`, `[spikes]`, `[[limit]]` and the
//! federation-wide checks that read several sections.

use super::*;
use crate::identity::bundle::Authorities;
use crate::identity::domains::{BundleEndpoint, DomainSpec, Profile};

impl Checker<'_> {
    pub(super) fn registry(
        &mut self,
        r: &raw::RawRegistry,
        static_peers: &[S<raw::RawPeer>],
    ) -> Registry {
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

    pub(super) fn tracing(&mut self, t: Option<&S<raw::RawTracing>>) -> Tracing {
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

    pub(super) fn spikes(&mut self, s: &S<raw::RawSpikes>) -> Spikes {
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

    pub(super) fn node(&mut self, n: &S<raw::RawNode>) -> Option<Node> {
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
        let upgrade_drain_timeout =
            self.duration(r.upgrade_drain_timeout.as_ref(), Duration::from_secs(60));
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
            upgrade_drain_timeout,
            upstream_max_requests,
            upstream_connections,
            access_log: match r.access_log.as_ref().map(|a| (a, *a.get_ref())) {
                // a file for the access log is asked for: every request, unless a share
                None if r.access_log_file.is_some() => 1.0,
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
            access_log_file: r.access_log_file.as_ref().map(|p| {
                let path = self.path(p.get_ref());
                if !path.parent().is_some_and(Path::is_dir) {
                    self.sink.error(
                        span(p),
                        format!("the directory of access_log_file {:?} does not exist", p.get_ref()),
                        "create it, or name a file in a directory that exists (fedport makes the file, not its directory)",
                    );
                }
                path
            }),
            authorization: self
                .authorization(r.authorization.as_ref())
                .unwrap_or_default(),
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
    pub(super) fn federation(
        &mut self,
        raw: &RawConfig,
        peers: &[Peer],
        services: &HashMap<&str, ()>,
    ) {
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

    pub(super) fn limits(
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

    pub(super) fn tls(
        &mut self,
        t: &S<raw::RawTls>,
        domains: &[S<raw::RawTrustDomain>],
        serve: Option<&S<raw::RawServeBundle>>,
    ) -> Option<Tls> {
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
        let trust_domains = self.trust_domains(&files, domains);
        let serve_bundle = match serve {
            Some(b) => Some(self.serve_bundle(&files, b)?),
            None => None,
        };
        ok.then_some(Tls {
            files,
            allow_tls12,
            crl,
            handshake_timeout,
            trust_domains: trust_domains?,
            serve_bundle,
        })
    }

    /// `[bundle_endpoint]`: an address, a refresh hint, and a node whose certificate
    /// names the trust domain whose bundle it serves.
    fn serve_bundle(
        &mut self,
        files: &TlsFiles,
        b: &S<raw::RawServeBundle>,
    ) -> Option<crate::config::ServeBundle> {
        let r = b.get_ref();
        let bind = self.socket_addr(&r.bind);
        let refresh_hint = self.duration(r.refresh_hint.as_ref(), Duration::from_secs(300));
        if refresh_hint < Duration::from_secs(1) {
            self.sink.error(
                span(r.refresh_hint.as_ref().unwrap_or(&r.bind)),
                "a refresh hint under 1s",
                "fetchers ask again this often: give seconds to minutes, e.g. \"5m\"",
            );
            return None;
        }
        if let Ok(cas) = identity::load_certs(&files.ca) {
            if let Err(e) = identity::bundle::render(&cas, 0, refresh_hint) {
                self.sink.error(
                    span(b),
                    format!("[tls] ca cannot be served as a SPIFFE bundle: {e}"),
                    "a bundle's keys are RSA, EC P-256/P-384/P-521 or Ed25519 CA certificates",
                );
                return None;
            }
        }
        if identity::domains::own_domain(&files.cert).is_none() {
            self.sink.error(
                span(b),
                "[bundle_endpoint] serves this node's trust domain's bundle, but its certificate names no trust domain",
                "give the node a certificate with a SPIFFE ID (spiffe://DOMAIN/...): its fetchers verify the endpoint by it",
            );
            return None;
        }
        Some(crate::config::ServeBundle {
            bind: bind?,
            refresh_hint,
        })
    }

    /// `authorization = "enforce" | "audit"`.
    pub(super) fn authorization(&mut self, v: Option<&S<String>>) -> Option<Authorization> {
        let v = v?;
        match v.get_ref().as_str() {
            "enforce" => Some(Authorization::Enforce),
            "audit" => Some(Authorization::Audit),
            other => {
                self.sink.error(
                    span(v),
                    format!("authorization {other:?} is neither \"enforce\" nor \"audit\""),
                    "\"enforce\" (the default) refuses calls no rule allows; \"audit\" serves them and counts them as would_deny",
                );
                None
            }
        }
    }

    /// `[[trust_domain]]`s: each a well-formed SPIFFE trust domain other than the
    /// node's own, named once, with a readable bundle; no DNS name vouched for by two.
    fn trust_domains(
        &mut self,
        files: &TlsFiles,
        domains: &[S<raw::RawTrustDomain>],
    ) -> Option<Vec<DomainSpec>> {
        let own = identity::domains::own_domain(&files.cert);
        let own_dns: Vec<String> = identity::load_certs(&files.cert)
            .ok()
            .and_then(|c| c.first().map(identity::dns_sans))
            .unwrap_or_default();
        let mut out: Vec<DomainSpec> = Vec::new();
        let mut ok = true;
        // every bundle's CA certificates, read once: [tls] ca's, then each domain's
        let mut bundles = vec![(
            "[tls] ca".to_owned(),
            identity::load_certs(&files.ca).unwrap_or_default(),
        )];
        for d in domains {
            let r = d.get_ref();
            let name = r.name.get_ref();
            let well_formed = !name.split('.').any(str::is_empty)
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
            if !well_formed {
                ok = false;
                self.sink.error(
                    span(&r.name),
                    format!("{name:?} is not a SPIFFE trust domain"),
                    "name it as a SPIFFE ID's authority: lower-case letters, digits, '.', '-' and '_', e.g. \"b.example\" (without spiffe://)",
                );
                continue;
            }
            if own.as_deref() == Some(name.as_str()) {
                ok = false;
                self.sink.error(
                    span(&r.name),
                    format!("{name:?} is this node's own trust domain"),
                    "the node's own domain's bundle is [tls] ca; a [[trust_domain]] is for another organisation's",
                );
                continue;
            }
            if out.iter().any(|o| &o.name == name) {
                ok = false;
                self.sink.error(
                    span(&r.name),
                    format!("trust domain {name:?} is configured twice"),
                    "give each trust domain one [[trust_domain]], its bundle holding every CA it uses",
                );
                continue;
            }
            let Some((authorities, at)) = self.authorities(r) else {
                ok = false;
                continue;
            };
            // one file per domain: two fetches writing one file would let each domain's
            // CAs vouch for the other's identities in turn
            if let Some(o) = out
                .iter()
                .find(|o| same_file(o.authorities.path(), authorities.path()))
            {
                ok = false;
                self.sink.error(
                    span(at),
                    format!(
                        "trust domain {name:?} names the bundle file of trust domain {:?}",
                        o.name
                    ),
                    "give each trust domain a file of its own",
                );
                continue;
            }
            let endpoint = match &r.bundle_endpoint {
                Some(e) => match self.bundle_endpoint(name, r, e) {
                    Some(e) => Some(e),
                    None => {
                        ok = false;
                        continue;
                    }
                },
                None => None,
            };
            let loaded = authorities.load();
            // an https_spiffe endpoint of the domain itself is verified by the domain's
            // bundle: the first one must be there (brought out of band, once)
            let self_served = matches!(
                endpoint.as_ref().map(|e| &e.profile),
                Some(Profile::Spiffe(id)) if identity::domains::domain_of(id) == Some(name.as_str())
            );
            match &loaded {
                Err(e) if self_served => {
                    ok = false;
                    self.sink.error(
                        span(at),
                        format!("{e}: trust domain {name:?} serves its own bundle over https_spiffe, and its endpoint can only be verified by a bundle of the domain already held"),
                        "put a first bundle there once (e.g. curl --cacert THEIR_CA https://…/ > FILE, or their CA as a bundle), or use profile = \"https_web\"",
                    );
                }
                // a bundle its endpoint will bring need not exist yet: until the first
                // fetch the domain's identities are refused
                Err(e) if endpoint.is_some() && !authorities.path().exists() => {
                    self.sink.warn(
                        span(at),
                        format!("{e}: until the first fetch from the bundle endpoint, trust domain {name:?}'s identities are refused"),
                        "the fetch writes the bundle there; the directory must be writable by fedport",
                    );
                }
                Err(e) => {
                    ok = false;
                    self.sink.error(
                        span(at),
                        e.to_string(),
                        match authorities {
                            Authorities::Pem(_) => {
                                "ca holds the domain's CA certificates, PEM-encoded"
                            }
                            Authorities::Spiffe(_) => {
                                "bundle holds a SPIFFE trust bundle: a JWKS whose keys of use \"x509-svid\" carry each CA in x5c"
                            }
                        },
                    );
                }
                Ok(_) => {}
            }
            // one CA in two bundles would vouch for both domains' identities: the
            // separation the domains exist for (and the likely leftover of a merged
            // bundle from before trust domains)
            let mine = loaded.unwrap_or_default();
            let shared = bundles
                .iter()
                .find(|(_, theirs)| theirs.iter().any(|c| mine.contains(c)));
            if let Some((whose, _)) = shared {
                ok = false;
                self.sink.error(
                    span(at),
                    format!("trust domain {name:?}'s bundle holds a CA that {whose} holds too"),
                    "each organisation's CA belongs in its own domain's bundle only: remove it from the other",
                );
            }
            bundles.push((format!("trust domain {name:?}"), mine));
            let crl = r.crl.as_ref().map(|c| {
                let p = self.path(c.get_ref());
                if let Err(e) = identity::load_crls(&p) {
                    ok = false;
                    self.sink.error(
                        span(c),
                        e.to_string(),
                        "give the path of a PEM CRL signed by this trust domain's CA",
                    );
                }
                p
            });
            let mut dns_names = Vec::new();
            for n in r.dns_names.iter().flatten() {
                let v = n.get_ref();
                let host = v.strip_prefix("*.").unwrap_or(v);
                if !crate::grammar::pattern::is_identity(host)
                    || host.starts_with("spiffe://")
                    || host != host.to_ascii_lowercase()
                {
                    ok = false;
                    self.sink.error(
                        span(n),
                        format!("{v:?} is not a DNS name"),
                        "list lower-case host names (\"db.b.example\") or one-label wildcards (\"*.svc.b.example\")",
                    );
                    continue;
                }
                // the node's own DNS names are its own domain's: another organisation
                // vouching for one could pass for this node to its peers
                if identity::domains::dns_overlap(std::slice::from_ref(v), &own_dns).is_some() {
                    ok = false;
                    self.sink.error(
                        span(n),
                        format!("{v:?} covers a DNS name of this node's own certificate"),
                        "the node's own names are vouched for by [tls] ca only: list the other organisation's names",
                    );
                    continue;
                }
                if let Some(o) = out.iter().find(|o| {
                    identity::domains::dns_overlap(std::slice::from_ref(v), &o.dns_names).is_some()
                }) {
                    ok = false;
                    self.sink.error(
                        span(n),
                        format!("{v:?} is vouched for by trust domain {:?} as well", o.name),
                        "a DNS name may be vouched for by one trust domain only",
                    );
                    continue;
                }
                dns_names.push(v.clone());
            }
            out.push(DomainSpec {
                name: name.clone(),
                authorities,
                crl,
                dns_names,
                endpoint,
            });
        }
        // an https_spiffe endpoint is verified by the bundle of its SPIFFE ID's domain:
        // one this node has
        for (d, r) in out.iter().zip(domains.iter().map(|d| d.get_ref())) {
            let Some(Profile::Spiffe(id)) = d.endpoint.as_ref().map(|e| &e.profile) else {
                continue;
            };
            if let identity::domains::Bundle::Refused(why) =
                identity::domains::bundle_for(own.as_deref(), &out, id)
            {
                ok = false;
                let at = r.bundle_endpoint.as_ref().map_or(&r.name, |e| {
                    e.get_ref().spiffe_id.as_ref().unwrap_or(&e.get_ref().url)
                });
                self.sink.error(
                    span(at),
                    format!("the bundle endpoint of {:?} cannot be verified: {why}", d.name),
                    "an https_spiffe endpoint presents a SPIFFE ID of a domain this node has a bundle for (usually the domain itself)",
                );
            }
        }
        ok.then_some(out)
    }

    /// A domain's `ca` or `bundle` (one of the two), and where it was written.
    fn authorities<'r>(
        &mut self,
        r: &'r raw::RawTrustDomain,
    ) -> Option<(Authorities, &'r S<String>)> {
        match (&r.ca, &r.bundle) {
            (Some(ca), None) => Some((Authorities::Pem(self.path(ca.get_ref())), ca)),
            (None, Some(b)) => Some((Authorities::Spiffe(self.path(b.get_ref())), b)),
            (Some(ca), Some(_)) => {
                self.sink.error(
                    span(ca),
                    format!("trust domain {:?} has both ca and bundle", r.name.get_ref()),
                    "give its CAs one way: ca (PEM) or bundle (a SPIFFE bundle, JWKS)",
                );
                None
            }
            (None, None) => {
                self.sink.error(
                    span(&r.name),
                    format!("trust domain {:?} has neither ca nor bundle", r.name.get_ref()),
                    "give ca = \"PATH\" (PEM CA certificates) or bundle = \"PATH\" (a SPIFFE bundle)",
                );
                None
            }
        }
    }

    /// `bundle_endpoint = { url, profile, spiffe_id }`: an https URL; `https_spiffe`
    /// (the default) with the SPIFFE ID the endpoint presents, `https_web` without.
    fn bundle_endpoint(
        &mut self,
        name: &str,
        r: &raw::RawTrustDomain,
        e: &S<raw::RawBundleEndpoint>,
    ) -> Option<BundleEndpoint> {
        let er = e.get_ref();
        if r.bundle.is_none() {
            self.sink.error(
                span(e),
                format!("trust domain {name:?} fetches its bundle but has no bundle file to keep it in"),
                "give bundle = \"PATH\" (instead of ca): the last good bundle is kept there, through outages and restarts; for https_spiffe it must hold the first one",
            );
            return None;
        }
        let url = er.url.get_ref();
        let parsed = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()));
        if parsed.is_none() {
            self.sink.error(
                span(&er.url),
                format!("{url:?} is not an https:// URL"),
                "a bundle endpoint is fetched over TLS: \"https://host:port/path\"",
            );
            return None;
        }
        let profile = match (
            er.profile.as_ref().map(|p| (p, p.get_ref().as_str())),
            &er.spiffe_id,
        ) {
            (None | Some((_, "https_spiffe")), Some(id)) => {
                let v = id.get_ref();
                if identity::domains::domain_of(v).is_none_or(|d| d.is_empty()) {
                    self.sink.error(
                        span(id),
                        format!("{v:?} is not a SPIFFE ID"),
                        "the SPIFFE ID the endpoint's certificate carries, e.g. \"spiffe://b.example/node/b\"",
                    );
                    return None;
                }
                Profile::Spiffe(v.clone())
            }
            (None | Some((_, "https_spiffe")), None) => {
                self.sink.error(
                    span(e),
                    "an https_spiffe bundle endpoint needs the spiffe_id it presents",
                    "add spiffe_id = \"spiffe://DOMAIN/...\", or profile = \"https_web\" for an endpoint with a Web PKI certificate",
                );
                return None;
            }
            (Some((_, "https_web")), None) => Profile::Web,
            (Some((_, "https_web")), Some(id)) => {
                self.sink.error(
                    span(id),
                    "spiffe_id is for the https_spiffe profile",
                    "an https_web endpoint is verified by the system's roots and the URL's host",
                );
                return None;
            }
            (Some((p, other)), _) => {
                self.sink.error(
                    span(p),
                    format!("bundle endpoint profile {other:?} is neither https_spiffe nor https_web"),
                    "profile = \"https_spiffe\" (the endpoint presents a SPIFFE ID) or \"https_web\" (a Web PKI certificate)",
                );
                return None;
            }
        };
        Some(BundleEndpoint {
            url: url.clone(),
            profile,
        })
    }
}

/// Whether two paths name one file: compared by their directory as it resolves and
/// their file name (the file itself may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    let norm = |p: &Path| {
        let dir = p.parent().and_then(|d| std::fs::canonicalize(d).ok());
        (dir, p.file_name().map(|n| n.to_owned()))
    };
    a == b || norm(a) == norm(b)
}
