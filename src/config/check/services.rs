//! `[[service]]`: endpoints, protocols, formats, schemas (compiled by
//! `schema::compile`), limits, health checks and outlier detection.

use super::*;

impl Checker<'_> {
    /// `node_zone`: the node's `zone`, where endpoints without one are.
    pub(super) fn services(
        &mut self,
        raw: &[S<raw::RawService>],
        node_zone: Option<&str>,
    ) -> Vec<Service> {
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
                "tcp" => Protocol::Tcp,
                other => {
                    self.sink.error(
                        span(&r.protocol),
                        format!("unknown protocol {other:?}"),
                        "protocol is \"grpc\", \"http\" or \"tcp\"",
                    );
                    Protocol::Http
                }
            };
            let mut endpoints = Vec::new();
            for e in &r.endpoints {
                if let Some(ep) = self.endpoint(e) {
                    if (protocol == Protocol::Tcp) != (ep.scheme == Scheme::Tcp) {
                        self.sink.error(
                            span(e),
                            if protocol == Protocol::Tcp {
                                format!("TCP service {:?} has endpoint {}, which is not tcp://", r.name.get_ref(), ep.url)
                            } else {
                                format!("endpoint {} is tcp://, but service {:?} is not protocol = \"tcp\"", ep.url, r.name.get_ref())
                            },
                            "a TCP service's endpoints are tcp://host:port; an HTTP or gRPC service's are http://, h2c:// or https://",
                        );
                        continue;
                    }
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
            let authorization = self.authorization(r.authorization.as_ref());
            let mut locality_weights = Vec::new();
            for (zone, w) in r.locality_weights.iter().flat_map(|m| m.get_ref()) {
                match u32::try_from(*w.get_ref()) {
                    Ok(n) if n <= 1_000_000 => locality_weights.push((zone.clone(), n)),
                    _ => self.sink.error(
                        span(w),
                        format!("locality weight {} of zone {zone:?} is not a whole number from 0 to 1000000", w.get_ref()),
                        "weights are shares: locality_weights = { a = 80, b = 20 }",
                    ),
                }
            }
            if let Some(lw) = &r.locality_weights {
                if !locality_weights.is_empty() && locality_weights.iter().all(|(_, w)| *w == 0) {
                    self.sink.error(
                        span(lw),
                        "every locality weight is 0: no zone would take traffic",
                        "give at least one zone a weight above 0",
                    );
                }
                for (zone, _) in &locality_weights {
                    let known = endpoints
                        .iter()
                        .any(|e| e.zone.as_deref().unwrap_or(node_zone.unwrap_or("")) == zone);
                    if !known {
                        self.sink.warn(
                            span(lw),
                            format!("no endpoint of service {:?} is in zone {zone:?}", r.name.get_ref()),
                            "give its endpoints zones: endpoints = [{ url = \"http://…\", zone = \"b\" }] (one without a zone is in the node's)",
                        );
                    }
                }
            }
            let zone_spill_below = match &r.zone_spill_below {
                None => 0.7,
                Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref(),
                Some(v) => {
                    self.sink.error(
                        span(v),
                        "zone_spill_below is a share from 0 to 1",
                        "e.g. zone_spill_below = 0.7: below 70% of the zone's endpoints healthy, traffic spills to the other zones",
                    );
                    0.7
                }
            };
            out.push(Service {
                locality_weights,
                zone_spill_below,
                authorization,
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

    pub(super) fn health(&mut self, h: &S<raw::RawHealth>) -> HealthCheck {
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

    pub(super) fn outlier(&mut self, o: &S<raw::RawOutlier>) -> Outlier {
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

    /// Compiles the service's proto files and JSON Schema routes (`schema::compile`);
    /// returns the gRPC services the proto files declare.
    pub(super) fn schema(
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

    pub(super) fn endpoint(&mut self, e: &S<raw::RawEndpoint>) -> Option<Endpoint> {
        let text = &e.get_ref().url().to_owned();
        let hint =
            "write scheme://host:port with scheme http (HTTP/1.1), h2c (HTTP/2 cleartext), https, or tcp (a TCP service's)";
        let Some((scheme, rest)) = text.split_once("://") else {
            self.sink
                .error(span(e), format!("endpoint {text:?} has no scheme"), hint);
            return None;
        };
        let scheme = match scheme {
            "http" => Scheme::Http1,
            "h2c" => Scheme::H2c,
            "https" => Scheme::Https,
            "tcp" => Scheme::Tcp,
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
        let port = match (auth.port_u16(), scheme) {
            (Some(p), _) => p,
            (None, Scheme::Tcp) => {
                self.sink.error(
                    span(e),
                    format!("endpoint {text:?} has no port"),
                    "a tcp:// endpoint names its port: tcp://host:port",
                );
                return None;
            }
            (None, Scheme::Https) => 443,
            (None, _) => 80,
        };
        Some(Endpoint {
            url: text.clone(),
            zone: e.get_ref().zone().map(str::to_owned),
            scheme,
            host: auth
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }
}
