//! fedport: the internal port of a federation. A connection is admitted by address,
//! authenticated by mutual TLS 1.3, routed to a service and forwarded over pooled
//! HTTP/2 or HTTP/1.1, with every refusal answered in the caller's protocol.
//!
//! Module map, in the order a request meets them:
//! - [`listen`]: sockets, accept, allowlist, TLS, serving connections
//! - [`identity`]: certificates → identity; the sandbox CA
//! - [`request`]: the one reading of a request's method, path, content type and authority
//! - [`route`]: request → service
//! - [`policy`]: identity × service × method, default deny
//! - [`limits`]: rate and concurrency limits per service and per identity
//! - [`schema`]: accepted formats and message sizes, enforced as bodies stream
//! - [`proxy`]: the request path, top to bottom
//! - [`upstream`]: pooled connections and load balancing
//! - [`federation`]: peers, health, failover order, retry budget; the control thread
//! - [`reason`]: the one vocabulary of refusals; gRPC status codes
//! - [`errors`]: refusal → HTTP status / gRPC code
//! - [`config`], [`server`], [`admin`], [`telemetry`], [`cli`], [`sandbox`], [`top`],
//!   [`firewall`], [`manifest`] (describe, plan), [`bench`] (load generator)

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod errors;
pub mod federation;
pub mod firewall;
pub mod identity;
pub mod limits;
pub mod listen;
pub mod manifest;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod registry;
pub mod request;
pub mod route;
pub mod sandbox;
pub mod schema;
pub mod server;
pub mod telemetry;
pub mod top;
pub mod upstream;
