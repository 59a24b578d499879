//! Reverse peer links (`[[peer]] reverse = true`), for a site whose firewall or NAT
//! admits nothing inbound. The side that has the peer's address dials it (TLS with
//! ALPN [`ALPN`], both certificates verified as for any peer link), keeps the link up
//! with backoff, and takes the HTTP/2 *server* role on it: the peer's requests arrive
//! on it as on a peer listener (listen.rs serves it). The side without an address takes
//! such a connection on its peer listener, speaks HTTP/2 *client* on it, and sends
//! everything for that peer over the links the peer opened ([`Links`], which the peer's
//! pool in every worker draws from). Its health is probed on the link itself: a
//! request answered at once by the far node ([`FED_PING`]) gives the round-trip time,
//! and HTTP/2 keepalive PINGs close a link that stops answering.

use crate::upstream::ProxyBody;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The ALPN protocol a reverse link is opened with: the dialing side will be the HTTP/2
/// server on it.
pub const ALPN: &[u8] = b"fedport-reverse";

/// A request a peer node answers at once on a reverse link, without routing it: the
/// link's round-trip time, and proof that it still carries requests.
pub const FED_PING: http::HeaderName = http::HeaderName::from_static("fed-ping");

/// One peer's links: the id each was added under, the identity its certificate
/// carried, and its sender.
type PeerLinks = Vec<(u64, String, http2::SendRequest<ProxyBody>)>;

/// The most links one peer may have open to this node (a worker keeps one each).
const MAX_LINKS: usize = 64;

/// The links peers opened to this node, by peer name; shared by every worker and kept
/// across reloads.
#[derive(Default)]
pub struct Links {
    by_peer: Mutex<HashMap<String, PeerLinks>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
}

impl Links {
    /// A live link to `peer` whose certificate carried `identity`, in turn among them.
    pub fn pick(&self, peer: &str, identity: &str) -> Option<http2::SendRequest<ProxyBody>> {
        let mut g = self.by_peer.lock().ok()?;
        let links = g.get_mut(peer)?;
        links.retain(|(_, _, s)| !s.is_closed());
        let n = links.iter().filter(|(_, id, _)| id == identity).count();
        if n == 0 {
            return None;
        }
        let k = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        links
            .iter()
            .filter(|(_, id, _)| id == identity)
            .nth(k)
            .map(|(_, _, s)| s.clone())
    }

    /// How many links `peer` has open to this node.
    pub fn count(&self, peer: &str) -> usize {
        self.by_peer
            .lock()
            .ok()
            .and_then(|g| {
                g.get(peer)
                    .map(|l| l.iter().filter(|(_, _, s)| !s.is_closed()).count())
            })
            .unwrap_or(0)
    }

    /// Files a link; `None` when the peer has [`MAX_LINKS`] open already.
    fn add(
        &self,
        peer: &str,
        identity: &str,
        sender: http2::SendRequest<ProxyBody>,
    ) -> Option<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut g = self.by_peer.lock().ok()?;
        let links = g.entry(peer.to_owned()).or_default();
        links.retain(|(_, _, s)| !s.is_closed());
        if links.len() >= MAX_LINKS {
            return None;
        }
        links.push((id, identity.to_owned(), sender));
        Some(id)
    }

    fn remove(&self, peer: &str, id: u64) {
        if let Ok(mut g) = self.by_peer.lock() {
            if let Some(l) = g.get_mut(peer) {
                l.retain(|(i, _, _)| *i != id);
            }
        }
    }
}

/// Serves a link that peer `peer` opened to this node (TLS done, its certificate
/// verified as carrying `identity`): this node is the HTTP/2 client on it, and its
/// requests to the peer go over it until it ends, until the node drains, or until
/// `changed` resolves with why (a reload changed the peer's entry or the trust
/// material, so the peer must dial again and be verified afresh; or this process handed
/// its sockets to a new binary, which the peer must dial instead). A link let go takes no new request,
/// and closes once those in flight are answered, or after 10 s: the peer dials again
/// only once its link has ended.
pub async fn adopt<I>(
    io: I,
    (peer, identity): (&str, &str),
    links: &Links,
    keepalive: (Duration, Duration),
    mut drain: tokio::sync::watch::Receiver<bool>,
    changed: impl std::future::Future<Output = &'static str>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shaken = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive.0)
        .keep_alive_timeout(keepalive.1)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(crate::upstream::PEER_STREAM_WINDOW)
        .initial_connection_window_size(crate::upstream::MAX_WINDOW)
        .handshake(TokioIo::new(io))
        .await;
    let (sender, conn) = match shaken {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(peer, error = %e, "reverse link failed its HTTP/2 handshake");
            return;
        }
    };
    let Some(id) = links.add(peer, identity, sender) else {
        if crate::telemetry::log_due(crate::reason::Reason::Alpn) {
            tracing::warn!(
                peer,
                "reverse link refused: the peer has {MAX_LINKS} open already"
            );
        }
        return;
    };
    tracing::info!(
        peer,
        "reverse link up: requests for the peer go over the link it opened"
    );
    tokio::pin!(conn);
    let let_go = tokio::select! {
        r = &mut conn => {
            links.remove(peer, id);
            tracing::info!(peer, error = r.err().map(|e| e.to_string()), "reverse link ended");
            return;
        }
        _ = drain.wait_for(|d| *d) => None,
        why = changed => Some(why),
    };
    if let Some(why) = let_go {
        tracing::info!(
            peer,
            why,
            "the reverse link is let go, for the peer to dial again"
        );
        links.remove(peer, id);
        let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        return;
    }
    // no new request takes it; with the last sender gone, hyper closes it once the
    // requests in flight are answered
    links.remove(peer, id);
    let _ = conn.await;
}

/// Answers a peer's [`FED_PING`] over a reverse link at once.
pub fn is_ping(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::OPTIONS && parts.headers.contains_key(&FED_PING)
}

/// One probe of the peer over one of its links: the round-trip time, or why not.
pub async fn ping(
    links: &Links,
    (peer, identity): (&str, &str),
    timeout: Duration,
) -> Result<Duration, String> {
    let mut sender = links.pick(peer, identity).ok_or("no reverse link")?;
    let mut req = http::Request::new(http_body_util::Either::Right(http_body_util::Full::<
        bytes::Bytes,
    >::default()));
    *req.method_mut() = http::Method::OPTIONS;
    *req.uri_mut() = http::Uri::builder()
        .scheme("https")
        .authority(peer)
        .path_and_query("/")
        .build()
        .map_err(|e| e.to_string())?;
    *req.version_mut() = http::Version::HTTP_2;
    req.headers_mut()
        .insert(FED_PING, http::HeaderValue::from_static("1"));
    let start = std::time::Instant::now();
    match tokio::time::timeout(timeout, sender.send_request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => Ok(start.elapsed()),
        Ok(Ok(r)) => Err(format!("answered {}", r.status())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}
