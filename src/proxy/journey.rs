//! Stage 4, federation headers and deadline: what the request says of its way through
//! the federation. `fed-origin`, `fed-hops` and `fed-caller` are believed from peer
//! nodes only; a caller's own copies of identity and forwarding headers are removed and
//! fedport's set (`fed-peer`, `x-request-id`, `x-forwarded-*` for services that ask).
//! The caller's deadline, if it set one, is kept within the service's timeout.

use super::routing::Route;
use super::{headers, ConnCtx, Worker, FED_CALLER, FED_HOPS, FED_ORIGIN, FED_PEER, REQUEST_ID};
use crate::errors::Reject;
use http::{HeaderMap, HeaderValue};
use std::time::Duration;

/// Where the request is on its way.
pub(super) struct Journey {
    /// `fed-hops` as it arrived (0 unless from a peer).
    pub hops: u8,
    /// The deadline the caller gave (`grpc-timeout` / `fed-timeout`), if it gave one.
    pub asked: Option<Duration>,
    /// The time the request has: the caller's deadline within the service's timeout.
    pub timeout: Duration,
}

/// `fed-hops` as a peer sent it: a value that cannot be read counts as the farthest
/// allowed (`max_hops`), never as a fresh request.
pub fn hops_of(h: &HeaderMap, max_hops: u8) -> u8 {
    match h.get(&FED_HOPS) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u8>().ok())
            .unwrap_or(max_hops),
    }
}

pub(super) fn prepare(
    h: &mut HeaderMap,
    w: &Worker,
    conn: &ConnCtx,
    route: &Route<'_, '_>,
    rid: &HeaderValue,
) -> Result<Journey, Reject> {
    let service = route.service;
    let (origin, hops, caller) = if conn.from_peer {
        // a peer always says how far the request came
        let hops = hops_of(h, w.config.node.max_hops);
        (
            h.get(&FED_ORIGIN).cloned(),
            hops,
            h.get(&FED_CALLER).cloned(),
        )
    } else {
        (None, 0, None)
    };
    let asked = super::deadline::asked(h, route.grpc).map_err(Reject::BadRequest)?;
    let carried = if conn.from_peer {
        headers::Carried::from_peer(h)
    } else {
        headers::Carried::default()
    };
    headers::strip_claims(h);
    if service.forwarded_headers {
        headers::set_forwarded(h, carried, &conn.forwarded_for, conn.tls);
    }
    h.insert(FED_PEER, conn.identity.clone());
    h.insert(FED_ORIGIN, origin.unwrap_or_else(|| w.origin.clone()));
    h.insert(FED_CALLER, caller.unwrap_or_else(|| conn.identity.clone()));
    h.insert(REQUEST_ID, rid.clone());
    if asked.is_some_and(|t| t.is_zero()) {
        return Err(Reject::Timeout(service.name.clone(), 0));
    }
    let timeout = asked.map_or(service.timeout, |t| t.min(service.timeout));
    Ok(Journey {
        hops,
        asked,
        timeout,
    })
}
