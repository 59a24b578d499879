//! A recorded request judged under a configuration, by the stages a live one meets
//! first: its head read one way (hygiene), its route, and the `[[allow]]` rules with
//! the service's authorization mode. For `fedport plan OLD NEW --replay`. What needs
//! the live node (limits, the body, health) is not judged.

use super::outcome::Routed;
use super::{hygiene, routing};
use crate::config::{Authorization, Config};
use crate::reason::Reason;
use crate::request::ContentTypeField;
use std::sync::Arc;

/// What the access log recorded of a request's head.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub listener: String,
    pub identity: String,
    pub method: String,
    pub path: String,
    /// The authority the request named (`:authority` or `Host`), if any.
    pub authority: String,
    pub fed_service: String,
    pub content_type: String,
}

/// How a configuration decides a recorded request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A rule allows it.
    Allowed,
    /// No rule allows it; its service's audit mode serves it.
    Audited,
    /// Refused, and why (`denied` for the rules).
    Refused(Reason),
    /// The configuration has no listener of that name: the request cannot arrive.
    NoListener,
}

impl Outcome {
    /// Whether the request reaches its service.
    pub fn served(&self) -> bool {
        matches!(self, Outcome::Allowed | Outcome::Audited)
    }

    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Audited => "audited",
            Outcome::Refused(r) => r.as_str(),
            Outcome::NoListener => "no_listener",
        }
    }
}

/// The decision: the service (if routed), the method as the rules see it, the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub service: Option<String>,
    pub method: String,
    pub outcome: Outcome,
}

/// One configuration, ready to judge requests: its routing table and rules.
pub struct Judge {
    config: Arc<Config>,
    table: crate::route::Table,
    policy: crate::policy::Policy,
}

impl Judge {
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            table: crate::route::Table::new(&config),
            policy: crate::policy::Policy::new(&config),
            config,
        }
    }

    pub fn judge(&self, r: &Recorded) -> Verdict {
        let call_of = |r: &Recorded| format!("{} {}", r.method, r.path);
        let refused = |service: Option<String>, method: String, reason: Reason| Verdict {
            service,
            method,
            outcome: Outcome::Refused(reason),
        };
        let Some(listener) = self.config.listeners.iter().find(|l| l.name == r.listener) else {
            return Verdict {
                service: None,
                method: call_of(r),
                outcome: Outcome::NoListener,
            };
        };
        let Some(parts) = head(r) else {
            return refused(None, call_of(r), Reason::BadRequest);
        };
        let host = match hygiene::read(&parts) {
            Ok(h) => h,
            Err(e) => return refused(None, call_of(r), e.reason()),
        };
        let ct = ContentTypeField::of(&parts.headers);
        let mut routed = Routed::default();
        let (route, call) = match routing::route_in(
            &self.table,
            &self.config,
            listener.service.as_deref(),
            &parts,
            host,
            &ct,
            &mut routed,
        ) {
            Ok(x) => x,
            Err(e) => {
                let service = routed.service.map(|i| self.config.services[i].name.clone());
                return refused(service, call_of(r), e.reason());
            }
        };
        let service = route.service;
        // as the metrics name it: the schema method or JSON Schema route, else the call
        let method = routed
            .method
            .as_deref()
            .map_or_else(|| call.to_string(), str::to_owned);
        let outcome = if self.policy.grants(&r.identity).allows(route.idx, call) {
            Outcome::Allowed
        } else if service
            .authorization
            .unwrap_or(self.config.node.authorization)
            == Authorization::Audit
        {
            Outcome::Audited
        } else {
            Outcome::Refused(Reason::Denied)
        };
        Verdict {
            service: Some(service.name.clone()),
            method,
            outcome,
        }
    }
}

/// The request's head as it arrived, rebuilt from what was recorded: the authority as
/// a `Host` field (read, and refused when malformed, as a live one is), and each field
/// the log joined with ", " as the fields it was.
fn head(r: &Recorded) -> Option<http::request::Parts> {
    let method = http::Method::from_bytes(r.method.as_bytes()).ok()?;
    let uri: http::Uri = r.path.parse().ok()?;
    let mut b = http::Request::builder().method(method).uri(uri);
    let fields = |v: &str| -> Vec<String> {
        if v.is_empty() {
            Vec::new()
        } else {
            v.split(", ").map(str::to_owned).collect()
        }
    };
    for h in fields(&r.authority) {
        b = b.header(http::header::HOST, h);
    }
    for v in fields(&r.fed_service) {
        b = b.header("fed-service", v);
    }
    for v in fields(&r.content_type) {
        b = b.header(http::header::CONTENT_TYPE, v);
    }
    Some(b.body(()).ok()?.into_parts().0)
}
