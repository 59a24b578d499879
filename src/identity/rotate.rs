//! Certificate rotation: the listeners' TLS configuration lives behind an `ArcSwap`;
//! on SIGHUP or when a file's modification time or size changes, the certificate, key,
//! CA bundle and CRL (and each trust domain's) are loaded again and swapped in whole. New handshakes use the new
//! material, established connections keep theirs, and a bad file is refused with a log
//! line while the old material keeps serving.

use super::domains::DomainSpec;
use super::{server_config, IdentityError, TlsFiles};
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What identifies one version of a file: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

pub struct Rotating {
    current: ArcSwap<ServerConfig>,
    files: TlsFiles,
    crl: Option<PathBuf>,
    domains: Vec<DomainSpec>,
    alpn: Vec<Vec<u8>>,
    allow_tls12: bool,
    stamps: Mutex<Vec<Stamp>>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Unchanged,
    Swapped,
}

impl Rotating {
    pub fn new(
        files: TlsFiles,
        crl: Option<PathBuf>,
        domains: Vec<DomainSpec>,
        alpn: &[&[u8]],
        allow_tls12: bool,
    ) -> Result<Self, IdentityError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let refs: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
        let cfg = server_config(&files, &refs, allow_tls12, crl.as_deref(), &domains)?;
        let me = Self {
            current: ArcSwap::new(cfg),
            files,
            crl,
            domains,
            alpn,
            allow_tls12,
            stamps: Mutex::new(Vec::new()),
        };
        let stamps = me.stamps();
        if let Ok(mut s) = me.stamps.lock() {
            *s = stamps;
        }
        Ok(me)
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    fn paths(&self) -> Vec<&Path> {
        let f = &self.files;
        // every trust domain's bundle and CRL too: rotating one (or a fetch from its
        // bundle endpoint writing it) reloads it
        [&f.cert, &f.key, &f.ca]
            .into_iter()
            .chain(self.crl.as_ref())
            .map(PathBuf::as_path)
            .chain(
                self.domains
                    .iter()
                    .flat_map(|d| std::iter::once(d.authorities.path()).chain(d.crl.as_deref())),
            )
            .collect()
    }

    fn stamps(&self) -> Vec<Stamp> {
        self.paths()
            .into_iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    /// Reloads when any file changed since the last attempt (or always, when `force`).
    pub fn reload(&self, force: bool) -> Result<Reloaded, IdentityError> {
        let now = self.stamps();
        {
            let Ok(mut last) = self.stamps.lock() else {
                return Ok(Reloaded::Unchanged);
            };
            if !force && *last == now {
                return Ok(Reloaded::Unchanged);
            }
            // a broken file is reported once, not on every poll
            *last = now;
        }
        let refs: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        let cfg = server_config(
            &self.files,
            &refs,
            self.allow_tls12,
            self.crl.as_deref(),
            &self.domains,
        )?;
        self.current.store(cfg);
        Ok(Reloaded::Swapped)
    }
}
