//! Stage 6, targets: where a request may go, best first, worked out only as far as it
//! is needed — available local endpoints (power of two choices first), then peers in the
//! fleet's order, never back to the node it came from. With zones: the node's zone first
//! (its endpoints, then its peers), then the rest of the region, then other regions,
//! spilling to the other zones while fewer than `zone_spill_below` of the zone's
//! endpoints are healthy; or, with `locality_weights`, a zone drawn by its weight. Loop prevention decides whether
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
    /// `locals[..first]` are tried before the peers of the node's zone, the rest after.
    first: usize,
    /// The peers of the node's zone (and region) go between the two.
    zone_first: bool,
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
        let (first, zone_first) = by_zone(cfg, service, &mut locals, n);
        // the first local endpoint by power of two choices; the others follow it
        if let Some(k) = upstream::p2c(first, |k| w.upstreams[service][locals[k]].outstanding()) {
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
            first,
            zone_first,
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
        if self.next_local < self.first {
            self.next_local += 1;
            return Some(Target::Local(self.locals[self.next_local - 1]));
        }
        if self.no_peers.is_none() && self.zone_first {
            // the node's zone's peers, before the rest of the region's endpoints
            if let Some(p) = self.peer(true) {
                return Some(Target::Peer(p));
            }
        }
        if let Some(&e) = self.locals.get(self.next_local) {
            self.next_local += 1;
            return Some(Target::Local(e));
        }
        if self.no_peers.is_some() {
            return None;
        }
        self.peer(false).map(Target::Peer)
    }

    /// The next peer in the fleet's order not yet given (of the node's zone only, with
    /// `zone`).
    fn peer(&mut self, zone: bool) -> Option<usize> {
        let w = self.w;
        let (service, exclude) = (self.service, self.exclude);
        let peers = self
            .peers
            .get_or_insert_with(|| w.fleet.peer_order(&w.config, service, &exclude));
        let p = *peers.get(self.next_peer)?;
        if zone && !same_zone(&w.config, p) {
            return None;
        }
        self.next_peer += 1;
        Some(p)
    }
}

/// Whether peer `p` is in the node's zone (and region).
fn same_zone(cfg: &crate::config::Config, p: usize) -> bool {
    let (n, peer) = (&cfg.node, &cfg.peers[p]);
    n.zone.is_some() && peer.zone == n.zone && peer.region == n.region
}

/// Orders `locals` (the available endpoints) by zone: those tried first come first, and
/// their count is returned, with whether the node's zone's peers go between them and the
/// rest. With `locality_weights`, a zone is drawn by its weight among those with an
/// endpoint available (an endpoint without a zone is in the node's); else the node's
/// zone comes first while at least `zone_spill_below` of its endpoints (of `n`) are
/// available, and below that no zone does.
fn by_zone(
    cfg: &crate::config::Config,
    service: usize,
    locals: &mut [usize],
    n: usize,
) -> (usize, bool) {
    let svc = &cfg.services[service];
    let own = cfg.node.zone.as_deref();
    if own.is_none() && svc.locality_weights.is_empty() {
        return (locals.len(), false);
    }
    let zone_of = |e: usize| svc.endpoints[e].zone.as_deref().or(own);
    let front = |locals: &mut [usize], zone: &str| {
        // stable: the zone's endpoints first, in their order
        locals.sort_by_key(|&e| zone_of(e) != Some(zone));
        locals
            .iter()
            .take_while(|&&e| zone_of(e) == Some(zone))
            .count()
    };
    if !svc.locality_weights.is_empty() {
        // a zone's weight counts for the share of its endpoints available (a zone with
        // one of ten up takes a tenth of its weight), as Envoy's locality weights do
        let live: Vec<(&str, u32)> = svc
            .locality_weights
            .iter()
            .filter_map(|(z, w)| {
                let all = (0..n).filter(|&e| zone_of(e) == Some(z.as_str())).count() as u64;
                let up = locals
                    .iter()
                    .filter(|&&e| zone_of(e) == Some(z.as_str()))
                    .count() as u64;
                let w = (u64::from(*w) * up).checked_div(all)? as u32;
                (w > 0).then_some((z.as_str(), w))
            })
            .collect();
        let total: u32 = live.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return (locals.len(), false);
        }
        let mut draw = fastrand::u32(..total);
        let zone = live
            .iter()
            .find(|(_, w)| {
                if draw < *w {
                    return true;
                }
                draw -= w;
                false
            })
            .map_or(live[0].0, |(z, _)| z);
        return (front(locals, zone), false);
    }
    let Some(own) = own else {
        return (locals.len(), false);
    };
    let in_zone = (0..n).filter(|&e| zone_of(e) == Some(own)).count();
    let healthy = locals.iter().filter(|&&e| zone_of(e) == Some(own)).count();
    if healthy == 0 || (healthy as f64) < svc.zone_spill_below * in_zone as f64 {
        // too few of the zone's endpoints are healthy to carry its traffic: it spills
        // over every zone's endpoints alike
        return (locals.len(), false);
    }
    (front(locals, own), true)
}
