//! The control thread: one more single-threaded runtime beside the workers, off the
//! request path. It keeps a PING connection to every peer that offers one of this
//! node's services (liveness and round-trip time, reconnecting with jittered backoff),
//! runs the active health checks of the services that ask for them, writing what it
//! learns into the [`Fleet`], ticks the traffic-spike detector once a second, and
//! ships spans to the OTLP collector.

use super::Fleet;
use crate::config::{Config, Endpoint, HealthCheck, Peer, Protocol, Scheme};
use crate::upstream::{EndpointPool, Settings};
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Starts the control thread; it ends when `shutdown` turns true.
pub fn spawn(
    config: Arc<Config>,
    fleet: Arc<Fleet>,
    settings: Settings,
    (spikes, exporter): (
        Arc<std::sync::Mutex<crate::telemetry::spike::Detector>>,
        Option<crate::telemetry::otlp::Exporter>,
    ),
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    crate::runtime::runtime_thread("fedport-control".into(), move || async move {
        let mut tasks = tokio::task::JoinSet::new();
        let peer_tls = match &config.tls {
            Some(t) if !config.peers.is_empty() => {
                match crate::identity::PeerTls::load(&t.files, t.crl.as_deref(), &t.trust_domains) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot load TLS for peers");
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(tls) = &peer_tls {
            for i in 0..config.peers.len() {
                let peer = config.peers[i].clone();
                if peer.services.is_empty() {
                    // nothing is routed to it: a member of the registry that hosts
                    // none of this node's services costs no connection and no PINGs
                    continue;
                }
                if peer.accepts_reverse() {
                    // it dials this node: probed over the links it opened
                    tasks.spawn(probe_reverse(config.clone(), peer, i, fleet.clone()));
                    continue;
                }
                match tls.config(&peer.identity, &[b"h2"]) {
                    Ok(cfg) => {
                        tasks.spawn(probe_peer(config.clone(), peer, i, fleet.clone(), cfg));
                    }
                    Err(e) => {
                        tracing::error!(peer = %peer.name, error = %e, "cannot build TLS for peer")
                    }
                }
            }
        }
        for (s, svc) in config.services.iter().enumerate() {
            let Some(hc) = &svc.health else { continue };
            for (e, ep) in svc.endpoints.iter().enumerate() {
                let pool = EndpointPool::new(
                    ep.clone(),
                    &svc.name,
                    settings.clone(),
                    crate::upstream::UNCAPPED,
                );
                tasks.spawn(check_endpoint(
                    fleet.clone(),
                    (s, e),
                    pool,
                    hc.clone(),
                    svc.protocol,
                    svc.name.clone(),
                ));
            }
        }
        let f = fleet.clone();
        tasks.spawn(async move {
            loop {
                f.refresh_gauges();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        if let Some(e) = exporter {
            tasks.spawn(e.run());
        }
        tasks.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if let Ok(mut d) = spikes.lock() {
                    d.tick();
                }
            }
        });
        let _ = shutdown.wait_for(|s| *s).await;
        tasks.abort_all();
    })
}

/// `d` give or take 20%, so that checks and reconnects do not march in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// Keeps an HTTP/2 connection to the peer and PINGs it every `peer_ping_interval`:
/// an answer is a round-trip time sample; none within `peer_ping_timeout` (a
/// blackholed link), or no connection at all, marks the peer down.
async fn probe_peer(
    config: Arc<Config>,
    peer: Peer,
    index: usize,
    fleet: Arc<Fleet>,
    tls: Arc<rustls::ClientConfig>,
) {
    let state = fleet.peers[index].clone();
    let (interval, timeout) = (
        config.node.peer_ping_interval,
        config.node.peer_ping_timeout,
    );
    let mut backoff = Duration::from_millis(100);
    // connections in a row that ended before answering a PING
    let mut dropped = 0u32;
    loop {
        let conn =
            tokio::time::timeout(timeout.max(Duration::from_secs(1)), connect(&peer, &tls)).await;
        let (mut pings, _keep) = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if state.set_up(false) {
                    tracing::warn!(peer = %peer.name, error = %e, "peer unreachable: traffic avoids it");
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                if state.set_up(false) {
                    tracing::warn!(peer = %peer.name, "peer unreachable (connect timed out): traffic avoids it");
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (mut ended, mut answered) = (false, false);
        loop {
            let start = Instant::now();
            match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {
                    // answered: the backoff starts afresh (not at the connect, so that
                    // a peer that takes connections and drops them is dialled less and
                    // less often, not as fast as it answers)
                    backoff = Duration::from_millis(100);
                    (answered, dropped) = (true, 0);
                    state.sample_rtt(start.elapsed());
                    if state.set_up(true) {
                        tracing::info!(peer = %peer.name, rtt_ms = start.elapsed().as_secs_f64() * 1e3, "peer up");
                    }
                }
                // the connection ended (an idle timeout, a restart): dial again soon
                Ok(Err(_)) => {
                    ended = true;
                    break;
                }
                Err(_) => {
                    if state.set_up(false) {
                        tracing::warn!(peer = %peer.name, timeout_ms = timeout.as_millis() as u64, "peer down: PING not answered; traffic moves away");
                    }
                    break;
                }
            }
            tokio::time::sleep(interval).await;
        }
        if ended {
            // two in a row that ended before answering a PING: the peer is not up,
            // whatever its TLS said (one may be a restarting node's last)
            if !answered {
                dropped += 1;
            }
            if dropped >= 2 && state.set_up(false) {
                tracing::warn!(peer = %peer.name, "peer closed the connection before answering a PING: traffic avoids it");
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Probes a peer that dials this node over the links it opened, every
/// `peer_ping_interval`: an answer within `peer_ping_timeout` is a round-trip time
/// sample; none, or no link at all, marks the peer down.
async fn probe_reverse(config: Arc<Config>, peer: Peer, index: usize, fleet: Arc<Fleet>) {
    let state = fleet.peers[index].clone();
    let (interval, timeout) = (
        config.node.peer_ping_interval,
        config.node.peer_ping_timeout,
    );
    loop {
        match crate::upstream::reverse::ping(&fleet.links, (&peer.name, &peer.identity), timeout)
            .await
        {
            Ok(rtt) => {
                state.sample_rtt(rtt);
                if state.set_up(true) {
                    tracing::info!(peer = %peer.name, rtt_ms = rtt.as_secs_f64() * 1e3, "peer up (over its reverse link)");
                }
            }
            Err(e) => {
                if state.set_up(false) {
                    tracing::warn!(peer = %peer.name, error = %e, "peer down (its reverse link): traffic moves away");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// A TLS + HTTP/2 connection to a peer that does nothing but answer PINGs; the
/// returned sender keeps it open.
async fn connect(
    peer: &Peer,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(h2::PingPong, h2::client::SendRequest<Bytes>), String> {
    let (stream, _) = crate::upstream::dial_peer(&peer.address, tls.clone()).await?;
    let (send, mut conn) = h2::client::handshake(stream)
        .await
        .map_err(|e| e.to_string())?;
    let pings = conn.ping_pong().ok_or("no PING handle")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((pings, send))
}

/// Asks one endpoint whether it is healthy every `interval`; `unhealthy_threshold`
/// failures in a row take it out of rotation, `healthy_threshold` successes bring it
/// back (and end an ejection).
async fn check_endpoint(
    fleet: Arc<Fleet>,
    (s, e): (usize, usize),
    pool: Arc<EndpointPool>,
    hc: HealthCheck,
    protocol: Protocol,
    service: String,
) {
    let (mut oks, mut fails, mut healthy) = (0u32, 0u32, true);
    loop {
        let ok = tokio::time::timeout(hc.timeout, probe(&pool, &hc, protocol))
            .await
            .unwrap_or(false);
        if ok {
            oks += 1;
            fails = 0;
            if !healthy && oks >= hc.healthy_threshold {
                healthy = true;
                fleet.set_active(s, e, true);
                tracing::info!(service = %service, endpoint = %pool.endpoint.url, "endpoint healthy again");
            }
        } else {
            fails += 1;
            oks = 0;
            if healthy && fails >= hc.unhealthy_threshold {
                healthy = false;
                fleet.set_active(s, e, false);
                tracing::warn!(service = %service, endpoint = %pool.endpoint.url, "endpoint failed its health checks: out of rotation");
            }
        }
        tokio::time::sleep(jitter(hc.interval)).await;
    }
}

/// One check: `grpc.health.v1.Health/Check` answering SERVING for gRPC services, a 2xx
/// for the health path of HTTP ones.
async fn probe(pool: &Arc<EndpointPool>, hc: &HealthCheck, protocol: Protocol) -> bool {
    let ep: &Endpoint = &pool.endpoint;
    // a TCP service's endpoint: it accepts a connection
    if protocol == Protocol::Tcp {
        let connect = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port));
        return matches!(tokio::time::timeout(hc.timeout, connect).await, Ok(Ok(_)));
    }
    let scheme = if ep.scheme == Scheme::Https {
        "https"
    } else {
        "http"
    };
    let authority = format!("{}:{}", ep.host, ep.port);
    let (path, body, grpc) = match protocol {
        Protocol::Grpc => {
            // HealthCheckRequest { service = 1 }
            let name = hc.grpc_service.as_bytes();
            let mut msg = vec![0x0a, name.len() as u8];
            msg.extend_from_slice(name);
            let mut framed = vec![0];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            ("/grpc.health.v1.Health/Check", Bytes::from(framed), true)
        }
        Protocol::Http | Protocol::Tcp => (hc.path.as_str(), Bytes::new(), false),
    };
    let mut req = http::Request::builder().method(if grpc { "POST" } else { "GET" });
    req = if pool.speaks_h2() {
        req.uri(format!("{scheme}://{authority}{path}"))
    } else {
        req.uri(path).header(http::header::HOST, authority.as_str())
    };
    if grpc {
        req = req
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
    }
    let Ok(req) = req.body(Either::Right(Full::new(body))) else {
        return false;
    };
    let Ok((resp, _h1)) = pool
        .send(
            req,
            tokio::time::Instant::now() + std::time::Duration::from_secs(30),
        )
        .await
    else {
        return false;
    };
    if !resp.status().is_success() {
        return false;
    }
    if !grpc {
        let _ = resp.into_body().collect().await;
        return true;
    }
    let head_status = resp.headers().get("grpc-status").cloned();
    let Ok(done) = resp.into_body().collect().await else {
        return false;
    };
    let status =
        head_status.or_else(|| done.trailers().and_then(|t| t.get("grpc-status").cloned()));
    let msg = done.to_bytes();
    // HealthCheckResponse { status = 1 (SERVING) }
    status.is_some_and(|s| s == "0") && msg.len() >= 7 && msg[5..7] == [0x08, 0x01]
}
