//! Bound ports: SO_REUSEPORT sockets (one per worker), the accept loop with its
//! address check, the TLS 1.3 handshake that yields the caller's identity, and serving
//! HTTP/1.1 and HTTP/2 on the connection until it ends or the node drains.

pub mod h2conn;
pub mod h2guard;
pub mod proxy_protocol;

use crate::config::{Listener, Role};
use crate::identity;
use crate::proxy::{self, ConnCtx, Worker};
use crate::reason::Reason;
use crate::telemetry::{Metrics, ReasonLabels};
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot bind listener {0} to {1}: {2}")]
    Bind(String, SocketAddr, std::io::Error),
}

/// A listening socket with SO_REUSEPORT, so that every worker can hold its own on the
/// same address and the kernel spreads connections across them.
pub fn bind_reuseport(name: &str, addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |e| ListenError::Bind(name.to_owned(), addr, e);
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.set_nodelay(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(4096).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    Ok(sock.into())
}

/// Everything one listener's accept loop needs in one worker.
pub struct Accepting {
    pub spec: Listener,
    /// Connections open on this listener across every worker, and the limit.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    pub max_connections: usize,
    pub index: usize,
    pub connections_total: Counter,
    pub connections_active: Gauge,
    pub streams: Gauge,
    pub name: Arc<str>,
    pub tls: Option<(Arc<identity::rotate::Rotating>, Duration)>,
    pub worker: Arc<Worker>,
    pub metrics: Arc<Metrics>,
    pub builder: hyper::server::conn::http1::Builder,
}

/// An encoded header block larger than the decoded limit cuts the connection
/// (`h2guard`).
const MAX_HEADER_LIST: usize = h2conn::MAX_HEADER_LIST as usize;

/// A listener's accepting state, swapped at each reload, is what its connections'
/// requests follow.
impl proxy::Generations for arc_swap::ArcSwap<Accepting> {
    fn is(&self, worker: &Arc<Worker>) -> bool {
        Arc::ptr_eq(&self.load().worker, worker)
    }

    fn since(&self, worker: &Arc<Worker>) -> Option<proxy::Generation> {
        let now = self.load();
        (!Arc::ptr_eq(&now.worker, worker)).then(|| proxy::Generation {
            worker: now.worker.clone(),
            index: now.index,
            dedicated: now.spec.service.clone(),
        })
    }

    fn worker(&self) -> Arc<Worker> {
        self.load().worker.clone()
    }
}

/// The HTTP/1.1 server settings every listener uses (HTTP/2 is served by [`h2conn`]).
pub fn http_builder(header_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_headers(100)
        .max_buf_size(64 * 1024);
    b
}

/// Accepts once the node is ready, until `shutdown` turns true or the node hands its
/// sockets over; then this copy of the socket is closed (new connections are refused,
/// unless another process holds it too) and open connections are left to the graceful
/// watcher.
pub async fn accept_loop(
    listener: TcpListener,
    current: Arc<arc_swap::ArcSwap<Accepting>>,
    drain: Drain,
) {
    let mut shutdown = drain.signal.clone();
    let mut phase = drain.phase.clone();
    if !drain.opened().await {
        return;
    }
    // A scan must not flood the log: one line per source address per interval.
    let mut last_logged: std::collections::HashMap<std::net::IpAddr, std::time::Instant> =
        std::collections::HashMap::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
            // handed over: the next process accepts on the same socket
            _ = phase.wait_for(|p| *p == Phase::HandedOver) => break,
        };
        // the configuration generation in force when the connection arrived
        let acc = current.load_full();
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning
                tracing::warn!(listener = &*acc.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // the place is taken here, before anything is spawned: a burst of accepts in one
        // turn of the loop cannot pass the limit together
        if acc.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= acc.max_connections {
            acc.open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(stream);
            acc.metrics.reject(&acc.name, Reason::MaxConnections);
            continue;
        }
        let open = OpenGuard(acc.open.clone());
        if let Some(trusted) = &acc.spec.proxy_trusted {
            // The header is believed only from a balancer; it is read off the accept loop.
            if !trusted.iter().any(|n| n.contains(&canonical(remote.ip()))) {
                drop(stream);
                acc.metrics.reject(&acc.name, Reason::ProxyUntrusted);
                log_refusal(
                    &mut last_logged,
                    &acc,
                    remote,
                    "sender is not a trusted balancer",
                );
                continue;
            }
            let acc2 = acc.clone();
            let w = drain.clone();
            let cur = current.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                match proxy_protocol::read(&mut stream, remote, acc2.spec.proxy_timeout).await {
                    Ok(client) if admitted(&acc2.spec, client) => {
                        let _ = stream.set_nodelay(true);
                        serve(stream, client, acc2, w, cur, open).await
                    }
                    Ok(client) => {
                        acc2.metrics.reject(&acc2.name, Reason::Address);
                        tracing::info!(listener = &*acc2.name, remote = %client, balancer = %remote, "connection refused: address not allowed");
                    }
                    Err(e) => {
                        acc2.metrics.reject(&acc2.name, e.reason());
                        tracing::info!(listener = &*acc2.name, balancer = %remote, error = %e, "connection refused: PROXY header");
                    }
                }
            });
            continue;
        }
        if !admitted(&acc.spec, remote) {
            drop(stream);
            acc.metrics.reject(&acc.name, Reason::Address);
            log_refusal(&mut last_logged, &acc, remote, "address not allowed");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let acc2 = acc.clone();
        let w = drain.clone();
        let cur = current.clone();
        tokio::spawn(async move { serve(stream, remote, acc2, w, cur, open).await });
    }
    drop(listener);
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Logs a refused connection at most once per source address per interval.
fn log_refusal(
    last: &mut std::collections::HashMap<std::net::IpAddr, std::time::Instant>,
    acc: &Accepting,
    remote: SocketAddr,
    why: &str,
) {
    let now = std::time::Instant::now();
    if last
        .get(&remote.ip())
        .is_some_and(|t| now.duration_since(*t) < REFUSAL_LOG_INTERVAL)
    {
        return;
    }
    if last.len() >= 4096 {
        last.clear();
    }
    last.insert(remote.ip(), now);
    tracing::warn!(listener = &*acc.name, %remote, "connection refused: {why} (logged once per source per minute)");
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn admitted(l: &Listener, remote: SocketAddr) -> bool {
    let ip = canonical(remote.ip());
    if l.role == Role::Local && !ip.is_loopback() {
        return false;
    }
    l.allow.is_empty() || l.allow.iter().any(|n| n.contains(&ip))
}

async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    acc: Arc<Accepting>,
    watcher: Drain,
    current: Arc<arc_swap::ArcSwap<Accepting>>,
    _open: OpenGuard,
) {
    acc.connections_total.inc();
    let active = &acc.connections_active;
    let streams = &acc.streams;
    active.inc();
    match &acc.tls {
        None => {
            let ctx = Arc::new(ConnCtx {
                listener: acc.name.clone(),
                listener_idx: acc.index,
                streams: streams.clone(),
                dedicated: acc.spec.service.clone(),
                identity: HeaderValue::from_static("local"),
                grants: acc.worker.policy.grants("local"),
                limits: Arc::new(acc.worker.limits.caller("local")),
                refreshed: Arc::default(),
                from_peer: false,
                peer: None,
                current: current.clone(),
                activity: Arc::default(),
                remote,
                forwarded_for: crate::headers::forwarded_for(remote.ip()),
                memory: crate::memory::Connection::new(
                    acc.worker.memory.clone(),
                    acc.spec.connection_memory_budget,
                    Some("local"),
                ),
                tls: false,
                worker: acc.worker.clone(),
            });
            if is_tcp(&acc) {
                return serve_tcp(stream, ctx, &acc, &watcher).await;
            }
            let io = h2guard::Guarded::new(stream, guard_limits(&acc.spec), false);
            run_http(io, ctx, &acc, watcher, false).await;
        }
        Some((tls, timeout)) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let hs = tokio::time::timeout(*timeout, acceptor.accept(stream)).await;
            let tls_stream = match hs {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    handshake_failed(&acc, remote, classify(&e));
                    tracing::debug!(listener = &*acc.name, %remote, error = %e, "TLS handshake failed");
                    active.dec();
                    return;
                }
                Err(_) => {
                    handshake_failed(&acc, remote, Reason::HandshakeTimeout);
                    active.dec();
                    return;
                }
            };
            let (_, session) = tls_stream.get_ref();
            let identity = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(identity::identity_header);
            let Some(identity) = identity else {
                handshake_failed(&acc, remote, Reason::NoIdentity);
                active.dec();
                return;
            };
            let h2 = session.alpn_protocol() == Some(b"h2");
            let reverse = session.alpn_protocol() == Some(crate::upstream::reverse::ALPN);
            acc.metrics
                .tls_handshakes
                .get_or_create(&crate::telemetry::ListenerLabels {
                    listener: acc.spec.name.clone(),
                })
                .inc();
            let ctx = tls_ctx(&acc, identity, remote, current);
            if reverse {
                adopt_reverse(tls_stream, ctx, &acc, watcher).await;
                active.dec();
                return;
            }
            if is_tcp(&acc) {
                return serve_tcp(tls_stream, ctx, &acc, &watcher).await;
            }
            // without ALPN h2 a client may still speak HTTP/2 (hyper's auto builder
            // follows the preface): the guard then decides from the preface, as on a
            // cleartext port, so no connection speaks HTTP/2 unguarded
            let io = h2guard::Guarded::new(tls_stream, guard_limits(&acc.spec), h2);
            run_http(io, ctx, &acc, watcher, h2).await;
        }
    }
    active.dec();
}

/// A connection of a listener dedicated to a TCP service, spliced to it.
async fn serve_tcp<S>(io: S, ctx: Arc<ConnCtx>, acc: &Accepting, drain: &Drain)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + crate::tcp::Reset + Unpin + Send,
{
    crate::tcp::serve(io, ctx, acc.spec.idle_timeout, drain.signal.clone()).await;
    acc.connections_active.dec();
}

/// What a TLS connection knows of its caller, verified: its identity, and whether it is
/// a peer node.
fn tls_ctx(
    acc: &Accepting,
    identity: HeaderValue,
    remote: SocketAddr,
    current: Arc<arc_swap::ArcSwap<Accepting>>,
) -> Arc<ConnCtx> {
    let id = identity.to_str().unwrap_or_default();
    let w = &acc.worker;
    Arc::new(ConnCtx {
        peer: w.peer_by_identity.get(id).copied(),
        current,
        listener: acc.name.clone(),
        listener_idx: acc.index,
        streams: acc.streams.clone(),
        dedicated: acc.spec.service.clone(),
        grants: w.policy.grants(id),
        limits: Arc::new(w.limits.caller(id)),
        refreshed: Arc::default(),
        from_peer: w.peer_identities.contains(id),
        activity: Arc::default(),
        remote,
        forwarded_for: crate::headers::forwarded_for(remote.ip()),
        memory: crate::memory::Connection::new(
            w.memory.clone(),
            acc.spec.connection_memory_budget,
            // a peer node's connections carry many callers: no share of one
            Some(id).filter(|id| !w.peer_identities.contains(*id)),
        ),
        tls: true,
        identity,
        worker: w.clone(),
    })
}

/// A connection opened with the reverse-link ALPN: taken as a link of a peer that
/// dials this node (`[[peer]] reverse = true` without an address), on a listener that
/// serves HTTP; anyone else's is closed, counted and logged.
async fn adopt_reverse<I>(io: I, ctx: Arc<ConnCtx>, acc: &Accepting, drain: Drain)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let w = &acc.worker;
    let peer = ctx
        .peer
        .map(|i| &w.config.peers[i])
        .filter(|p| p.accepts_reverse() && acc.spec.service.is_none());
    let Some(peer) = peer else {
        acc.metrics.reject(&acc.name, Reason::Alpn);
        if crate::telemetry::log_due(Reason::Alpn) {
            tracing::warn!(listener = &*acc.name, remote = %ctx.remote, identity = ctx.identity.to_str().unwrap_or("?"), "reverse link refused: not a [[peer]] with reverse = true and no address, or a listener dedicated to a service");
        }
        return;
    };
    let keepalive = (
        w.config.node.peer_ping_interval,
        w.config.node.peer_ping_timeout,
    );
    // a generation that changed the peer's entry or the trust material (CAs, CRLs) lets
    // the link go: the peer dials again and is verified under the configuration now in
    // force; any other (a registry change, this node's own certificate rotated) keeps it
    let current = ctx.current.clone();
    let (name, identity) = (peer.name.clone(), peer.identity.clone());
    let trusted = trust_digest(&w.config);
    let mut seen = w.clone();
    let reconfigured = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if current.is(&seen) {
                continue;
            }
            seen = current.worker();
            let cfg = &seen.config;
            let same_peer = cfg
                .peers
                .iter()
                .any(|p| p.name == name && p.identity == identity && p.accepts_reverse());
            if !same_peer || trust_digest(cfg) != trusted {
                return;
            }
        }
    };
    // handed over (an upgrade): let go a moment later, so that the peer dials again
    // and lands on the new process, rather than keep its link here until the
    // upgrade's drain time while the new process has none
    let mut phase = drain.phase.clone();
    let changed = async move {
        tokio::select! {
            () = reconfigured => "the peer's entry or the trust material changed",
            _ = async {
                let _ = phase.wait_for(|p| *p == Phase::HandedOver).await;
                tokio::time::sleep(SETTLE).await;
            } => "this process handed its sockets to the next one (an upgrade)",
        }
    };
    crate::upstream::reverse::adopt(
        io,
        (&peer.name, &peer.identity),
        &w.fleet.links,
        keepalive,
        drain.signal.clone(),
        changed,
    )
    .await;
    drop(drain);
}

/// What the trust material of `cfg` reads now: its CA, CRL and trust domains' files.
fn trust_digest(cfg: &crate::config::Config) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(t) = &cfg.tls {
        let mut file = |p: &std::path::Path| std::fs::read(p).unwrap_or_default().hash(&mut h);
        file(&t.files.ca);
        if let Some(c) = &t.crl {
            file(c);
        }
        for d in &t.trust_domains {
            match &d.authorities {
                crate::identity::bundle::Authorities::Pem(p)
                | crate::identity::bundle::Authorities::Spiffe(p) => file(p),
            }
            if let Some(c) = &d.crl {
                file(c);
            }
        }
    }
    h.finish()
}

/// Keeps a reverse link to `peer` up (this node is the site that dials out): dials
/// its address with the reverse-link ALPN, verifies its certificate as any peer link
/// does, and serves the peer's requests on the link as a connection of the listener
/// `current`, until `drain` says stop. A link that fails or ends is dialled again
/// with jittered backoff.
pub async fn dial_reverse(
    peer: crate::config::Peer,
    tls: Arc<arc_swap::ArcSwap<rustls::ClientConfig>>,
    current: Arc<arc_swap::ArcSwap<Accepting>>,
    drain: Drain,
) {
    let mut stop = drain.signal.clone();
    let mut backoff = Duration::from_millis(100);
    // not before the node is ready, and not again once it has handed over (the next
    // process dials its own)
    if !drain.opened().await {
        return;
    }
    loop {
        if *stop.borrow() || drain.handed_over() {
            return;
        }
        let acc = current.load_full();
        let dialled = tokio::select! {
            d = tokio::time::timeout(Duration::from_secs(10), dial(&peer, tls.load_full())) => d,
            _ = stop.wait_for(|s| *s) => return,
        };
        match dialled {
            Ok(Ok((stream, remote))) => {
                let began = std::time::Instant::now();
                let Some(identity) = HeaderValue::from_str(&peer.identity).ok() else {
                    return;
                };
                acc.connections_total.inc();
                acc.connections_active.inc();
                let ctx = tls_ctx(&acc, identity, remote, current.clone());
                tracing::info!(peer = %peer.name, address = %peer.address, "reverse link up: serving the peer's requests on the link this node opened");
                let io = h2guard::Guarded::new(stream, guard_limits(&acc.spec), true);
                let keepalive = (
                    acc.worker.config.node.peer_ping_interval,
                    acc.worker.config.node.peer_ping_timeout,
                );
                let trip = io.trip();
                let _ = h2conn::serve_with(io, ctx, &acc, &drain, trip, keepalive).await;
                acc.connections_active.dec();
                // a link that lived a while starts the backoff afresh; one the peer ends
                // at once (it takes no reverse link from this node) backs off
                if began.elapsed() >= Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                tracing::info!(peer = %peer.name, "reverse link ended: dialling again");
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer.name, address = %peer.address, error = %e, "reverse link: cannot reach the peer");
            }
            Err(_) => {
                tracing::warn!(peer = %peer.name, address = %peer.address, "reverse link: dialling timed out");
            }
        }
        let wait = backoff.mul_f64(0.8 + fastrand::f64() * 0.4);
        backoff = (backoff * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// TCP and TLS to the peer, the reverse-link ALPN agreed.
async fn dial(
    peer: &crate::config::Peer,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, SocketAddr), String> {
    let (stream, remote) = crate::upstream::dial_peer(&peer.address, tls).await?;
    if stream.get_ref().1.alpn_protocol() != Some(crate::upstream::reverse::ALPN) {
        return Err("the peer does not take reverse links on this port (ALPN)".into());
    }
    Ok((stream, remote))
}

/// Whether the listener is dedicated to a TCP service: its connections are spliced,
/// not read as HTTP.
fn is_tcp(acc: &Accepting) -> bool {
    let w = &acc.worker;
    acc.spec
        .service
        .as_deref()
        .and_then(|n| w.table.by_name(n))
        .is_some_and(|i| w.config.services[i].protocol == crate::config::Protocol::Tcp)
}

fn handshake_failed(acc: &Accepting, remote: SocketAddr, reason: Reason) {
    acc.metrics
        .handshake_failures
        .get_or_create(&ReasonLabels {
            listener: acc.name.to_string(),
            reason: reason.to_owned(),
        })
        .inc();
    acc.metrics.reject(&acc.name, Reason::Tls);
    tracing::info!(listener = &*acc.name, %remote, reason = reason.as_str(), "TLS handshake refused");
}

/// A bounded reason for a failed handshake, from the rustls error underneath.
fn classify(e: &std::io::Error) -> Reason {
    use rustls::{CertificateError as C, Error as E};
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return Reason::HandshakeIo;
    };
    match inner {
        E::NoCertificatesPresented => Reason::NoClientCert,
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => Reason::UnknownCa,
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => Reason::Expired,
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => Reason::NotYetValid,
        E::InvalidCertificate(C::Revoked) => Reason::Revoked,
        E::InvalidCertificate(C::Other(o))
            if o.0
                .downcast_ref::<crate::identity::domains::TrustDomainError>()
                .is_some() =>
        {
            Reason::TrustDomain
        }
        E::InvalidCertificate(_) => Reason::BadCertificate,
        E::PeerIncompatible(_) => Reason::Incompatible,
        E::NoApplicationProtocol => Reason::Alpn,
        E::InvalidMessage(_) => Reason::BadMessage,
        _ => Reason::HandshakeOther,
    }
}

/// Serves HTTP on a connection until it ends: HTTP/2 (by ALPN, or by its preface on a
/// connection that offered none) through [`h2conn`], HTTP/1.1 through hyper. Counts and
/// logs the reason when fedport cut it for the client's fault.
async fn run_http<I>(
    mut io: h2guard::Guarded<I>,
    ctx: Arc<ConnCtx>,
    acc: &Accepting,
    drain: Drain,
    alpn_h2: bool,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let trip = io.trip();
    let remote = ctx.remote;
    let (h2, prefix) = if alpn_h2 {
        (true, bytes::Bytes::new())
    } else {
        match tokio::time::timeout(acc.spec.header_timeout, h2conn::sniff(&mut io)).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(_)) => return,
            Err(_) => {
                acc.metrics.reject(&acc.name, Reason::SlowHeaders);
                return;
            }
        }
    };
    let io = h2conn::Rewind::new(io, prefix);
    let refused = if h2 {
        h2conn::serve(io, ctx, acc, &drain, trip.clone()).await
    } else {
        serve_h1(io, ctx, acc, &drain, &trip).await
    };
    if let Some(why) = trip.reason().or(refused) {
        acc.metrics.reject(&acc.name, why);
        log_cut(&acc.name, remote, why);
    }
    drop(drain);
}

/// Serves HTTP/1.1 until the connection ends; asks it to finish (close when idle) when
/// the node drains or when it has carried no request for the listener's idle timeout,
/// and closes it when a request is in flight but no bytes have moved either way for
/// the stream idle timeout.
async fn serve_h1<I>(
    io: I,
    ctx: Arc<ConnCtx>,
    acc: &Accepting,
    drain: &Drain,
    trip: &h2guard::Trip,
) -> Option<Reason>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let activity = ctx.activity.clone();
    let remote = ctx.remote;
    // After a handover every answer says `Connection: close`, so that the client's next
    // request goes to the new process. The phase moves only on to HandedOver once the
    // connection is served: `has_changed` is an atomic load, no lock, per request.
    let mut handed = drain.phase.clone();
    let handed_at_start = *handed.borrow_and_update() == Phase::HandedOver;
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let close = handed_at_start || handed.has_changed().unwrap_or(true);
        // Boxed: the request's state machine is several KiB, and hyper moves the future
        // it runs (into the connection, and out again for the output); a box moves as a
        // pointer. Measured: memmove fell from 23% of fedport's CPU (docs/performance.md).
        let answer = Box::pin(proxy::handle(
            req.map(crate::caller::CallerBody::H1),
            ctx.clone(),
            None,
        ));
        async move {
            let mut answer = answer.await;
            if close {
                if let Ok(r) = &mut answer {
                    r.headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
            }
            answer
        }
    });
    let conn = acc.builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut signal = drain.signal.clone();
    let idle = acc.spec.idle_timeout;
    let stall = acc.spec.stream_idle_timeout;
    let period = (idle / 4).min(acc.spec.header_timeout / 2).min(stall / 4);
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(50)));
    let mut closing = false;
    let mut refused = None;
    let (mut moved, mut still_since) = (trip.moved(), std::time::Instant::now());
    let mut phase = drain.phase.clone();
    let mut settling: Option<tokio::time::Interval> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    refused = refusal(&e);
                    tracing::debug!(listener = &*acc.name, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = signal.wait_for(|s| *s), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = phase.wait_for(|p| *p == Phase::HandedOver), if settling.is_none() && !closing => {
                settling = Some(tokio::time::interval(SETTLE / 4));
            }
            // handed over: a request in flight is answered with `Connection: close`
            // (and so is every request after: `svc` above), and a connection idle for
            // SETTLE is closed, as a keep-alive timeout would (RFC 9112 §9.3.1: the
            // client retries on another connection)
            _ = async { settling.as_mut().expect("guarded by is_some").tick().await }, if settling.is_some() && !closing => {
                if activity.in_flight() || activity.idle_for() >= SETTLE {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = tick.tick() => {
                if !closing && activity.idle_for() >= idle {
                    closing = true;
                    acc.metrics.reject(&acc.name, Reason::IdleTimeout);
                    conn.as_mut().graceful_shutdown();
                }
                let now = trip.moved();
                if now != moved || !activity.in_flight() {
                    (moved, still_since) = (now, std::time::Instant::now());
                } else if still_since.elapsed() >= stall {
                    // a request in flight and nothing moving: the connection is its stream
                    acc.metrics.reject(&acc.name, Reason::StreamIdle);
                    h2conn::log_idle(&acc.name, remote, stall);
                    break;
                }
            }
        }
    }
    refused
}

fn guard_limits(l: &Listener) -> h2guard::Limits {
    h2guard::Limits::new(MAX_HEADER_LIST, l.header_timeout)
}

/// The bounded reason for a connection fedport itself ended for a client's fault: an
/// HTTP/2 error the codec detected (it sent GOAWAY), or slow HTTP/1.1 headers.
fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return Some(Reason::SlowHeaders);
            }
        }
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            if !(h.is_go_away() && h.is_library()) {
                return None;
            }
            return Some(match h.reason()? {
                h2::Reason::PROTOCOL_ERROR => Reason::H2ProtocolError,
                h2::Reason::FLOW_CONTROL_ERROR => Reason::H2FlowControlError,
                h2::Reason::FRAME_SIZE_ERROR => Reason::H2FrameSizeError,
                h2::Reason::COMPRESSION_ERROR => Reason::H2CompressionError,
                h2::Reason::ENHANCE_YOUR_CALM => Reason::H2EnhanceYourCalm,
                h2::Reason::NO_ERROR => return None,
                _ => Reason::H2OtherError,
            });
        }
        cur = err.source();
    }
    None
}

/// One line per reason per 10 s: an attack reconnecting in a loop is counted, not
/// logged per connection.
fn log_cut(listener: &str, remote: SocketAddr, why: Reason) {
    if !crate::telemetry::log_due(why) {
        return;
    }
    tracing::warn!(listener, %remote, reason = why.as_str(), "connection cut for abuse (counted in fedport_rejections_total; logged at most every 10s per reason)");
}

/// What a connection task holds while it lives: the drain signal, the node's phase,
/// and a share of the worker's count of live connections (the drain waits for it to
/// reach zero).
#[derive(Clone)]
pub struct Drain {
    /// True: end now (GOAWAY, or close once the request in flight is answered).
    pub signal: watch::Receiver<bool>,
    pub phase: watch::Receiver<Phase>,
    pub live: Arc<()>,
}

/// Where the node is in its life, as its accept loops and connections see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Sockets are bound, nothing is accepted yet: connections wait in the kernel's
    /// queue until the node is ready (a new binary of an upgrade that fails before it
    /// is ready has taken no connection with it).
    Starting,
    Serving,
    /// A binary upgrade handed every socket to the next process: accept no more, and
    /// end each connection once it has carried nothing for [`SETTLE`]; busy ones serve
    /// on until they end or the upgrade's drain time passes (then `signal`).
    HandedOver,
}

/// How long a connection of a handed-over node has carried nothing before it is told
/// to go (GOAWAY, or closed): long enough that a client between two requests is not
/// cut, short enough that an idle pool moves to the new process soon.
pub const SETTLE: Duration = Duration::from_secs(1);

impl Drain {
    /// Waits until the node is past starting; false if it never will be (it is
    /// stopping, or handed over).
    pub async fn opened(&self) -> bool {
        let mut phase = self.phase.clone();
        let mut signal = self.signal.clone();
        tokio::select! {
            p = phase.wait_for(|p| *p != Phase::Starting) => p.is_ok_and(|p| *p == Phase::Serving),
            _ = signal.wait_for(|s| *s) => false,
        }
    }

    /// Whether the node has handed its sockets over.
    pub fn handed_over(&self) -> bool {
        *self.phase.borrow() == Phase::HandedOver
    }
}
