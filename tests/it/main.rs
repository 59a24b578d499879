//! fedport's integration tests, one binary: each module starts real processes on
//! loopback (or in network namespaces it makes) and talks to them with real clients.
//! `cargo test --test it MODULE::` runs one module.

mod support;

mod abuse;
mod accesslog;
mod admission;
mod audit;
mod certs;
mod check;
mod drain;
mod exchange;
mod federation;
mod firewall;
mod formats;
mod grpc;
mod hostile;
mod impairment;
mod inprocess;
mod monitoring;
mod mtls_http;
mod overload;
mod package;
mod plan;
mod properties;
mod registry;
mod reload;
mod reverse;
mod rotation;
mod sandbox;
mod spelling;
mod spikes;
mod streaming;
mod structure;
mod systemd;
mod tcp;
mod top;
mod trust;
mod upgrade;
mod zones;
