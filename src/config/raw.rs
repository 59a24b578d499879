//! The TOML file as written: serde types that deny unknown keys and keep each value's
//! position, so that every later check can point at `file:line:col`.

use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub node: S<RawNode>,
    pub tls: Option<S<RawTls>>,
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub listener: Vec<S<RawListener>>,
    #[serde(default)]
    pub service: Vec<S<RawService>>,
    #[serde(default)]
    pub peer: Vec<S<RawPeer>>,
    #[serde(default)]
    pub allow: Vec<S<RawAllow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: S<String>,
    pub region: S<String>,
    pub zone: Option<S<String>>,
    /// Worker threads, each a single-threaded runtime with its own listeners; default: one per core.
    pub workers: Option<S<i64>>,
    /// How long in-flight requests may take to finish after SIGTERM; default 30s.
    pub drain_timeout: Option<S<String>>,
    /// Upstream connections are replaced after this many requests; default 100000.
    pub upstream_max_requests: Option<S<i64>>,
    /// One log line per request (target `fedport::access`); default false.
    pub access_log: Option<bool>,
    /// Upstream HTTP/2 connections per worker per endpoint; default 2.
    pub upstream_connections: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: S<String>,
    pub key: S<String>,
    pub ca: S<String>,
    pub crl: Option<S<String>>,
    /// Handshake must finish within this; default 10s.
    pub handshake_timeout: Option<S<String>>,
    /// `"1.3"` (default) or `"1.2"` (TLS 1.2 with AEAD suites as well).
    pub min_version: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub bind: S<String>,
    pub role: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
    pub proxy_protocol: Option<S<RawProxyProtocol>>,
    pub service: Option<S<String>>,
    /// Open connections allowed on this listener (all workers together); default 10000.
    pub max_connections: Option<S<i64>>,
    /// A connection with no request in flight for this long is closed; default 5m.
    pub idle_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    pub trusted: Vec<S<String>>,
    /// How long the header may take to arrive; default 3s.
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: S<String>,
    pub protocol: S<String>,
    #[serde(default)]
    pub endpoints: Vec<S<String>>,
    pub grpc_services: Option<Vec<S<String>>>,
    pub formats: Option<Vec<S<String>>>,
    pub schema: Option<S<RawSchema>>,
    pub max_message_bytes: Option<S<SizeValue>>,
    pub timeout: Option<S<String>>,
    /// `grpc-encoding`s accepted besides identity; default `["gzip"]`.
    pub encodings: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchema {
    pub proto: Option<Vec<S<String>>>,
    /// Directories searched for `import`s; default: each proto file's own directory.
    pub include: Option<Vec<S<String>>>,
    pub descriptor_set: Option<S<String>>,
    pub strict: Option<bool>,
    pub validate_responses: Option<bool>,
    pub json: Option<BTreeMap<String, S<String>>>,
}

/// A size is either a number of bytes or a string with a unit (`"1MiB"`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: S<String>,
    pub region: S<String>,
    pub zone: Option<S<String>>,
    pub address: S<String>,
    pub identity: S<String>,
    #[serde(default)]
    pub services: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAllow {
    pub from: S<String>,
    pub to: S<String>,
    pub methods: Option<Vec<S<String>>>,
}
