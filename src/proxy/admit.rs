//! Stage 3, admit: the `[[allow]]` rules (default deny, through the grants resolved for
//! the connection's identity), then rate and concurrency limits, refused early and never
//! queued. From here the request has cost something: its stream counts as started (for
//! the reset guard) and the service's own idle timeout holds. A service in audit mode
//! (`authorization = "audit"`) serves a call no rule allows, recorded as `would_deny`.

use super::caller::StreamState;
use super::routing::Route;
use super::{ConnCtx, Worker};
use crate::config::Authorization;
use crate::errors::Reject;
use crate::grammar::Call;
use crate::limits::{Admit, Over};

/// An admitted request: its place under concurrency limits, held until its answer
/// ends (`None` when no limit applies), and whether only audit mode let it through.
pub(super) struct Admitted {
    pub limits: Option<Admit>,
    pub would_deny: bool,
}

/// Authorizes and admits a routed request.
pub(super) fn admit(
    w: &Worker,
    conn: &ConnCtx,
    route: &Route<'_, '_>,
    call: Call<'_>,
    stream: Option<&StreamState>,
) -> Result<Admitted, Reject> {
    let service = route.service;
    let mut would_deny = false;
    if !conn.grants.allows(route.idx, call) {
        let mode = service.authorization.unwrap_or(w.config.node.authorization);
        if mode == Authorization::Enforce {
            return Err(Reject::Denied {
                identity: conn.identity.to_str().unwrap_or("?").to_owned(),
                service: service.name.clone(),
                call: call.to_string(),
                node: w.config.node.name.clone(),
            });
        }
        // recorded once the request has passed every other stage (`decide`)
        would_deny = true;
    }
    if let Some(s) = stream {
        s.start();
        if let Some(idle) = service.stream_idle_timeout {
            s.set_idle(idle);
        }
    }
    if w.limits.is_empty() {
        return Ok(Admitted {
            limits: None,
            would_deny,
        });
    }
    w.limits
        .admit(route.idx, &conn.limits, &service.name)
        .map(|a| Admitted {
            limits: Some(a),
            would_deny,
        })
        .map_err(|o| match o {
            Over::Rate(who) => Reject::RateLimited(who),
            Over::Concurrency(who) => Reject::Overloaded(who),
        })
}
