//! fedport: the internal port of a federation. A connection is admitted by address,
//! authenticated by mutual TLS 1.3, routed to a service and forwarded over pooled
//! HTTP/2 or HTTP/1.1, with every refusal answered in the caller's protocol.
//!
//! Module map, in the order a request meets them:
//! - [`listen`]: sockets, accept, allowlist, TLS, serving connections
//! - [`identity`]: certificates → identity; the sandbox CA
//! - [`caller`]: the caller's side of one request: its body, its HTTP/2 stream's state
//! - [`proxy`]: the request path, one stage a file (hygiene → … → outcome)
//! - [`request`], [`headers`]: the one reading of a request's head; the headers only
//!   fedport may set
//! - [`route`]: request → service
//! - [`policy`], [`grammar`]: identity × service × method, default deny; the patterns
//!   rules are written in
//! - [`limits`], [`memory`]: rate and concurrency limits; memory held for callers
//! - [`schema`]: accepted formats and message sizes, enforced as bodies stream; schemas
//!   compiled at load
//! - [`upstream`]: pooled connections, load balancing, what a failure allows (`Retry`)
//! - [`federation`]: peers, health, failover order, retry budget; the control thread
//! - [`exchange`]: trust bundles served to and fetched from other trust domains
//! - [`tcp`]: TCP services, authorized and spliced to their endpoints
//! - [`reason`], [`errors`]: the one vocabulary of refusals; refusal → HTTP status /
//!   gRPC code
//! - [`config`], [`server`], [`runtime`], [`admin`], [`telemetry`], [`registry`], [`cli`],
//!   [`sandbox`], [`top`], [`firewall`], [`manifest`] (describe, plan), [`bench`] (load
//!   generator)
//!
//! Modules depend one way: `tests/it/structure.rs` fails on any cycle among them.

pub mod admin;
pub mod bench;
pub mod caller;
pub mod cli;
pub mod config;
pub mod errors;
pub mod exchange;
pub mod federation;
pub mod firewall;
pub mod grammar;
pub mod handover;
pub mod headers;
pub mod identity;
pub mod limits;
pub mod listen;
pub mod manifest;
pub mod memory;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod registry;
pub mod request;
pub mod route;
pub mod runtime;
pub mod sandbox;
pub mod schema;
pub mod server;
pub mod tcp;
pub mod telemetry;
pub mod top;
pub mod upstream;
