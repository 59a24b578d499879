//! Stage 3, admit: the `[[allow]]` rules (default deny, through the grants resolved for
//! the connection's identity), then rate and concurrency limits, refused early and never
//! queued. From here the request has cost something: its stream counts as started (for
//! the reset guard) and the service's own idle timeout holds.

use super::caller::StreamState;
use super::routing::Route;
use super::{ConnCtx, Worker};
use crate::errors::Reject;
use crate::grammar::Call;
use crate::limits::{Admit, Over};

/// Authorizes and admits a routed request; its place under concurrency limits, held
/// until its answer ends (`None` when no limit applies).
pub(super) fn admit(
    w: &Worker,
    conn: &ConnCtx,
    route: &Route<'_, '_>,
    call: Call<'_>,
    stream: Option<&StreamState>,
) -> Result<Option<Admit>, Reject> {
    let service = route.service;
    if !conn.grants.allows(route.idx, call) {
        return Err(Reject::Denied {
            identity: conn.identity.to_str().unwrap_or("?").to_owned(),
            service: service.name.clone(),
            call: call.to_string(),
            node: w.config.node.name.clone(),
        });
    }
    if let Some(s) = stream {
        s.start();
        if let Some(idle) = service.stream_idle_timeout {
            s.set_idle(idle);
        }
    }
    if w.limits.is_empty() {
        return Ok(None);
    }
    w.limits
        .admit(route.idx, &conn.limits, &service.name)
        .map(Some)
        .map_err(|o| match o {
            Over::Rate(who) => Reject::RateLimited(who),
            Over::Concurrency(who) => Reject::Overloaded(who),
        })
}
