//! Stage 6, targets: where a request may go, best first, worked out only as far as it
//! is needed — available local endpoints (power of two choices first), then peers in the
//! fleet's order, never back to the node it came from. Loop prevention decides whether
//! peers may be used at all, and a call only audit mode admits never goes to one.
//! TCP connections (src/tcp) are aimed by the same order.

use super::{ConnCtx, Worker};
use crate::errors::Reject;
use crate::upstream;
use http::HeaderValue;

/// Where a request may go, best first, worked out as far as needed: available local
/// endpoints (power of two choices first), then peers in the fleet's order.
pub enum Target {
    Local(usize),
    Peer(usize),
}

pub struct Targets<'a> {
    w: &'a Worker,
    service: usize,
    locals: Vec<usize>,
    next_local: usize,
    /// Why peers may not be used (loop prevention), if they may not.
    no_peers: Option<&'static str>,
    peers: Option<Vec<usize>>,
    next_peer: usize,
    /// Peers not to go back to: the caller's node and the request's origin.
    exclude: [Option<&'a str>; 2],
}

impl<'a> Targets<'a> {
    /// `origin`: the request's `fed-origin` as it arrived; `hops`: its `fed-hops`;
    /// `would_deny`: only audit mode admits it.
    pub fn new(
        w: &'a Worker,
        conn: &ConnCtx,
        service: usize,
        origin: Option<&HeaderValue>,
        hops: u8,
        would_deny: bool,
    ) -> Result<Self, Reject> {
        let cfg = &w.config;
        let n = w.upstreams[service].len();
        let mut locals: Vec<usize> = (0..n).filter(|&e| w.fleet.available(service, e)).collect();
        let no_peers = if would_deny {
            Some("no rule allows it: audit mode serves it here only, never through another node")
        } else if conn.from_peer && !cfg.node.transit {
            Some("it came from a peer and this node is not a transit node")
        } else if hops >= cfg.node.max_hops {
            Some("it has taken max_hops hops already")
        } else {
            None
        };
        if locals.is_empty() {
            if w.fleet.has_peers(service) {
                if would_deny {
                    // what enforcement would answer: the call is not this node's to
                    // hand to another (which would judge it as this node's own)
                    return Err(Reject::Denied {
                        identity: conn.identity.to_str().unwrap_or("?").to_owned(),
                        service: cfg.services[service].name.clone(),
                        call: "it (audit mode serves locally only)".into(),
                        node: cfg.node.name.clone(),
                    });
                }
                if let Some(why) = no_peers {
                    return Err(Reject::Loop {
                        service: cfg.services[service].name.clone(),
                        node: cfg.node.name.clone(),
                        why,
                    });
                }
            } else {
                // every endpoint is out and nowhere else has the service: try them all
                // rather than refuse (Envoy's panic mode)
                locals = (0..n).collect();
            }
        }
        // the first local endpoint by power of two choices; the others follow it
        if let Some(k) = upstream::p2c(locals.len(), |k| {
            w.upstreams[service][locals[k]].outstanding()
        }) {
            locals.swap(0, k);
        }
        let caller = conn
            .identity
            .to_str()
            .ok()
            .and_then(|id| w.peer_by_identity.get(id))
            .map(|&i| cfg.peers[i].name.as_str());
        let origin = origin
            .and_then(|v| v.to_str().ok())
            .and_then(|o| cfg.peers.iter().find(|p| p.name == o))
            .map(|p| p.name.as_str());
        Ok(Self {
            w,
            service,
            locals,
            next_local: 0,
            no_peers,
            peers: None,
            next_peer: 0,
            exclude: [caller, origin],
        })
    }

    /// Whether more than one target could be tried.
    pub fn alternatives(&self) -> bool {
        self.locals.len() > 1 || (self.no_peers.is_none() && self.w.fleet.has_peers(self.service))
    }

    pub fn next_target(&mut self) -> Option<Target> {
        if let Some(&e) = self.locals.get(self.next_local) {
            self.next_local += 1;
            return Some(Target::Local(e));
        }
        if self.no_peers.is_some() {
            return None;
        }
        let w = self.w;
        let (service, exclude) = (self.service, self.exclude);
        let peers = self
            .peers
            .get_or_insert_with(|| w.fleet.peer_order(&w.config, service, &exclude));
        let p = peers.get(self.next_peer).copied()?;
        self.next_peer += 1;
        Some(Target::Peer(p))
    }
}
