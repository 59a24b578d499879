//! Memory held for callers, bounded per connection and per node: a gRPC message held
//! whole until it validates (and while it is inflated), a JSON or small body buffered,
//! the header list of a stream in progress. Each is charged as it grows, against its
//! connection's budget and the node's; a charge past either is refused, and the caller
//! is told so (503 / RESOURCE_EXHAUSTED, `reason="memory"`) — fedport never waits on a
//! buffer it cannot finish. What the HTTP/2 codec holds is bounded apart, by the stream
//! and connection windows.

use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which budget a charge would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Over {
    #[error("the connection's memory budget ({0} bytes)")]
    Connection(u64),
    #[error("the node's memory budget ({0} bytes)")]
    Node(u64),
}

/// The node's budget: its count is the `fedport_memory_held_bytes` gauge, shared by
/// every worker and every configuration generation.
#[derive(Debug)]
pub struct Node {
    held: Gauge,
    max: u64,
}

impl Node {
    pub fn new(held: Gauge, max: u64) -> Arc<Self> {
        Arc::new(Self { held, max })
    }
}

/// One connection's budget.
#[derive(Debug)]
pub struct Connection {
    held: AtomicU64,
    max: u64,
    node: Arc<Node>,
}

impl Connection {
    pub fn new(node: Arc<Node>, max: u64) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            max,
            node,
        })
    }

    fn take(&self, n: u64) -> Result<(), Over> {
        if self.held.fetch_add(n, Ordering::Relaxed) + n > self.max {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return Err(Over::Connection(self.max));
        }
        let before = self.node.held.inc_by(n as i64) as u64;
        if before + n > self.node.max {
            self.node.held.dec_by(n as i64);
            self.held.fetch_sub(n, Ordering::Relaxed);
            return Err(Over::Node(self.node.max));
        }
        Ok(())
    }

    fn give(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.node.held.dec_by(n as i64);
    }

    /// Bytes this connection's requests hold now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one buffer holds against its connection's budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Connection>,
    n: u64,
}

impl Held {
    pub fn new(budget: Arc<Connection>) -> Self {
        Self { budget, n: 0 }
    }

    /// Charges `n` bytes up front.
    pub fn with(budget: Arc<Connection>, n: u64) -> Result<Self, Over> {
        budget.take(n)?;
        Ok(Self { budget, n })
    }

    /// The buffer now holds `n` bytes: charges what it grew by, gives back what it
    /// shrank by. On refusal nothing changes.
    pub fn set(&mut self, n: u64) -> Result<(), Over> {
        if n > self.n {
            self.budget.take(n - self.n)?;
        } else if n < self.n {
            self.budget.give(self.n - n);
        }
        self.n = n;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.give(self.n);
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
        let node = Node::new(Gauge::default(), 100);
        let (a, b) = (
            Connection::new(node.clone(), 60),
            Connection::new(node.clone(), 60),
        );
        let mut x = Held::new(a.clone());
        x.set(50).unwrap();
        assert_eq!(x.set(70), Err(Over::Connection(60)));
        assert_eq!(a.held(), 50);
        let mut y = Held::new(b.clone());
        assert_eq!(y.set(55), Err(Over::Node(100)));
        assert_eq!((b.held(), node.held.get()), (0, 50));
        y.set(40).unwrap();
        x.set(10).unwrap();
        assert_eq!(node.held.get(), 50);
        drop(x);
        drop(y);
        assert_eq!((a.held(), b.held(), node.held.get()), (0, 0, 0));
    }
}
