//! Stage 7, dispatch: the request goes to its best target, and on to the next when the
//! attempt's [`Retry`] allows it — it never left fedport, or certainly reached no service
//! (a body kept whole is sent again), or may have reached one and the method is
//! idempotent, within the service's retry budget. Each target is aimed at: its URI and
//! version, `fed-hops` and `fed-service` for a peer, what is left of the deadline.

use super::targets::{Target, Targets};
use super::{strip_fed_headers, Worker, FED_HOPS, FED_SERVICE};
use crate::errors::Reject;
use crate::errors::GRPC_STATUS;
use crate::reason::{GrpcCode, GrpcStatus, Reason};
use crate::schema;
use crate::upstream::{self, EndpointPool, ProxyBody, Retry};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use tokio::time::Instant;

/// How a request is aimed at each target, decided once.
pub(super) struct Aim {
    /// The service, by index.
    pub service: usize,
    /// The authority the service's endpoints are told (`authority`, by default the
    /// service's name).
    pub authority: String,
    /// `fed-hops` as it arrived (0 unless from a peer).
    pub hops: u8,
    /// The method may be sent twice.
    pub idempotent: bool,
    /// The caller gave a deadline (`grpc-timeout` / `fed-timeout`): pass on what is left.
    pub deadline_header: bool,
    /// The caller's deadline is shorter than the service's timeout: running out of it
    /// is no sign of a failing endpoint.
    pub caller_deadline: bool,
    /// When the request's time is up.
    pub deadline: Instant,
    /// The time the request was given (the caller's deadline or the service's timeout).
    pub timeout_ms: u64,
    /// The request is a gRPC call.
    pub grpc: bool,
    /// No rule allows it; audit mode serves it, but only here: a peer authorizes a
    /// forwarded call by this node's identity, so sending it on would widen access.
    pub would_deny: bool,
}

/// An upstream's answer, with what must live as long as its body.
pub(super) struct Forwarded {
    /// The stream window the target's connection grants.
    pub window: u32,
    /// The endpoint (or peer) that answered.
    pub target: Arc<str>,
    pub resp: Response<Incoming>,
    pub outstanding: upstream::Outstanding,
    pub h1: Option<upstream::H1Return>,
    /// Set when the request body refused a message after the answer had begun.
    pub tripped: Arc<schema::Tripped>,
}

/// The refusal a tripped request guard stands for (the caller's fault), else a
/// generic one.
pub(super) fn refusal(service: &crate::config::Service, tripped: &schema::Tripped) -> Reject {
    if let Some(over) = tripped.memory() {
        return Reject::Memory(over);
    }
    if let Some(n) = tripped.get() {
        return Reject::TooLarge(
            service.name.clone(),
            n,
            service.max_message_bytes.unwrap_or(0),
        );
    }
    if let Some(e) = tripped.schema_error() {
        return Reject::Schema {
            service: service.name.clone(),
            route: "its gRPC method".into(),
            violations: vec![crate::errors::Violation {
                path: String::new(),
                keyword: "protobuf".into(),
                message: e,
            }],
        };
    }
    Reject::BadRequest("the request body ended with an error")
}

/// Points a request at one target: its URI and version for that connection, and the
/// federation headers — `fed-hops` one more and `fed-service` for a peer, what is left
/// of the caller's deadline.
fn aim_at(
    req: &mut Request<ProxyBody>,
    pool: &EndpointPool,
    to_peer: bool,
    aim: &Aim,
    service: &str,
    left: Option<std::time::Duration>,
    given_back: bool,
) -> Result<(), Reject> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    // the service is told the name of the service the request was routed and
    // authorized for, never the caller's: a peer routes it by fed-service and names it
    // to its own endpoints the same way
    let authority = if to_peer {
        service
    } else {
        aim.authority.as_str()
    };
    let h2 = pool.speaks_h2();
    if h2 {
        let scheme = if pool.endpoint.scheme == crate::config::Scheme::Https {
            "https"
        } else {
            "http"
        };
        *req.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(pq)
            .build()
            .map_err(|_| Reject::BadRequest("request target cannot be forwarded"))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.uri_mut() = Uri::try_from(pq).map_err(|_| Reject::BadRequest("bad request target"))?;
        *req.version_mut() = Version::HTTP_11;
        match HeaderValue::from_str(authority) {
            Ok(v) => {
                req.headers_mut().insert(header::HOST, v);
            }
            Err(_) => return Err(Reject::BadRequest("request target cannot be forwarded")),
        }
    }
    let h = req.headers_mut();
    let hops = if to_peer { aim.hops + 1 } else { aim.hops };
    if hops > 0 {
        h.insert(FED_HOPS, HeaderValue::from(u16::from(hops)));
    } else if given_back {
        // a request aimed at a peer before, given back unsent: the journey's own
        // headers were stripped of fed-* and carry neither of these (and the headers
        // kept to rebuild a request were copied before any aim). Targets give every
        // local endpoint before any peer, so this is for safety, not for today's order
        h.remove(&FED_HOPS);
    }
    if to_peer {
        if let Ok(v) = HeaderValue::from_str(service) {
            h.insert(FED_SERVICE, v);
        }
    } else if given_back {
        h.remove(&FED_SERVICE);
    }
    if let Some(left) = left.filter(|_| aim.deadline_header) {
        super::deadline::pass_on(h, aim.grpc, left);
    }
    Ok(())
}

/// What an answer says of sending the request again: a peer's own refusal that another
/// node may serve reached no service; a service that says it is unavailable (502–504,
/// UNAVAILABLE) may have done some of the work.
fn retry_of_answer(resp: &Response<Incoming>, to_peer: bool) -> (Retry, bool) {
    let unavailable = matches!(resp.status().as_u16(), 502..=504)
        || resp.headers().get(GRPC_STATUS).is_some_and(|s| {
            GrpcStatus::of(s.as_bytes()) == GrpcStatus::Code(GrpcCode::Unavailable)
        });
    let refused_by_peer = to_peer
        && resp
            .headers()
            .get(crate::errors::FED_REFUSED)
            .and_then(|r| Reason::parse(r.as_bytes()))
            .is_some_and(Reason::elsewhere_may_serve);
    let retry = if refused_by_peer {
        Retry::Unprocessed
    } else if unavailable {
        Retry::IfIdempotent
    } else {
        Retry::Never
    };
    (retry, unavailable)
}

/// Whether a deadline that passed is the endpoint's failure: only when the endpoint had
/// the whole request for at least half the service's timeout. A service that has not
/// answered while the caller had not sent all of its body may be waiting for it, and a
/// caller that sends the last of its body just before the deadline (or sets a short
/// deadline of its own) leaves the endpoint no time: counting those would let a caller
/// eject healthy endpoints by timing alone.
fn fair_timeout(
    aim: &Aim,
    whole: bool,
    had_from: Option<Instant>,
    tripped: &schema::Tripped,
) -> bool {
    if aim.caller_deadline {
        return false;
    }
    let from = if whole {
        had_from
    } else {
        match tripped.ended() {
            Some(t) => Some(had_from.map_or(t, |h| h.max(t))),
            None => return false,
        }
    };
    from.is_none_or(|f| {
        aim.deadline.saturating_duration_since(f) * 2
            >= std::time::Duration::from_millis(aim.timeout_ms)
    })
}

/// Whether an attempt that came back as `retry` is worth a next target at all.
fn worth_another(retry: Retry, can_resend: bool, idempotent: bool) -> bool {
    match retry {
        Retry::Never => false,
        Retry::Unprocessed => can_resend,
        Retry::IfIdempotent => can_resend && idempotent,
    }
}

/// Sends the request to its best target, and on to the next when the attempt's
/// [`Retry`] allows it.
pub(super) async fn dispatch(
    w: &Worker,
    aim: &Aim,
    parts: http::request::Parts,
    body: Option<schema::Guarded>,
    replay: Option<Bytes>,
    targets: &mut Targets<'_>,
    tripped: Arc<schema::Tripped>,
) -> Result<Forwarded, Reject> {
    let idx = aim.service;
    let service = &w.config.services[idx];
    let budget = &w.budgets[idx];
    budget.deposit();
    // what a maybe-sent request is rebuilt from; kept only when it could be resent
    let keep = replay.as_ref().filter(|_| targets.alternatives()).map(|_| {
        (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        )
    });
    let can_resend = keep.is_some();
    // sent whole from the start: nothing of it is left for the caller to send
    let whole = replay.is_some() || body.as_ref().is_none_or(|b| b.is_end_stream());
    let first_body = match (&replay, body) {
        (Some(b), _) => Either::Right(Full::new(b.clone())),
        (None, Some(g)) => Either::Left(g),
        (None, None) => Either::Right(Full::default()),
    };
    // since when this attempt's endpoint has had the whole request, where that is not
    // the request's start: a buffered body arrived first (at the caller's pace), and a
    // later attempt starts after the failed ones
    let mut had_from = replay.as_ref().map(|_| Instant::now());
    let mut pending = Some(Request::from_parts(parts, first_body));
    let mut target = targets.next_target();
    let mut last = Reject::NoHealthyTarget(service.name.clone());
    // the first failure of an attempt that may have reached a service: once there is
    // one, the request does not end as a refusal another node may serve (that would
    // have the node before this one send it on without asking whether it may)
    let mut reached: Option<Reject> = None;
    let counters = &w.counters[idx];
    // a next target, if the attempt's retry allows one; counts why it is taken
    let again = |retry: Retry, targets: &mut Targets<'_>| -> Option<Target> {
        if !worth_another(retry, can_resend, aim.idempotent) {
            return None;
        }
        let next = targets.next_target()?;
        match retry {
            Retry::Unprocessed => counters.unsent.inc(),
            _ if budget.withdraw() => counters.idempotent.inc(),
            _ => {
                counters.exhausted.inc();
                return None;
            }
        };
        Some(next)
    };
    let mut attempt = 0u32;
    while let Some(t) = target.take() {
        attempt += 1;
        let given_back = attempt > 1 && pending.is_some();
        let mut req = match pending.take() {
            Some(r) => r,
            None => {
                let (Some((m, u, h)), Some(b)) = (&keep, &replay) else {
                    break;
                };
                let mut r = Request::new(Either::Right(Full::new(b.clone())));
                *r.method_mut() = m.clone();
                *r.uri_mut() = u.clone();
                *r.headers_mut() = h.clone();
                r
            }
        };
        let (pool, to_peer, local) = match t {
            Target::Local(e) => (w.upstreams[idx][e].clone(), false, Some(e)),
            Target::Peer(p) => (w.peer_pools[p].clone(), true, None),
        };
        // the clock is read only where the time left is needed: a deadline to pass on,
        // or an attempt after a failed one (the first starts within the time decided)
        let now = (aim.deadline_header || attempt > 1).then(Instant::now);
        if attempt > 1 {
            had_from = now;
        }
        let left = now.map(|n| aim.deadline.saturating_duration_since(n));
        // the request's whole time is what it did not get an answer within, however
        // it went on the attempts before
        if left.is_some_and(|l| l.is_zero()) {
            return Err(Reject::Timeout(service.name.clone(), aim.timeout_ms));
        }
        aim_at(
            &mut req,
            &pool,
            to_peer,
            aim,
            &service.name,
            left,
            given_back,
        )?;
        match t {
            Target::Local(_) => counters.local.inc(),
            Target::Peer(p) => counters.peers[p].inc(),
        };
        let outstanding = pool.begin();
        let sent = tokio::time::timeout_at(aim.deadline, pool.send(req, aim.deadline)).await;
        let Ok(sent) = sent else {
            if let Some(e) = local.filter(|_| fair_timeout(aim, whole, had_from, &tripped)) {
                w.fleet.record(idx, e, false);
            }
            return Err(Reject::Timeout(service.name.clone(), aim.timeout_ms));
        };
        match sent {
            Ok((mut resp, h1)) => {
                if local.is_some() {
                    // fedport's own headers are fedport's to set: a service cannot
                    // claim, say, a peer's refusal and have its request sent again
                    strip_fed_headers(resp.headers_mut());
                }
                let (retry, unavailable) = retry_of_answer(&resp, to_peer);
                if let Some(e) = local {
                    w.fleet.record(idx, e, !unavailable);
                }
                if let Some(next) = again(retry, targets) {
                    reached.get_or_insert_with(|| {
                        Reject::Upstream(
                            service.name.clone(),
                            format!("{} answered {}", pool.label, resp.status()),
                        )
                    });
                    target = Some(next);
                    continue;
                }
                return Ok(Forwarded {
                    window: pool.stream_window(),
                    target: pool.label.clone(),
                    resp,
                    outstanding,
                    h1,
                    tripped,
                });
            }
            Err(failed) => {
                // refused by fedport's own guard, or the caller's body failed: the
                // caller's doing, which neither counts against the endpoint nor is
                // sent anywhere else
                if tripped.refused() {
                    return Err(refusal(service, &tripped));
                }
                if tripped.caller_failed() {
                    return Err(Reject::BadRequest("the request body ended with an error"));
                }
                let upstream::Failed { error, unsent } = failed;
                // busy sockets are fedport's own cap, no sign of a failing endpoint
                let busy = matches!(error, upstream::UpstreamError::Busy(..));
                if let Some(e) = local.filter(|_| !busy) {
                    w.fleet.record(idx, e, false);
                }
                tracing::debug!(service = %service.name, target = %pool.endpoint.url, error = %error, "attempt failed");
                let retry = error.retry();
                last = match &error {
                    upstream::UpstreamError::Connect(..) => {
                        Reject::NoHealthyTarget(service.name.clone())
                    }
                    upstream::UpstreamError::Busy(url, max) => Reject::Overloaded(format!(
                        "service {} (the {max} HTTP/1.1 connections this worker may open to {url} stayed busy)",
                        service.name
                    )),
                    e => Reject::Upstream(service.name.clone(), e.to_string()),
                };
                if unsent.is_none() {
                    reached.get_or_insert_with(|| {
                        Reject::Upstream(service.name.clone(), error.to_string())
                    });
                }
                if let Some(back) = unsent {
                    // it never left fedport: it goes on as it is, whatever its method
                    let Some(next) = targets.next_target() else {
                        break;
                    };
                    counters.unsent.inc();
                    pending = Some(back);
                    target = Some(next);
                    continue;
                }
                target = again(retry, targets);
            }
        }
    }
    if let Some(r) = reached {
        return Err(r);
    }
    if let Reject::NoHealthyTarget(_) = &last {
        tracing::warn!(service = %service.name, "no target could take the request");
    }
    Err(last)
}
