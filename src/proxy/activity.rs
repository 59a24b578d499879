//! A connection's requests in flight, and when it last started or finished one: what
//! its idle timeout reads. Each request holds a [`Busy`] until its answer is done.

use std::sync::Arc;
use std::time::Duration;

/// A connection's requests in flight and when it last started or finished one.
pub struct Activity {
    epoch: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            in_flight: Default::default(),
            last_ms: Default::default(),
        }
    }
}

/// One request in flight on a connection, until dropped.
pub struct Busy(Arc<Activity>);

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// A request starts. While one is in flight the connection is not idle, so only its
    /// end reads the clock.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Whether a request is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// How long the connection has had nothing in flight.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(
            now.saturating_sub(self.last_ms.load(std::sync::atomic::Ordering::Relaxed)),
        )
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
