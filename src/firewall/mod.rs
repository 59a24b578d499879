//! `fedport firewall`: the host firewall that follows the config. Each federation port
//! is opened to the peers' addresses and the listener's allowlisted ranges (to the
//! trusted balancers when it speaks PROXY protocol), each local port to loopback, the
//! admin port to `[admin] allow` and loopback; everything else to those ports is
//! dropped. The rules live in their own table (nftables `inet fedport`, iptables chain
//! `FEDPORT-INPUT`) with an accepting policy: nothing else on the host is touched.
//! A listener bound to one address gets rules for that destination address only, so
//! two listeners on one port at different addresses keep their own sources.

use crate::config::{Config, Role};
use ipnet::IpNet;
use std::fmt::Write;
use std::net::IpAddr;

/// Why no ruleset can be written for a config.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("{0} binds port 0 (chosen at start): a firewall needs its port fixed in the config")]
    PortZero(String),
}

/// One port and who may reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct Opening {
    pub what: String,
    pub port: u16,
    /// The address it is bound to, unless that is the wildcard.
    pub to: Option<IpAddr>,
    /// Sources admitted (loopback always is).
    pub from: Vec<IpNet>,
    /// Peer addresses that are names, not IPs: they cannot be written as rules.
    pub unresolved: Vec<String>,
}

/// Every port of the config and its admitted sources.
pub fn openings(cfg: &Config) -> Vec<Opening> {
    // a reverse link is opened by this node (a peer with an address) or comes from an
    // address this node is not told (a peer without one): neither opens a port to it
    let inbound = || cfg.peers.iter().filter(|p| !p.reverse);
    let peers: Vec<IpNet> = inbound()
        .filter_map(|p| host_ip(&p.address))
        .map(IpNet::from)
        .collect();
    let named: Vec<String> = inbound()
        .filter(|p| host_ip(&p.address).is_none())
        .map(|p| p.address.clone())
        .collect();
    let mut out = Vec::new();
    for l in &cfg.listeners {
        let (from, unresolved) = match (l.role, &l.proxy_trusted) {
            (Role::Local, _) => (Vec::new(), Vec::new()),
            (Role::Peer, Some(balancers)) => (balancers.clone(), Vec::new()),
            (Role::Peer, None) => {
                let mut f = l.allow.clone();
                f.extend(peers.iter().copied());
                (f, named.clone())
            }
        };
        out.push(Opening {
            what: format!(
                "listener {} ({})",
                l.name,
                if l.role == Role::Peer {
                    "peer"
                } else {
                    "local"
                }
            ),
            port: l.bind.port(),
            to: Some(l.bind.ip()).filter(|ip| !ip.is_unspecified()),
            from: dedup(from),
            unresolved,
        });
    }
    if let Some(a) = cfg.admin {
        out.push(Opening {
            what: "admin".into(),
            port: a.port(),
            to: Some(a.ip()).filter(|ip| !ip.is_unspecified()),
            from: dedup(cfg.admin_allow.clone()),
            unresolved: Vec::new(),
        });
    }
    out
}

fn dedup(mut v: Vec<IpNet>) -> Vec<IpNet> {
    v.sort();
    v.dedup();
    IpNet::aggregate(&v)
}

fn host_ip(address: &str) -> Option<IpAddr> {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The openings, refused if a port is left to the kernel.
fn fixed(cfg: &Config) -> Result<Vec<Opening>, FirewallError> {
    let o = openings(cfg);
    match o.iter().find(|op| op.port == 0) {
        Some(op) => Err(FirewallError::PortZero(op.what.clone())),
        None => Ok(o),
    }
}

/// The nftables match on an opening's destination: its port, and its address when it
/// is bound to one.
fn nft_dest(op: &Opening) -> String {
    match op.to {
        Some(IpAddr::V4(a)) => format!("ip daddr {a} tcp dport {}", op.port),
        Some(IpAddr::V6(a)) => format!("ip6 daddr {a} tcp dport {}", op.port),
        None => format!("tcp dport {}", op.port),
    }
}

/// The nftables ruleset (`nft -f`): re-applying it replaces the previous one.
pub fn nftables(cfg: &Config) -> Result<String, FirewallError> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# fedport firewall for node {} (config {}, hash {})\n# apply: nft -f FILE  (replaces table inet fedport; nothing else is touched)",
        cfg.node.name,
        cfg.path.display(),
        cfg.hash
    );
    s.push_str("table inet fedport\ndelete table inet fedport\ntable inet fedport {\n");
    let o = fixed(cfg)?;
    for (i, op) in o.iter().enumerate() {
        for (fam, ty, nets) in [
            (
                "v4",
                "ipv4_addr",
                op.from
                    .iter()
                    .filter(|n| matches!(n, IpNet::V4(_)))
                    .collect::<Vec<_>>(),
            ),
            (
                "v6",
                "ipv6_addr",
                op.from
                    .iter()
                    .filter(|n| matches!(n, IpNet::V6(_)))
                    .collect::<Vec<_>>(),
            ),
        ] {
            if nets.is_empty() {
                continue;
            }
            let elems: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(
                s,
                "  set allow{i}_{fam} {{\n    type {ty}; flags interval;\n    elements = {{ {} }}\n  }}",
                elems.join(", ")
            );
        }
    }
    s.push_str(
        "  chain input {\n    type filter hook input priority filter - 10; policy accept;\n",
    );
    for (i, op) in o.iter().enumerate() {
        let _ = writeln!(s, "    # {}: port {}", op.what, op.port);
        for u in &op.unresolved {
            let _ = writeln!(
                s,
                "    # peer {u} is a name: resolve it and add its address"
            );
        }
        let dest = nft_dest(op);
        let _ = writeln!(s, "    iif \"lo\" {dest} accept");
        if op.from.iter().any(|n| matches!(n, IpNet::V4(_))) {
            let _ = writeln!(s, "    {dest} ip saddr @allow{i}_v4 accept");
        }
        if op.from.iter().any(|n| matches!(n, IpNet::V6(_))) {
            let _ = writeln!(s, "    {dest} ip6 saddr @allow{i}_v6 accept");
        }
        let _ = writeln!(s, "    {dest} drop");
    }
    s.push_str("  }\n}\n");
    Ok(s)
}

/// The same as iptables-restore input (IPv4; `ip6tables` gets the IPv6 lines with
/// `--family 6`). Apply with `iptables-restore --noflush FILE`, then hook the chain
/// once: `iptables -I INPUT -j FEDPORT-INPUT`.
pub fn iptables(cfg: &Config, v6: bool) -> Result<String, FirewallError> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# fedport firewall for node {} (hash {}): iptables-restore --noflush FILE; then once: {} -I INPUT -j FEDPORT-INPUT",
        cfg.node.name,
        cfg.hash,
        if v6 { "ip6tables" } else { "iptables" }
    );
    s.push_str("*filter\n:FEDPORT-INPUT - [0:0]\n-F FEDPORT-INPUT\n");
    for op in fixed(cfg)? {
        // bound to an address of the other family: not reachable through this table
        if op.to.is_some_and(|a| a.is_ipv6() != v6) {
            continue;
        }
        let dest = match op.to {
            Some(a) => format!("-d {a} -p tcp --dport {}", op.port),
            None => format!("-p tcp --dport {}", op.port),
        };
        let _ = writeln!(s, "-A FEDPORT-INPUT -i lo {dest} -j RETURN");
        for n in op.from.iter().filter(|n| matches!(n, IpNet::V6(_)) == v6) {
            let _ = writeln!(s, "-A FEDPORT-INPUT {dest} -s {n} -j RETURN");
        }
        let _ = writeln!(s, "-A FEDPORT-INPUT {dest} -j DROP");
    }
    s.push_str("COMMIT\n");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
[node]
name = "a"
region = "r"
[admin]
bind = "0.0.0.0:9901"
allow = ["10.9.0.0/24"]
[[listener]]
name = "internal"
bind = "0.0.0.0:7443"
allow = ["192.168.0.0/16", "192.168.1.0/24"]
[[listener]]
name = "behind-lb"
bind = "0.0.0.0:7444"
proxy_protocol = { trusted = ["10.0.9.0/24"] }
[[listener]]
name = "local"
role = "local"
bind = "127.0.0.1:7400"
[[service]]
name = "s"
protocol = "http"
endpoints = ["http://127.0.0.1:1"]
[[peer]]
name = "b"
region = "r"
address = "10.1.0.7:7443"
identity = "spiffe://t/node/b"
[[peer]]
name = "c"
region = "r"
address = "[2001:db8::7]:7443"
identity = "spiffe://t/node/c"
[[peer]]
name = "d"
region = "r"
address = "d.example:7443"
identity = "spiffe://t/node/d"
"#;

    fn cfg() -> Config {
        use crate::identity::pki::{Authority, LeafSpec};
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("t").unwrap();
        let ca_path = ca.write_ca(dir.path(), "ca").unwrap();
        let node = ca
            .issue(&LeafSpec {
                common_name: "a".into(),
                spiffe: Some("spiffe://t/node/a".into()),
                ..Default::default()
            })
            .unwrap()
            .write(dir.path(), "a")
            .unwrap();
        let text = format!(
            "{CFG}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            node.cert.display(),
            node.key.display(),
            ca_path.display()
        );
        crate::config::compile(&dir.path().join("t.toml"), &text)
            .unwrap_or_else(|r| panic!("{r:?}"))
            .0
    }

    #[test]
    fn each_port_opens_to_its_sources_only() {
        let o = openings(&cfg());
        let internal = &o[0];
        let from: Vec<String> = internal.from.iter().map(|n| n.to_string()).collect();
        assert_eq!(from, ["10.1.0.7/32", "192.168.0.0/16", "2001:db8::7/128"]);
        assert_eq!(internal.unresolved, ["d.example:7443"]);
        assert_eq!(
            o[1].from[0].to_string(),
            "10.0.9.0/24",
            "PROXY listeners: the balancers"
        );
        assert!(o[2].from.is_empty(), "local: loopback only");
        assert_eq!(o[3].what, "admin");
        assert_eq!(o[3].from[0].to_string(), "10.9.0.0/24");
        let nft = nftables(&cfg()).unwrap();
        assert!(nft.contains("\n    tcp dport 7443 ip saddr @allow0_v4 accept"));
        assert!(nft.contains("\n    tcp dport 7443 ip6 saddr @allow0_v6 accept"));
        assert!(nft.contains("ip daddr 127.0.0.1 tcp dport 7400 drop"));
        assert!(nft.contains("policy accept"));
        let ipt = iptables(&cfg(), false).unwrap();
        assert!(ipt.contains("-A FEDPORT-INPUT -p tcp --dport 7443 -s 10.1.0.7/32 -j RETURN"));
        assert!(ipt.contains("-A FEDPORT-INPUT -d 127.0.0.1 -p tcp --dport 7400 -j DROP"));
        assert!(!ipt.contains("2001:db8"));
        let ip6 = iptables(&cfg(), true).unwrap();
        assert!(ip6.contains("-s 2001:db8::7/128"));
        assert!(
            !ip6.contains("7400"),
            "a port bound to an IPv4 address: {ip6}"
        );
    }

    #[test]
    fn listeners_on_one_port_at_two_addresses_keep_their_own_sources() {
        let mut c = cfg();
        c.listeners[0].bind = "10.0.0.5:7443".parse().unwrap();
        c.listeners[2].bind = "127.0.0.1:7443".parse().unwrap();
        let nft = nftables(&c).unwrap();
        // the loopback listener's drop does not cover the peer listener's address
        assert!(
            nft.contains("ip daddr 127.0.0.1 tcp dport 7443 drop"),
            "{nft}"
        );
        assert!(!nft.contains("\n    tcp dport 7443 drop"), "{nft}");
        assert!(nft.contains("ip daddr 10.0.0.5 tcp dport 7443 ip saddr @allow0_v4 accept"));
        c.listeners[1].bind = "0.0.0.0:0".parse().unwrap();
        assert!(matches!(nftables(&c), Err(FirewallError::PortZero(w)) if w.contains("behind-lb")));
        assert!(iptables(&c, false).is_err());
    }
}
