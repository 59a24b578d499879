//! `fedport sandbox`: a federation on loopback with nothing to prepare — a generated
//! CA and certificates, demo services, and a node routing to them.

pub mod demo;

use crate::identity::pki::{Authority, LeafSpec, PkiError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DOMAIN: &str = "fed.sandbox";
/// The second organisation's trust domain, with a CA of its own.
pub const PARTNER: &str = "partner.example";

/// The files and addresses a sandbox was set up with.
pub struct Layout {
    pub dir: PathBuf,
    /// Per node: name, region, config file, internal port. The first is the entry node.
    pub nodes: Vec<(String, String, PathBuf, u16)>,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// eu-b dials eu-a (a reverse link): without a registry.
    pub reverse: bool,
}

/// Where the demo instances listen.
pub struct Demos {
    pub echo: SocketAddr,
    /// inventory on eu-a, eu-b and us-a
    pub inventory: [SocketAddr; 3],
    pub pricing: SocketAddr,
    /// The key-value store on us-a (a TCP service).
    pub kv: SocketAddr,
    /// The catalog on eu-a: one instance in zone eu-1a, one in eu-1b.
    pub catalog: [SocketAddr; 2],
    /// The sandbox's control port (stop and start instances).
    pub control: SocketAddr,
}

/// A loopback port that is free now, for configs that must name a port before the
/// process that binds it starts (the nodes name each other's ports; etcd is told its
/// own).
///
/// A port from a bind to port 0 would do only until then: it lies in the kernel's
/// ephemeral range, where any outgoing connection on the host may take it first. So
/// ports come from below that range, which neither `connect` nor a bind to port 0
/// uses, each handed out once per process and checked free on every local address.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    const LOW: u32 = 10_000;
    if ephemeral_low < LOW + 1_000 {
        // an unusual host whose ephemeral range starts low: take what the kernel gives
        return std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()
            .map(|a| a.port());
    }
    let span = ephemeral_low - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Start where another process on the host is unlikely to start.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        fastrand::u32(..u32::MAX / 2),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut last = None;
    for _ in 0..span.min(4096) {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        // The wildcard bind fails if any local address holds the port.
        match std::net::TcpListener::bind(("0.0.0.0", port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port below the ephemeral range")))
}

/// The three nodes: two in region eu, one in region us.
pub const NODES: [(&str, &str); 3] = [("eu-a", "eu"), ("eu-b", "eu"), ("us-a", "us")];

/// The nodes' zones: eu-a and eu-b in two zones of region eu.
pub const ZONES: [&str; 3] = ["eu-1a", "eu-1b", "us-1a"];

/// Writes the CA, the nodes' and a demo client's certificates, the demo proto and one
/// config per node into `dir`. `ports` are the nodes' internal ports. With `registry`
/// (an etcd client URL) the nodes list no `[[peer]]`s: they find each other through etcd.
pub fn write(
    dir: &Path,
    demos: &Demos,
    ports: [u16; 3],
    registry: Option<&str>,
) -> Result<Layout, PkiError> {
    let w = |p: PathBuf, text: &str| {
        std::fs::write(&p, text).map_err(|e| PkiError::Write(p.clone(), e))
    };
    let ca = Authority::new("fedport sandbox CA")?;
    let ca_path = ca.write_ca(dir, "federation-ca")?;
    let client = ca
        .issue(&LeafSpec {
            common_name: "demo-client".into(),
            spiffe: Some(format!("spiffe://{DOMAIN}/client/demo")),
            ..Default::default()
        })?
        .write(dir, "client")?;
    // a second organisation: its own CA and trust domain, admitted to the inventory only
    let partner = Authority::new("fedport sandbox partner CA")?;
    let partner_ca = partner.write_ca(dir, "partner-ca")?;
    partner
        .issue(&LeafSpec {
            common_name: "partner-client".into(),
            spiffe: Some(format!("spiffe://{PARTNER}/client/demo")),
            ..Default::default()
        })?
        .write(dir, "partner-client")?;
    w(dir.join("demo.proto"), DEMO_PROTO)?;
    let peer = |i: usize, services: &str| {
        if registry.is_some() {
            return String::new();
        }
        let (name, region) = NODES[i];
        format!(
            "[[peer]]\nname     = \"{name}\"\nregion   = \"{region}\"\nzone     = \"{}\"\naddress  = \"127.0.0.1:{}\"\n\
             identity = \"spiffe://{DOMAIN}/node/{name}\"\nservices = [{services}]\n\n",
            ZONES[i], ports[i]
        )
    };
    // eu-b is a site that can only dial out: it opens the link to eu-a, and eu-a sends
    // eu-b's share of its traffic over that link (with a registry, members are ordinary)
    let reverse = |i: usize, dials: bool, services: &str| {
        if registry.is_none() {
            let (name, region) = NODES[i];
            let address = if dials {
                format!("address  = \"127.0.0.1:{}\"\n", ports[i])
            } else {
                "# no address: it dials this node\n".to_owned()
            };
            return format!(
                "[[peer]]\nname     = \"{name}\"\nregion   = \"{region}\"\nzone     = \"{}\"\n{address}\
                 identity = \"spiffe://{DOMAIN}/node/{name}\"\nreverse  = true\nservices = [{services}]\n\n",
                ZONES[i]
            );
        }
        peer(i, services)
    };
    let health = "health    = { interval = \"500ms\", path = \"/healthz\" }\n";
    let inventory = |addr: SocketAddr| {
        format!(
            "[[service]]\nname      = \"inventory\"\nprotocol  = \"http\"\nendpoints = [\"http://{addr}\"]\n\
             formats   = [\"application/json\"]\ntimeout   = \"5s\"\n{health}\n"
        )
    };
    let rules = format!(
        "# default deny: who may reach what\n[[allow]]\nfrom = \"spiffe://{DOMAIN}/client/*\"\nto   = \"*\"\n\n\
         [[allow]]\nfrom = \"spiffe://{DOMAIN}/node/*\"\nto   = \"*\"\n\n\
         # the partner organisation's callers: the inventory, nothing else\n\
         [[allow]]\nfrom = \"spiffe://{PARTNER}/client/*\"\nto   = \"inventory\"\n\n"
    );
    let bodies = [
        // eu-a: the entry node; echo and an inventory here, pricing only in us
        format!(
            r#"[[listener]]
name = "local"
role = "local"
bind = "127.0.0.1:0"

[[service]]
name      = "echo"
protocol  = "grpc"
endpoints = ["h2c://{echo}"]
schema    = {{ proto = ["demo.proto"] }}
timeout   = "5s"

{inv}[[service]]
name      = "pricing"
protocol  = "http"
formats   = ["application/json"]

# a TCP service (a key-value store speaking Redis's protocol) that lives on us-a: the
# node's own applications reach it on the local port "kv", carried there as an HTTP/2
# CONNECT stream on the peer connection
[[service]]
name      = "kv"
protocol  = "tcp"
endpoints = []

[[listener]]
name    = "kv"
role    = "local"
bind    = "127.0.0.1:0"
service = "kv"

# zones: the catalog has an instance in this node's zone (eu-1a) and one in eu-1b;
# four calls in five go to eu-1a
[[service]]
name      = "catalog"
protocol  = "http"
endpoints = [{{ url = "http://{cat_a}", zone = "eu-1a" }}, {{ url = "http://{cat_b}", zone = "eu-1b" }}]
locality_weights = {{ "eu-1a" = 80, "eu-1b" = 20 }}

{peers}{rules}[[allow]]
from = "local"
to   = "inventory"
methods = ["GET /v1/"]

[[allow]]
from = "local"
to   = "kv"
"#,
            echo = demos.echo,
            cat_a = demos.catalog[0],
            cat_b = demos.catalog[1],
            inv = inventory(demos.inventory[0]),
            peers = reverse(1, false, "\"inventory\"")
                + &peer(2, "\"inventory\", \"pricing\", \"kv\""),
        ),
        format!(
            "{}{}{}{rules}",
            inventory(demos.inventory[1]),
            reverse(0, true, ""),
            peer(2, "\"inventory\"")
        ),
        format!(
            "{}[[service]]\nname      = \"pricing\"\nprotocol  = \"http\"\nendpoints = [\"http://{}\"]\n\
             formats   = [\"application/json\"]\n{health}\n\
             [[service]]\nname      = \"kv\"\nprotocol  = \"tcp\"\nendpoints = [\"tcp://{}\"]\n\n{}{}{rules}",
            inventory(demos.inventory[2]),
            demos.pricing,
            demos.kv,
            peer(0, ""),
            peer(1, "")
        ),
    ];
    let mut nodes = Vec::new();
    for (i, ((name, region), body)) in NODES.iter().zip(bodies).enumerate() {
        let node = ca
            .issue(&LeafSpec {
                common_name: (*name).into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/node/{name}")),
                dns: vec!["localhost".into(), format!("*.{DOMAIN}")],
                ips: vec!["127.0.0.1".parse().expect("literal address")],
                valid: None,
                serial: None,
            })?
            .write(dir, name)?;
        let config = dir.join(format!("{name}.toml"));
        let body = match registry {
            Some(url) => format!(
                "{body}\n# membership: the nodes find each other here instead of [[peer]] lists\n\
                 [registry.etcd]\nendpoints = [\"{url}\"]\nttl = \"3s\"\n"
            ),
            None => body,
        };
        w(
            config.clone(),
            &format!(
                r#"# fedport sandbox: node {name} of three, region {region}. Generated; edit and run `fedport check`.
[node]
name = "{name}"
region = "{region}"
zone = "{zone}"
workers = 1
peer_ping_interval = "500ms"

[tls]
cert = "{cert}"
key  = "{key}"
ca   = "{ca}"

# a second organisation, with its own CA: it vouches for spiffe://{partner}/… only
[[trust_domain]]
name = "{partner}"
ca   = "{partner_ca}"

[admin]
bind = "127.0.0.1:0"

[[listener]]
name  = "internal"
bind  = "127.0.0.1:{port}"
allow = ["127.0.0.0/8"]

{body}"#,
                cert = node.cert.display(),
                key = node.key.display(),
                ca = ca_path.display(),
                partner = PARTNER,
                partner_ca = partner_ca.display(),
                port = ports[i],
                zone = ZONES[i],
            ),
        )?;
        nodes.push((name.to_string(), region.to_string(), config, ports[i]));
    }
    Ok(Layout {
        dir: dir.to_owned(),
        nodes,
        ca: ca_path,
        client_cert: client.cert,
        client_key: client.key,
        reverse: registry.is_none(),
    })
}

pub const DEMO_PROTO: &str = r#"syntax = "proto3";
package demo;

message Msg { string text = 1; }

// Echo answers with what it is sent; Fail answers NOT_FOUND.
service Echo {
  rpc Say(Msg) returns (Msg);
  rpc Chat(stream Msg) returns (stream Msg);
  rpc Fail(Msg) returns (Msg);
}
"#;

/// The copy-paste commands the sandbox prints.
pub fn instructions(
    l: &Layout,
    demos: &Demos,
    peer: SocketAddr,
    (local, kv): (SocketAddr, Option<SocketAddr>),
    admin: Option<SocketAddr>,
) -> String {
    let d = l.dir.display();
    let p = peer.port();
    let ctl = demos.control;
    let cert = format!("--cacert {d}/federation-ca.pem --cert {d}/client.pem --key {d}/client.key");
    let mut s = String::new();
    s.push_str("fedport sandbox is running: a federation of three nodes in two regions\n");
    for (name, region, config, port) in &l.nodes {
        s.push_str(&format!(
            "  {name:5} region {region}  peer port 127.0.0.1:{port}  config {}\n",
            config.display()
        ));
    }
    s.push_str(&format!(
        "  you talk to eu-a: peer port (mTLS) {peer}, local port {local}\n"
    ));
    if let Some(a) = admin {
        s.push_str(&format!("  eu-a admin        http://{a}\n"));
    }
    s.push_str(&format!(
        "  demo instances    http://{ctl}/  (inventory@eu-a, inventory@eu-b, inventory@us-a, pricing@us-a, echo@eu-a, kv@us-a)\n\nTry:\n"
    ));
    let inventory = format!(
        "curl {cert} --resolve inventory.{DOMAIN}:{p}:127.0.0.1 https://inventory.{DOMAIN}:{p}/v1/items"
    );
    s.push_str(&format!(
        "  # JSON over mutual TLS, routed by host name; the service sees your identity\n  {inventory}\n"
    ));
    s.push_str(&format!(
        "  # the same without a client certificate: the handshake is refused\n  curl --cacert {d}/federation-ca.pem https://localhost:{p}/v1/items -H 'fed-service: inventory'\n"
    ));
    s.push_str(&format!(
        "  # an unknown service: 404 with a JSON reason\n  curl {cert} https://localhost:{p}/ -H 'fed-service: nope'\n"
    ));
    s.push_str(&format!(
        "  # plain HTTP on the local port (loopback only)\n  curl http://127.0.0.1:{}/v1/items -H 'fed-service: inventory'\n",
        local.port()
    ));
    s.push_str(&format!(
        "  # a gRPC call (pip install grpcio): demo.Echo/Say echoes its message\n  python3 -c \"import grpc; r=lambda f: open(f,'rb').read(); ch=grpc.secure_channel('localhost:{p}', grpc.ssl_channel_credentials(r('{d}/federation-ca.pem'), r('{d}/client.key'), r('{d}/client.pem'))); print(ch.unary_unary('/demo.Echo/Say')(b'\\x0a\\x05hello'))\"\n"
    ));
    s.push_str(&format!(
        "  # pricing lives only in region us: eu-a forwards it there (served_by, fed_hops)\n  curl {cert} https://localhost:{p}/v1/prices -H 'fed-service: pricing'\n"
    ));
    s.push_str(&format!(
        "  # failover: stop the inventory on eu-a and served_by moves to eu-b (same region);\n  # stop eu-b's too and it crosses to us-a; start eu-a's again and it comes home\n  curl -X POST http://{ctl}/stop/inventory@eu-a\n  curl -X POST http://{ctl}/stop/inventory@eu-b\n  curl -X POST http://{ctl}/start/inventory@eu-a\n  curl -X POST http://{ctl}/start/inventory@eu-b\n"
    ));
    s.push_str(&format!(
        "  # watch it happen\n  watch -n 0.5 \"{inventory} -s\"\n"
    ));
    if let Some(a) = admin {
        s.push_str(&format!(
            "  # metrics: where requests went, peers' round-trip times\n  curl -s http://{a}/metrics | grep -E 'fedport_(forwarded|peer_rtt)'\n"
        ));
    }
    let partner = format!(
        "--cacert {d}/federation-ca.pem --cert {d}/partner-client.pem --key {d}/partner-client.key"
    );
    s.push_str(&format!(
        "  # a second organisation ({PARTNER}, its own CA) calls in: the inventory is open to it
  curl {partner} https://localhost:{p}/v1/items -H 'fed-service: inventory'
"
    ));
    s.push_str(&format!(
        "  # and nothing else: 403 with a JSON reason
  curl {partner} https://localhost:{p}/v1/prices -H 'fed-service: pricing'
"
    ));
    s.push_str(&format!(
        "  # zones: of 200 catalog calls, about 160 go to the instance in eu-a's own zone (locality_weights 80/20)\n  for i in $(seq 200); do curl {cert} -s https://localhost:{p}/v1/items -H 'fed-service: catalog'; echo; done | grep -o 'catalog@eu-1[ab]' | sort | uniq -c\n"
    ));
    if let Some(kv) = kv {
        s.push_str(&format!(
            "  # a TCP service: the key-value store lives on us-a only; eu-a's local port carries\n  # the connection there (HTTP/2 CONNECT on the peer link). redis-cli, or: printf 'PING\\r\\n' | nc 127.0.0.1 {p}\n  redis-cli -p {p} SET greeting hello\n  redis-cli -p {p} INFO\n",
            p = kv.port()
        ));
    }
    if let Some(a) = admin {
        if l.reverse {
            s.push_str(&format!(
                "  # eu-b can only dial out: it opened the link, and eu-a reaches it over that link\n  curl -s 'http://{a}/readyz?verbose' | python3 -m json.tool | grep -B3 -A3 accepts\n"
            ));
        }
    }
    s.push_str("\nCtrl-C stops the sandbox.\n");
    s
}

/// A one-member etcd for `fedport sandbox --registry etcd`, stopped when dropped.
pub struct LocalEtcd {
    child: std::process::Child,
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd is not installed (Debian: apt-get install etcd-server): {0}")]
    Missing(std::io::Error),
    #[error("cannot pick a port for etcd: {0}")]
    Port(std::io::Error),
    #[error("etcd did not become healthy within 10 s")]
    NotHealthy,
}

impl LocalEtcd {
    pub fn start(dir: &Path) -> Result<Self, EtcdError> {
        let port = || free_port().map_err(EtcdError::Port);
        let (client, peer) = (port()?, port()?);
        let url = format!("http://127.0.0.1:{client}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "sandbox"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("sandbox=http://127.0.0.1:{peer}"),
            ])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(EtcdError::Missing)?;
        let me = Self { child, url };
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(10) {
            if me.healthy() {
                return Ok(me);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(EtcdError::NotHealthy)
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://");
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut text = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_ok()
            && s.read_to_string(&mut text).is_ok()
            && text.contains("\"health\":\"true\"")
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // hold every port a bind to 0 gives meanwhile, as other tests' connections would
        let ephemeral: Vec<_> = (0..64)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let mut seen = std::collections::HashSet::new();
        for p in &ports {
            assert!(*p < low, "{p} is in the ephemeral range from {low}");
            assert!(seen.insert(*p), "{p} handed out twice");
            for l in &ephemeral {
                assert_ne!(l.local_addr().unwrap().port(), *p);
            }
        }
        std::net::TcpListener::bind(("127.0.0.1", ports[0])).unwrap();
    }
}
