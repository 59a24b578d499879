//! Authorization, default deny: `[[allow]]` rules compiled at load. A caller's identity
//! is matched against every rule once (per identity, cached), giving its grants; each
//! request then costs a lookup by service index and a short method check.

use crate::config::Config;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use crate::grammar::{pattern, Call, MethodRule, Methods, Pattern};

/// One identity's grants: by service index, which methods.
#[derive(Debug, Default)]
pub struct Grants {
    by_service: HashMap<usize, Methods>,
}

impl Grants {
    pub fn allows(&self, service: usize, call: Call<'_>) -> bool {
        self.by_service
            .get(&service)
            .is_some_and(|m| m.allows(call))
    }
}

struct CompiledRule {
    from: Pattern,
    /// `None`: every service.
    to: Option<usize>,
    methods: Methods,
}

/// The compiled rule set of one configuration, with a per-identity cache of grants.
pub struct Policy {
    rules: Vec<CompiledRule>,
    services: usize,
    cache: Mutex<HashMap<String, Arc<Grants>>>,
}

const CACHE_MAX: usize = 10_000;

impl Policy {
    pub fn new(cfg: &Config) -> Self {
        let index: HashMap<&str, usize> = cfg
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let peers: HashMap<&str, &str> = cfg
            .peers
            .iter()
            .map(|p| (p.name.as_str(), p.identity.as_str()))
            .collect();
        let rules = cfg
            .rules
            .iter()
            .filter_map(|r| {
                let to = if r.to == "*" {
                    None
                } else {
                    Some(*index.get(r.to.as_str())?)
                };
                // a bare peer name stands for that peer's identity
                let from = peers.get(r.from.as_str()).copied().unwrap_or(&r.from);
                Some(CompiledRule {
                    from: Pattern::new(from),
                    to,
                    methods: Methods::compile(&r.methods),
                })
            })
            .collect();
        Self {
            rules,
            services: cfg.services.len(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The grants of an identity: every rule is matched once per identity, then cached.
    pub fn grants(&self, identity: &str) -> Arc<Grants> {
        if let Some(g) = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(identity).cloned())
        {
            return g;
        }
        let mut g = Grants::default();
        let id = pattern::identity(identity);
        for r in self.rules.iter().filter(|r| r.from.matches_identity(&id)) {
            let targets: Box<dyn Iterator<Item = usize>> = match r.to {
                Some(i) => Box::new(std::iter::once(i)),
                None => Box::new(0..self.services),
            };
            for i in targets {
                g.by_service
                    .entry(i)
                    .and_modify(|m| m.merge(&r.methods))
                    .or_insert_with(|| r.methods.clone());
            }
        }
        let g = Arc::new(g);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(identity.to_owned(), g.clone());
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &str) -> Policy {
        let text = format!(
            r#"
[node]
name = "n"
region = "r"
[[service]]
name = "orders"
protocol = "grpc"
endpoints = ["h2c://127.0.0.1:1"]
grpc_services = ["orders.v1.Orders"]
[[service]]
name = "inventory"
protocol = "http"
endpoints = ["http://127.0.0.1:2"]
[[peer]]
name = "east"
region = "e"
address = "127.0.0.9:1"
identity = "spiffe://fed.example/node/east"
{rules}
"#
        );
        let (cfg, _) = crate::config::compile(std::path::Path::new("t.toml"), &text).unwrap();
        Policy::new(&cfg)
    }

    #[test]
    fn rule_matching_table() {
        let p = policy(
            r#"
[[allow]]
from = "spiffe://fed.example/node/*"
to = "orders"
methods = ["orders.v1.Orders/Get"]
[[allow]]
from = "spiffe://fed.example/admin/**"
to = "*"
[[allow]]
from = "east"
to = "inventory"
methods = ["GET /v1/items", "* /v1/public/"]
[[allow]]
from = "*.svc.fed.example"
to = "orders"
methods = ["orders.v1.Orders/*"]
[[allow]]
from = "local"
to = "inventory"
"#,
        );
        let (orders, inventory) = (0, 1);
        let cases: &[(&str, usize, &str, bool)] = &[
            (
                "spiffe://fed.example/node/a",
                orders,
                "orders.v1.Orders/Get",
                true,
            ),
            (
                "spiffe://fed.example/node/a",
                orders,
                "orders.v1.Orders/Delete",
                false,
            ),
            (
                "spiffe://fed.example/node/a",
                inventory,
                "GET /v1/items",
                false,
            ),
            (
                "spiffe://fed.example/node/a/b",
                orders,
                "orders.v1.Orders/Get",
                false,
            ),
            (
                "spiffe://fed.example/node/",
                orders,
                "orders.v1.Orders/Get",
                false,
            ),
            (
                "spiffe://other.example/node/a",
                orders,
                "orders.v1.Orders/Get",
                false,
            ),
            (
                "spiffe://fed.example/admin/x/y",
                orders,
                "orders.v1.Orders/Delete",
                true,
            ),
            (
                "spiffe://fed.example/admin/x",
                inventory,
                "DELETE /v1/all",
                true,
            ),
            ("spiffe://fed.example/admin", inventory, "GET /", false),
            (
                "spiffe://fed.example/node/east",
                inventory,
                "GET /v1/items",
                true,
            ),
            (
                "spiffe://fed.example/node/east",
                inventory,
                "GET /v1/items/7",
                true,
            ),
            (
                "spiffe://fed.example/node/east",
                inventory,
                "POST /v1/items",
                false,
            ),
            (
                "spiffe://fed.example/node/east",
                inventory,
                "PUT /v1/public/x",
                true,
            ),
            (
                "spiffe://fed.example/node/east",
                orders,
                "orders.v1.Orders/Get",
                true,
            ),
            ("a.svc.fed.example", orders, "orders.v1.Orders/List", true),
            (
                "a.b.svc.fed.example",
                orders,
                "orders.v1.Orders/List",
                false,
            ),
            ("a.svc.fed.example", inventory, "GET /", false),
            ("local", inventory, "POST /v1/reserve", true),
            ("local", orders, "orders.v1.Orders/Get", false),
            ("nobody", orders, "orders.v1.Orders/Get", false),
        ];
        for (id, svc, call, want) in cases {
            let c = match call.split_once(' ') {
                Some((v, path)) => Call::Http(v, path),
                None => Call::Grpc(call),
            };
            assert_eq!(p.grants(id).allows(*svc, c), *want, "{id} -> {svc} {call}");
        }
    }

    #[test]
    fn no_rules_deny_everything() {
        let p = policy("");
        assert!(!p
            .grants("spiffe://fed.example/node/a")
            .allows(0, Call::Grpc("orders.v1.Orders/Get")));
        assert!(!p.grants("local").allows(1, Call::Http("GET", "/")));
    }

    #[test]
    fn grants_are_cached_per_identity() {
        let p = policy("[[allow]]\nfrom = \"*\"\nto = \"*\"\n");
        let a = p.grants("x");
        let b = p.grants("x");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.allows(1, Call::Http("GET", "/")));
    }
}
