//! `[[listener]]`: binds, roles, allowlists, PROXY protocol, timeouts and caps.

use super::*;

impl Checker<'_> {
    pub(super) fn listeners(
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
            // 0 would cut every connection the moment it is idle (a TCP service's at once)
            let idle_timeout =
                self.nonzero_duration(r.idle_timeout.as_ref(), Duration::from_secs(300));
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
}
