//! Streams reset after fedport started work on them, counted per caller identity across
//! all its connections (a caller that opens a new connection for each burst is the same
//! caller), over a sliding window of [`WINDOW`]: the count of the current window plus
//! the share of the previous window's count that still overlaps the last [`WINDOW`].
//! Past the connection's `max_streams`, the connection the reset came on is cut; so is
//! every further one of that identity on its next such reset, until the count decays.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window resets are counted over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One identity's count: the current window's start, its count, and the previous
/// window's.
#[derive(Debug, Clone, Copy)]
struct Count {
    since: Instant,
    now: u32,
    before: u32,
}

impl Count {
    /// Moves the windows on to `at`; the resets counted over the last [`WINDOW`].
    fn at(&mut self, at: Instant) -> f64 {
        let mut gone = at.saturating_duration_since(self.since);
        if gone >= WINDOW {
            let windows = gone.as_nanos() / WINDOW.as_nanos();
            self.before = if windows == 1 { self.now } else { 0 };
            self.now = 0;
            self.since += WINDOW * windows as u32;
            gone = at.saturating_duration_since(self.since);
        }
        let overlap = 1.0 - gone.as_secs_f64() / WINDOW.as_secs_f64();
        f64::from(self.before) * overlap + f64::from(self.now)
    }
}

#[derive(Debug, Default)]
pub struct Resets {
    by_identity: Mutex<HashMap<String, Count>>,
}

impl Resets {
    /// Counts one started stream of `identity` reset; whether more than `allowance`
    /// were reset over the last [`WINDOW`]. Called on resets only, so the lock is off
    /// the path of requests that finish.
    pub fn spent(&self, identity: &str, allowance: u32) -> bool {
        let Ok(mut m) = self.by_identity.lock() else {
            return false;
        };
        let now = Instant::now();
        if m.len() >= 65_536 {
            // a count that has decayed to nothing is as good as none
            m.retain(|_, c| c.at(now) >= 1.0);
        }
        let c = m.entry(identity.to_owned()).or_insert(Count {
            since: now,
            now: 0,
            before: 0,
        });
        let counted = c.at(now);
        c.now = c.now.saturating_add(1);
        counted + 1.0 > f64::from(allowance.max(1))
    }
}

impl Resets {
    /// Whether `identity` is past `allowance` now (nothing counted): asked once per new
    /// connection.
    pub fn over(&self, identity: &str, allowance: u32) -> bool {
        let Ok(mut m) = self.by_identity.lock() else {
            return false;
        };
        m.get_mut(identity)
            .is_some_and(|c| c.at(Instant::now()) >= f64::from(allowance.max(1)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_identity_has_one_allowance_across_its_connections() {
        let r = super::Resets::default();
        for _ in 0..10 {
            assert!(!r.spent("a", 10));
        }
        assert!(r.spent("a", 10), "the eleventh, from any connection of a");
        assert!(!r.spent("b", 10), "another identity has its own");
    }

    #[test]
    fn the_previous_window_counts_for_what_still_overlaps() {
        let t = std::time::Instant::now();
        let mut c = super::Count {
            since: t,
            now: 100,
            before: 0,
        };
        let w = super::WINDOW;
        assert_eq!(c.at(t + w / 2), 100.0);
        // a quarter into the next window, three quarters of the last one overlap
        assert!((c.at(t + w + w / 4) - 75.0).abs() < 1e-6);
        // two windows on, nothing is left
        assert_eq!(c.at(t + w * 3), 0.0);
    }
}
