//! Membership from etcd. A node registers itself (name, region, zone, address,
//! identity, the services it hosts) under `PREFIX/nodes/NAME` with a lease it keeps
//! alive, and watches `PREFIX/nodes/` for the others. What it sees is merged into the
//! file's configuration (`merge`: the file's `[[peer]]` entries win) and applied through
//! the same generation swap as a reload. Rules and schemas never come from etcd. When
//! etcd is unreachable or has no quorum the node keeps the last membership it saw,
//! reports the outage (`/readyz?verbose`, `fedport_registry_up`), and reconnects with
//! jittered backoff; it does not go unready for that alone. A node that stops cleanly
//! revokes its lease, so the others drop it at once.

use crate::config::{Config, Peer, Registry};
use crate::telemetry::Metrics;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot read {0}: {1}")]
    Read(std::path::PathBuf, std::io::Error),
    #[error("the lease expired")]
    LeaseLost,
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
}

/// One node as it registers itself (the value under its key, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub region: String,
    #[serde(default)]
    pub zone: Option<String>,
    pub address: String,
    pub identity: String,
    #[serde(default)]
    pub services: Vec<String>,
}

/// Reads a member from its key and value. A member describes itself at its own key
/// (`PREFIX/nodes/NAME`), under a plain name that rules may use for it — never
/// `local`, never a pattern — and with one concrete identity, never a pattern: a
/// member named `local`, or with the identity `*`, would otherwise turn a rule's
/// `from = "local"` into "every caller".
/// `allowed`: the identities members may have ([`members_pattern`]).
pub fn decode(
    dir: &str,
    key: &str,
    value: &[u8],
    allowed: Option<&crate::grammar::Pattern>,
) -> Result<Member, String> {
    let m: Member = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    if key.strip_prefix(dir) != Some(m.name.as_str()) {
        return Err(format!("its name {:?} is not its key's", m.name));
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if m.name.is_empty() || m.name.len() > 253 || !m.name.chars().all(plain) {
        return Err(format!(
            "name {:?}: letters, digits, '-', '_' and '.' only",
            m.name
        ));
    }
    if m.name == "local" {
        return Err("the name \"local\" is reserved for the local listener's callers".into());
    }
    let dns = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    };
    let concrete = match m.identity.strip_prefix("spiffe://") {
        Some(rest) => {
            let mut parts = rest.splitn(2, '/');
            dns(parts.next().unwrap_or(""))
                && parts.next().is_some_and(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_graphic() && c != '*')
                })
        }
        None => dns(&m.identity),
    };
    if !concrete || m.identity == "local" {
        return Err(format!(
            "identity {:?}: a SPIFFE URI or a DNS name, without patterns",
            m.identity
        ));
    }
    if !allowed.is_some_and(|p| p.matches(&m.identity)) {
        return Err(format!(
            "identity {:?} is not a node's (see [registry.etcd] members)",
            m.identity
        ));
    }
    Ok(m)
}

impl Member {
    fn peer(&self) -> Peer {
        Peer {
            name: self.name.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            address: self.address.clone(),
            identity: self.identity.clone(),
            services: self.services.clone(),
            reverse: false,
        }
    }
}

/// How the registry is doing, for `/readyz?verbose`.
#[derive(Default)]
pub struct Status {
    inner: Mutex<StatusInner>,
}

#[derive(Default)]
struct StatusInner {
    up: bool,
    members: usize,
    last_error: Option<String>,
    since: Option<Instant>,
    changed: Option<Instant>,
}

impl Status {
    pub fn detail(&self) -> serde_json::Value {
        let Ok(s) = self.inner.lock() else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "etcd": if s.up { "up" } else { "down" },
            "members": s.members,
            "for_seconds": s.since.map(|t| t.elapsed().as_secs()),
            "last_change_seconds_ago": s.changed.map(|t| t.elapsed().as_secs()),
            "last_error": s.last_error,
        })
    }

    fn set(&self, up: bool, error: Option<String>) {
        if let Ok(mut s) = self.inner.lock() {
            if s.up != up || s.since.is_none() {
                s.since = Some(Instant::now());
            }
            s.up = up;
            if error.is_some() {
                s.last_error = error;
            }
        }
    }

    fn members(&self, n: usize) {
        if let Ok(mut s) = self.inner.lock() {
            s.members = n;
            s.changed = Some(Instant::now());
        }
    }
}

/// The identities members may have: `members`, or this node's own identity with its
/// last segment or label `*` (`spiffe://fed.example/node/a` gives
/// `spiffe://fed.example/node/*`, `a.nodes.fed.example` gives `*.nodes.fed.example`).
/// `None` when neither is known: no member is believed.
pub fn members_pattern(reg: &Registry, own: Option<&str>) -> Option<crate::grammar::Pattern> {
    if let Some(m) = &reg.members {
        return crate::grammar::Pattern::parse(m).ok();
    }
    let own = own?;
    let pattern = match own.strip_prefix("spiffe://") {
        Some(rest) => format!("spiffe://{}/*", rest.rsplit_once('/')?.0),
        None => format!("*.{}", own.split_once('.')?.1),
    };
    crate::grammar::Pattern::parse(&pattern).ok()
}

/// This node's identity, from its certificate.
fn own_identity(cfg: &Config) -> Option<String> {
    let certs = crate::identity::load_certs(&cfg.tls.as_ref()?.files.cert).ok()?;
    crate::identity::identity_of(certs.first()?)
}

/// The file's configuration with the registry's members added as peers: a member
/// with the name or identity of a `[[peer]]` in the file, or this node itself, is left
/// out, and so is one whose identity is not a node's ([`members_pattern`]): anyone who
/// can write to the registry could otherwise make a client a peer, whose `fed-*`
/// headers are believed. Of the services a member hosts only those declared here are
/// kept.
pub fn merge(file: &Config, members: &[Member]) -> Config {
    let mut cfg = file.clone();
    let allowed = file
        .registry
        .as_ref()
        .and_then(|r| members_pattern(r, own_identity(file).as_deref()));
    for m in members {
        if m.name == file.node.name
            || file
                .peers
                .iter()
                .any(|p| p.name == m.name || p.identity == m.identity)
        {
            continue;
        }
        if !allowed.as_ref().is_some_and(|p| p.matches(&m.identity)) {
            tracing::warn!(
                member = %m.name,
                identity = %m.identity,
                "registry: a member whose identity is not a node's (see [registry.etcd] members); ignored"
            );
            continue;
        }
        let mut p = m.peer();
        p.services
            .retain(|s| file.services.iter().any(|d| &d.name == s));
        cfg.peers.push(p);
    }
    cfg
}

/// What this node registers: its advertised address (or the first peer listener's
/// bound one), its certificate's identity, and the services it has endpoints for.
pub fn me(cfg: &Config, bound: &[(String, std::net::SocketAddr)]) -> Option<Member> {
    let reg = cfg.registry.as_ref()?;
    let address = match &reg.advertise {
        Some(a) => a.clone(),
        None => {
            let l = cfg
                .listeners
                .iter()
                .find(|l| l.role == crate::config::Role::Peer)?;
            bound.iter().find(|(n, _)| n == &l.name)?.1.to_string()
        }
    };
    let identity = own_identity(cfg)?;
    Some(Member {
        name: cfg.node.name.clone(),
        region: cfg.node.region.clone(),
        zone: cfg.node.zone.clone(),
        address,
        identity,
        services: cfg
            .services
            .iter()
            .filter(|s| !s.endpoints.is_empty())
            .map(|s| s.name.clone())
            .collect(),
    })
}

/// Runs the registry until `stop` turns true: registers `me`, keeps the lease, and
/// sends every membership it sees on `out`. On `stop` it revokes its lease, so that
/// the other nodes drop this one at once rather than when the lease runs out.
pub async fn run(
    reg: Registry,
    me: Member,
    out: watch::Sender<Arc<Vec<Member>>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = Instant::now();
        let result = session(&reg, &me, &out, &status, &metrics, &mut stop).await;
        let error = match result {
            Ok(()) => {
                metrics.registry_up.set(0);
                status.set(false, Some("stopped: this node is shutting down".into()));
                return;
            }
            Err(e) => e.to_string(),
        };
        metrics.registry_up.set(0);
        metrics.registry_errors.inc();
        if status.inner.lock().is_ok_and(|s| s.up) {
            tracing::warn!(error = %error, "registry unreachable: routing keeps the last membership seen");
        } else {
            tracing::debug!(error = %error, "registry still unreachable");
        }
        status.set(false, Some(error));
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
        }
        let jitter = fastrand::u64(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Ready once `stop` is true; never, should its sender go without saying so.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RegistryError::Timeout(d)),
    }
}

async fn connect(reg: &Registry) -> Result<Client, RegistryError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if reg.ca.is_some() || reg.client.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &reg.ca {
            let pem = std::fs::read(ca).map_err(|e| RegistryError::Read(ca.clone(), e))?;
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let Some((c, k)) = &reg.client {
            let cert = std::fs::read(c).map_err(|e| RegistryError::Read(c.clone(), e))?;
            let key = std::fs::read(k).map_err(|e| RegistryError::Read(k.clone(), e))?;
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(tls);
    }
    timed(
        Duration::from_secs(3),
        Client::connect(reg.endpoints.clone(), Some(opts)),
    )
    .await
}

/// What one session holds once registered and watching.
struct Live {
    client: Client,
    lease: i64,
    /// The ttl etcd granted, which the keepalive timing follows.
    ttl: Duration,
    keeper: etcd_client::LeaseKeeper,
    alive: etcd_client::LeaseKeepAliveStream,
    stream: etcd_client::WatchStream,
    members: BTreeMap<String, Member>,
}

/// One session: register, read everything, then follow the watch; returns on the
/// first failure (the caller reconnects), or `Ok` once `stop` has turned true and
/// the lease is revoked (or revoking it failed: it runs out by itself then). A stop
/// during registration revokes whatever lease was granted so far.
async fn session(
    reg: &Registry,
    me: &Member,
    out: &watch::Sender<Arc<Vec<Member>>>,
    status: &Status,
    metrics: &Metrics,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), RegistryError> {
    let mut granted = None;
    let live = {
        let setup = register(reg, me, &mut granted);
        tokio::select! {
            r = setup => Some(r?),
            _ = stopped(stop) => None,
        }
    };
    let Some(mut live) = live else {
        if let Some((client, lease)) = granted {
            revoke(client, lease).await;
        }
        return Ok(());
    };
    let dir = format!("{}/nodes/", reg.prefix);
    let my_key = format!("{dir}{}", me.name);
    let op = Duration::from_secs(3);
    let allowed = members_pattern(reg, Some(&me.identity));
    publish(&live.members, me, out, status, metrics);
    status.set(true, None);
    metrics.registry_up.set(1);
    tracing::info!(members = live.members.len().saturating_sub(1), endpoints = ?reg.endpoints, "registry: registered and watching");
    let mut renew = tokio::time::interval((live.ttl / 3).max(Duration::from_millis(300)));
    renew.tick().await;
    // no answer to a keepalive within two thirds of the ttl: the session is lost,
    // noticed while a third of the lease is left
    let grace = live.ttl * 2 / 3;
    let lost = tokio::time::sleep(grace);
    tokio::pin!(lost);
    loop {
        tokio::select! {
            _ = stopped(stop) => {
                revoke(live.client, live.lease).await;
                return Ok(());
            }
            _ = &mut lost => return Err(RegistryError::Timeout(grace)),
            _ = renew.tick() => {
                timed(op, live.keeper.keep_alive()).await?;
            }
            ack = live.alive.message() => match ack? {
                Some(r) if r.ttl() > 0 => lost.as_mut().reset(tokio::time::Instant::now() + grace),
                Some(_) => return Err(RegistryError::LeaseLost),
                None => return Err(RegistryError::WatchEnded("keepalive stream closed".into())),
            },
            w = live.stream.message() => {
                let Some(resp) = w? else {
                    return Err(RegistryError::WatchEnded("closed".into()));
                };
                if resp.canceled() {
                    return Err(RegistryError::WatchEnded(resp.cancel_reason().to_owned()));
                }
                let mut changed = false;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match ev.event_type() {
                        EventType::Put => match decode(&dir, &key, kv.value(), allowed.as_ref()) {
                            Ok(m) => changed |= live.members.insert(key, m.clone()).as_ref() != Some(&m),
                            Err(e) => {
                                tracing::warn!(%key, error = %e, "registry: a value that is not a member; ignored");
                                changed |= live.members.remove(&key).is_some();
                            }
                        },
                        EventType::Delete if key == my_key => {
                            // deleted by hand while the lease lives: register again
                            tracing::warn!(%key, "registry: this node's key was deleted; registering again");
                            put_me(&mut live.client, &my_key, me, live.lease).await?;
                        }
                        EventType::Delete => changed |= live.members.remove(&key).is_some(),
                    }
                }
                if changed {
                    publish(&live.members, me, out, status, metrics);
                }
            }
        }
    }
}

/// Connects, grants a lease (noted in `granted` at once, for a stop to revoke), puts
/// this node's key, starts the keepalive, reads the prefix and watches it from the
/// revision read.
async fn register(
    reg: &Registry,
    me: &Member,
    granted: &mut Option<(Client, i64)>,
) -> Result<Live, RegistryError> {
    let op = Duration::from_secs(3);
    let mut client = connect(reg).await?;
    let dir = format!("{}/nodes/", reg.prefix);
    let allowed = members_pattern(reg, Some(&me.identity));
    let allowed = allowed.as_ref();
    // whole seconds, rounded up: a lease never shorter than the configured ttl
    let ttl = reg.ttl.as_millis().div_ceil(1000).max(1) as i64;
    let grant = timed(op, client.lease_grant(ttl, None)).await?;
    let lease = grant.id();
    *granted = Some((client.clone(), lease));
    let ttl = Duration::from_secs(grant.ttl().max(1) as u64);
    put_me(&mut client, &format!("{dir}{}", me.name), me, lease).await?;
    let (keeper, alive) = timed(op, client.lease_keep_alive(lease)).await?;
    let all = timed(
        op,
        client.get(dir.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = all.header().map(|h| h.revision()).unwrap_or(0);
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    for kv in all.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match decode(&dir, &key, kv.value(), allowed) {
            Ok(m) => {
                members.insert(key, m);
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "registry: a value that is not a member; ignored")
            }
        }
    }
    let stream = timed(
        op,
        client.watch(
            dir.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await?;
    Ok(Live {
        client,
        lease,
        ttl,
        keeper,
        alive,
        stream,
        members,
    })
}

async fn put_me(
    client: &mut Client,
    key: &str,
    me: &Member,
    lease: i64,
) -> Result<(), RegistryError> {
    let value = serde_json::to_vec(me).expect("a member serializes");
    timed(
        Duration::from_secs(3),
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await?;
    Ok(())
}

/// Revokes the lease, which deletes this node's key: the others drop it at once.
async fn revoke(mut client: Client, lease: i64) {
    match timed(Duration::from_secs(1), client.lease_revoke(lease)).await {
        Ok(_) => tracing::info!("registry: deregistered (lease revoked)"),
        Err(e) => {
            tracing::warn!(error = %e, "registry: could not revoke the lease; it runs out within the ttl")
        }
    }
}

fn publish(
    members: &BTreeMap<String, Member>,
    me: &Member,
    out: &watch::Sender<Arc<Vec<Member>>>,
    status: &Status,
    metrics: &Metrics,
) {
    let others: Vec<Member> = members
        .values()
        .filter(|m| m.name != me.name)
        .cloned()
        .collect();
    if **out.borrow() == others {
        return;
    }
    metrics.registry_members.set(others.len() as i64);
    status.members(others.len());
    let _ = out.send(Arc::new(others));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, identity: &str, services: &[&str]) -> Member {
        Member {
            name: name.into(),
            region: "r".into(),
            zone: None,
            address: "127.0.0.1:1".into(),
            identity: identity.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn members_describe_themselves_with_plain_names_and_concrete_identities() {
        let dir = "/fedport/nodes/";
        let value =
            |name: &str, identity: &str| serde_json::to_vec(&member(name, identity, &[])).unwrap();
        let ok = |key: &str, name: &str, identity: &str| {
            decode(
                dir,
                &format!("{dir}{key}"),
                &value(name, identity),
                Some(&crate::grammar::Pattern::parse("spiffe://fed.test/node/*").unwrap()),
            )
        };
        assert!(ok("eu-a", "eu-a", "spiffe://fed.test/node/eu-a").is_ok());
        assert!(ok("eu-b", "eu-b", "spiffe://fed.test/node/eu-b").is_ok());
        for (key, name, identity) in [
            ("local", "local", "spiffe://fed.test/node/x"),
            ("x", "x", "*"),
            ("x", "x", "spiffe://fed.test/node/*"),
            ("x", "x", "spiffe://fed.test/**"),
            ("x", "x", "local"),
            ("x", "x", "spiffe://fed.test"),
            ("x", "x", ""),
            ("x", "y", "spiffe://fed.test/node/y"),
            ("a b", "a b", "spiffe://fed.test/node/a"),
            ("sp*", "sp*", "spiffe://fed.test/node/a"),
            // not a node's identity
            ("m", "m", "spiffe://fed.test/client/alice"),
            ("m", "m", "node-a.fed.test"),
            ("m", "m", "spiffe://other.test/node/m"),
        ] {
            assert!(ok(key, name, identity).is_err(), "{key} {name} {identity}");
        }
        assert!(decode(dir, "/fedport/nodes/x", b"not json", None).is_err());
        let v = value("eu-a", "spiffe://fed.test/node/eu-a");
        assert!(
            decode(dir, "/fedport/nodes/eu-a", &v, None).is_err(),
            "no pattern: nobody is believed"
        );
    }

    #[test]
    fn the_file_wins_and_only_declared_services_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "[node]\nname = \"me\"\nregion = \"r\"\n\
             [[service]]\nname = \"orders\"\nprotocol = \"http\"\nendpoints = [\"h2c://127.0.0.1:9\"]\n\
             [[peer]]\nname = \"fixed\"\nregion = \"r\"\naddress = \"127.0.0.1:2\"\n\
             identity = \"spiffe://d/node/fixed\"\nservices = [\"orders\"]\n\
             [registry.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nmembers = \"spiffe://d/node/*\"\n",
        )
        .unwrap();
        let (file, _) = crate::config::load(&path).unwrap();
        assert_eq!(file.registry.as_ref().unwrap().prefix, "/fedport");
        let merged = merge(
            &file,
            &[
                member("me", "spiffe://d/node/me", &["orders"]),
                member("fixed", "spiffe://d/node/other", &["orders"]),
                member("alias", "spiffe://d/node/fixed", &["orders"]),
                member("new", "spiffe://d/node/new", &["orders", "unknown"]),
                // a client's identity written into the registry is no peer's
                member("mallory", "spiffe://d/client/alice", &["orders"]),
                member("dns", "alice.d", &["orders"]),
            ],
        );
        let names: Vec<&str> = merged.peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["fixed", "new"]);
        assert_eq!(merged.peers[0].identity, "spiffe://d/node/fixed");
        assert_eq!(merged.peers[1].services, ["orders"]);
    }
}
