//! Memory held for callers, bounded per connection and per node: a gRPC message held
//! whole until it validates (and while it is inflated), a JSON or small body buffered,
//! what the codec may hold of a request body still coming (its stream window, or what
//! its length still owes) and of an answer still streaming (the service's stream
//! window), the header list of a stream in progress (against its connection only).
//! Each is charged as it grows, against its connection's budget and the node's; a
//! charge past either is refused, and the caller is told so (503 / RESOURCE_EXHAUSTED,
//! `reason="memory"`) — fedport never waits on a buffer it cannot finish. No one
//! identity may hold more than a quarter of the node's budget, all its connections
//! together.

use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which budget a charge would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Over {
    #[error("the connection's memory budget ({0} bytes)")]
    Connection(u64),
    #[error("the caller's share of the node's memory budget ({0} bytes)")]
    Identity(u64),
    #[error("the node's memory budget ({0} bytes)")]
    Node(u64),
}

/// The share of the node's budget one identity may hold, all its connections together:
/// one caller that fills its connections' budgets on many connections leaves the rest
/// of the node's budget to the others.
const IDENTITY_SHARE: u64 = 4;

/// The node's budget: its count is the `fedport_memory_held_bytes` gauge, shared by
/// every worker and every configuration generation; and what each identity holds.
#[derive(Debug)]
pub struct Node {
    held: Gauge,
    max: u64,
    identities: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<AtomicU64>>>,
}

impl Node {
    pub fn new(held: Gauge, max: u64) -> Arc<Self> {
        Arc::new(Self {
            held,
            max,
            identities: Default::default(),
        })
    }

    /// The node's budget.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// What `identity` holds, shared by its connections (looked up once a connection).
    fn identity(&self, identity: &str) -> Arc<AtomicU64> {
        let Ok(mut m) = self.identities.lock() else {
            return Arc::default();
        };
        if let Some(c) = m.get(identity).and_then(std::sync::Weak::upgrade) {
            return c;
        }
        if m.len() >= 4096 {
            m.retain(|_, w| w.strong_count() > 0);
        }
        let c = Arc::new(AtomicU64::new(0));
        m.insert(identity.to_owned(), Arc::downgrade(&c));
        c
    }
}

/// One connection's budget.
#[derive(Debug)]
pub struct Connection {
    held: AtomicU64,
    max: u64,
    /// What the caller's identity holds on all its connections (`None` for a peer
    /// node, whose connections carry many callers, each bounded at its own node).
    identity: Option<Arc<AtomicU64>>,
    node: Arc<Node>,
}

impl Connection {
    /// `identity`: the caller's, whose share of the node's budget this connection
    /// draws on; `None` for a peer node.
    pub fn new(node: Arc<Node>, max: u64, identity: Option<&str>) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            max,
            identity: identity.map(|i| node.identity(i)),
            node,
        })
    }

    fn take(&self, n: u64, node: bool) -> Result<(), Over> {
        if self.held.fetch_add(n, Ordering::Relaxed) + n > self.max {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return Err(Over::Connection(self.max));
        }
        if node {
            let share = self.node.max / IDENTITY_SHARE;
            if let Some(id) = &self.identity {
                if id.fetch_add(n, Ordering::Relaxed) + n > share {
                    id.fetch_sub(n, Ordering::Relaxed);
                    self.held.fetch_sub(n, Ordering::Relaxed);
                    return Err(Over::Identity(share));
                }
            }
            let before = self.node.held.inc_by(n as i64) as u64;
            if before + n > self.node.max {
                self.node.held.dec_by(n as i64);
                if let Some(id) = &self.identity {
                    id.fetch_sub(n, Ordering::Relaxed);
                }
                self.held.fetch_sub(n, Ordering::Relaxed);
                return Err(Over::Node(self.node.max));
            }
        }
        Ok(())
    }

    fn give(&self, n: u64, node: bool) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        if node {
            if let Some(id) = &self.identity {
                id.fetch_sub(n, Ordering::Relaxed);
            }
            self.node.held.dec_by(n as i64);
        }
    }

    /// Bytes this connection's requests hold now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one buffer holds against its connection's budget (and the node's), given back
/// when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Connection>,
    n: u64,
    /// Counted against the node's budget too.
    node: bool,
}

impl Held {
    pub fn new(budget: Arc<Connection>) -> Self {
        Self {
            budget,
            n: 0,
            node: true,
        }
    }

    /// Charges `n` bytes up front.
    pub fn with(budget: Arc<Connection>, n: u64) -> Result<Self, Over> {
        budget.take(n, true)?;
        Ok(Self {
            budget,
            n,
            node: true,
        })
    }

    /// Charges `n` bytes against the connection's budget only: what every request needs
    /// (its header list, bounded per stream by the codec) is never refused because
    /// other connections filled the node's budget.
    pub fn connection_only(budget: Arc<Connection>, n: u64) -> Result<Self, Over> {
        budget.take(n, false)?;
        Ok(Self {
            budget,
            n,
            node: false,
        })
    }

    /// The buffer now holds `n` bytes: charges what it grew by, gives back what it
    /// shrank by. On refusal nothing changes.
    pub fn set(&mut self, n: u64) -> Result<(), Over> {
        if n > self.n {
            self.budget.take(n - self.n, self.node)?;
        } else if n < self.n {
            self.budget.give(self.n - n, self.node);
        }
        self.n = n;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.give(self.n, self.node);
        }
    }
}

/// A request's header list as HTTP/2 counts it (RFC 9113 6.5.2: each field's name and
/// value, plus 32).
pub fn header_list_size(h: &http::HeaderMap) -> u64 {
    h.iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 32) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_past_either_budget_is_refused_and_undone() {
        let node = Node::new(Gauge::default(), 400);
        let (a, b) = (
            Connection::new(node.clone(), 60, Some("a")),
            Connection::new(node.clone(), 60, Some("a")),
        );
        let mut x = Held::new(a.clone());
        x.set(50).unwrap();
        assert_eq!(x.set(70), Err(Over::Connection(60)));
        assert_eq!(a.held(), 50);
        let mut y = Held::new(b.clone());
        assert_eq!(
            y.set(55),
            Err(Over::Identity(100)),
            "a quarter of the node's, together"
        );
        assert_eq!((b.held(), node.held.get()), (0, 50));
        y.set(40).unwrap();
        x.set(10).unwrap();
        assert_eq!(node.held.get(), 50);
        drop(x);
        drop(y);
        assert_eq!((a.held(), b.held(), node.held.get()), (0, 0, 0));
        // the node's own budget, once every identity's share is taken
        let held: Vec<Held> = (0..4)
            .map(|i| {
                Held::with(
                    Connection::new(node.clone(), 200, Some(&format!("i{i}"))),
                    100,
                )
                .unwrap()
            })
            .collect();
        let c = Connection::new(node.clone(), 60, Some("late"));
        assert_eq!(Held::with(c, 1).err(), Some(Over::Node(400)));
        drop(held);
        assert_eq!(node.held.get(), 0);
    }
}
