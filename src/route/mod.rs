//! The route table: which service a request is for. gRPC by the `/pkg.Service/Method`
//! path, HTTP by the `fed-service` header or the first label of the authority, and a
//! dedicated listener by its one service.

use crate::config::Config;
use crate::errors::Reject;
use crate::request::Host;
use std::collections::HashMap;

pub const FED_SERVICE: &str = "fed-service";

pub struct Table {
    by_name: HashMap<String, usize>,
    by_grpc: HashMap<String, usize>,
}

/// The gRPC service and method of a `/pkg.Service/Method` path.
pub fn grpc_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

impl Table {
    pub fn new(cfg: &Config) -> Self {
        let mut by_name = HashMap::new();
        let mut by_grpc = HashMap::new();
        for (i, s) in cfg.services.iter().enumerate() {
            by_name.insert(s.name.clone(), i);
            for g in &s.grpc_services {
                by_grpc.insert(g.clone(), i);
            }
        }
        Self { by_name, by_grpc }
    }

    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The service index for a request: a gRPC call by its path, else by `fed-service`,
    /// else by the first label of its one host (see [`crate::request::host`]).
    pub fn route(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        host: Option<&Host<'_>>,
        grpc: bool,
    ) -> Result<usize, Reject> {
        if grpc {
            if let Some((svc, _)) = grpc_path(path) {
                if let Some(&i) = self.by_grpc.get(svc) {
                    return Ok(i);
                }
                if headers.get(FED_SERVICE).is_none() {
                    return Err(Reject::UnknownService(format!("gRPC service {svc}")));
                }
            }
        }
        let mut named = headers.get_all(FED_SERVICE).iter();
        if let Some(v) = named.next() {
            if named.next().is_some() {
                return Err(Reject::BadRequest("more than one fed-service header"));
            }
            let name = v.to_str().unwrap_or("");
            return self
                .by_name(name)
                .ok_or_else(|| Reject::UnknownService(format!("fed-service {name:?}")));
        }
        let host = host.ok_or(Reject::BadRequest("no :authority or Host header"))?;
        self.by_name(host.first_label())
            .ok_or_else(|| Reject::UnknownService(format!("host {:?}", host.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let text = r#"
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
"#;
        let (cfg, _) = crate::config::compile(std::path::Path::new("t.toml"), text).unwrap();
        Table::new(&cfg)
    }

    fn route(t: &Table, uri: &str, headers: &[(&str, &str)], grpc: bool) -> Result<usize, Reject> {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let r = b.body(()).unwrap();
        let host = crate::request::host(r.uri(), r.headers()).unwrap();
        t.route(r.uri().path(), r.headers(), host.as_ref(), grpc)
    }

    #[test]
    fn grpc_routes_by_path() {
        let t = table();
        assert_eq!(
            route(&t, "http://x:1/orders.v1.Orders/Get", &[], true),
            Ok(0)
        );
        assert!(matches!(
            route(&t, "http://x:1/other.Svc/Get", &[], true),
            Err(Reject::UnknownService(_))
        ));
    }

    #[test]
    fn http_routes_by_authority_label_or_header() {
        let t = table();
        assert_eq!(
            route(&t, "http://inventory.fed.internal:7443/v1", &[], false),
            Ok(1)
        );
        assert_eq!(
            route(&t, "http://INVENTORY.fed.internal./v1", &[], false),
            Ok(1)
        );
        assert_eq!(route(&t, "/v1", &[("host", "inventory:80")], false), Ok(1));
        assert_eq!(
            route(
                &t,
                "http://127.0.0.1:7443/v1",
                &[("fed-service", "orders")],
                false
            ),
            Ok(0)
        );
        assert!(matches!(
            route(
                &t,
                "/v1",
                &[("fed-service", "orders"), ("fed-service", "inventory")],
                false
            ),
            Err(Reject::BadRequest(_))
        ));
        assert!(matches!(
            route(&t, "http://127.0.0.1:7443/v1", &[], false),
            Err(Reject::UnknownService(_))
        ));
        assert!(matches!(
            route(&t, "/v1", &[], false),
            Err(Reject::BadRequest(_))
        ));
    }

    #[test]
    fn grpc_path_parsing() {
        assert_eq!(grpc_path("/a.B/C"), Some(("a.B", "C")));
        assert_eq!(grpc_path("/a.B/"), None);
        assert_eq!(grpc_path("/a.B/C/D"), None);
    }
}
