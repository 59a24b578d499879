//! File descriptors: the soft `RLIMIT_NOFILE` raised to the hard limit at start (a
//! default soft limit of 1024 would refuse connections long before any other limit
//! does), and how many a configuration may hold at once, to warn when that is more
//! than the process may open.

use crate::config::{Config, Scheme};

/// The process's file-descriptor limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Nofile {
    pub soft: u64,
    pub hard: u64,
}

/// The limits now.
pub fn current() -> std::io::Result<Nofile> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Nofile {
        soft: l.rlim_cur,
        hard: l.rlim_max,
    })
}

/// Raises the soft limit to the hard one; the limits after.
pub fn raise() -> std::io::Result<Nofile> {
    let now = current()?;
    if now.soft < now.hard {
        let l = libc::rlimit {
            rlim_cur: now.hard as libc::rlim_t,
            rlim_max: now.hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct it is given
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    current()
}

/// The most file descriptors `cfg` may hold at once: every listener full, every
/// HTTP/1.1 endpoint at its cap, the HTTP/2 connections each worker keeps to each
/// endpoint and peer (and the probes), the listening sockets, and a few for the rest
/// (admin, registry, epoll, logs).
pub fn needed(cfg: &Config) -> u64 {
    let workers = cfg.node.workers as u64;
    let h2 = workers * cfg.node.upstream_connections as u64;
    let listeners: u64 = cfg.listeners.iter().map(|l| l.max_connections as u64).sum();
    let endpoints: u64 = cfg
        .services
        .iter()
        .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
        .map(|(s, e)| {
            // each worker may open at least one
            let h1 = (s.max_connections as u64).max(workers);
            match e.scheme {
                Scheme::Http1 => h1 + 1,
                // an https endpoint may speak HTTP/1.1 too
                Scheme::Https => h2.max(h1) + 1,
                Scheme::H2c => h2 + 1,
                // one for each connection the TCP listeners may splice (counted below)
                Scheme::Tcp => 0,
            }
        })
        .sum();
    let peers = cfg.peers.len() as u64 * (h2 + 1);
    // a TCP listener's connection holds one socket to the service as well
    let spliced: u64 = cfg
        .listeners
        .iter()
        .filter(|l| {
            l.service.as_ref().is_some_and(|n| {
                cfg.services
                    .iter()
                    .any(|s| &s.name == n && s.protocol == crate::config::Protocol::Tcp)
            })
        })
        .map(|l| l.max_connections as u64)
        .sum();
    listeners + spliced + endpoints + peers + cfg.listeners.len() as u64 * workers + 64
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let after = super::raise().unwrap();
        assert_eq!(after.soft, after.hard);
    }
}
