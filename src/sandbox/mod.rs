//! `fedport sandbox`: a federation on loopback with nothing to prepare — a generated
//! CA and certificates, demo services, and a node routing to them.

pub mod demo;

use crate::identity::pki::{Authority, LeafSpec, PkiError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DOMAIN: &str = "fed.sandbox";

/// The files and addresses a sandbox was set up with.
pub struct Layout {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes the CA, the node's and a demo client's certificates, the demo proto and the
/// node config into `dir`, pointing the services at the given demo addresses.
pub fn write(dir: &Path, grpc_echo: SocketAddr, json: SocketAddr) -> Result<Layout, PkiError> {
    let w = |p: PathBuf, text: &str| {
        std::fs::write(&p, text).map_err(|e| PkiError::Write(p.clone(), e))
    };
    let ca = Authority::new("fedport sandbox CA")?;
    let ca_path = ca.write_ca(dir, "federation-ca")?;
    let node = ca
        .issue(&LeafSpec {
            common_name: "sandbox-a".into(),
            spiffe: Some(format!("spiffe://{DOMAIN}/node/sandbox-a")),
            dns: vec!["localhost".into(), format!("*.{DOMAIN}")],
            ips: vec!["127.0.0.1".parse().expect("literal address")],
            valid: None,
            serial: None,
        })?
        .write(dir, "sandbox-a")?;
    let client = ca
        .issue(&LeafSpec {
            common_name: "demo-client".into(),
            spiffe: Some(format!("spiffe://{DOMAIN}/client/demo")),
            ..Default::default()
        })?
        .write(dir, "client")?;
    w(dir.join("demo.proto"), DEMO_PROTO)?;
    let config = dir.join("sandbox-a.toml");
    w(
        config.clone(),
        &format!(
            r#"# fedport sandbox: one node, region sandbox-1. Generated; edit and run `fedport check`.
[node]
name = "sandbox-a"
region = "sandbox-1"

[tls]
cert = "{cert}"
key  = "{key}"
ca   = "{ca}"

[admin]
bind = "127.0.0.1:0"

[[listener]]
name  = "internal"
bind  = "127.0.0.1:0"
allow = ["127.0.0.0/8"]

[[listener]]
name = "local"
role = "local"
bind = "127.0.0.1:0"

[[service]]
name      = "echo"
protocol  = "grpc"
endpoints = ["h2c://{grpc_echo}"]
schema    = {{ proto = ["demo.proto"] }}
timeout   = "5s"

[[service]]
name      = "inventory"
protocol  = "http"
endpoints = ["http://{json}"]
formats   = ["application/json"]
timeout   = "5s"

# default deny: who may reach what
[[allow]]
from = "spiffe://{DOMAIN}/client/*"
to   = "*"

[[allow]]
from = "local"
to   = "inventory"
methods = ["GET /v1/"]
"#,
            cert = node.cert.display(),
            key = node.key.display(),
            ca = ca_path.display(),
        ),
    )?;
    Ok(Layout {
        dir: dir.to_owned(),
        config,
        ca: ca_path,
        client_cert: client.cert,
        client_key: client.key,
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
    peer: SocketAddr,
    local: SocketAddr,
    admin: Option<SocketAddr>,
) -> String {
    let d = l.dir.display();
    let p = peer.port();
    let cert = format!("--cacert {d}/federation-ca.pem --cert {d}/client.pem --key {d}/client.key");
    let mut s = String::new();
    s.push_str("fedport sandbox is running: node sandbox-a, region sandbox-1\n");
    s.push_str(&format!(
        "  peer port (mTLS)  {peer}\n  local port        {local}\n"
    ));
    if let Some(a) = admin {
        s.push_str(&format!("  admin             http://{a}\n"));
    }
    s.push_str(&format!("  files             {d}\n\nTry:\n"));
    s.push_str(&format!(
        "  # JSON over mutual TLS, routed by host name; the service sees your identity\n  curl {cert} --resolve inventory.{DOMAIN}:{p}:127.0.0.1 https://inventory.{DOMAIN}:{p}/v1/items\n"
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
    if let Some(a) = admin {
        s.push_str(&format!(
            "  # metrics\n  curl -s http://{a}/metrics | grep fedport_requests\n"
        ));
    }
    s.push_str("\nCtrl-C stops the sandbox.\n");
    s
}
