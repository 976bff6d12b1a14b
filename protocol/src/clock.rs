//! Lamport clock shared by all connections of one process.
//!
//! On every request `clock = max(local, received) + 1`; replies and pushes carry
//! the value. Lock-free: one atomic `fetch_max` plus one compare-and-swap loop
//! per event.
//!
//! The clock never passes [`MAX_CLOCK`] (2^53−1, the largest integer a
//! JavaScript number holds exactly): requests carrying a larger clock are
//! refused before they get here (see [`crate::frame`]), values observed from
//! elsewhere are capped, and a tick at the maximum stays there instead of
//! wrapping to 0.

use std::sync::atomic::{AtomicU64, Ordering};

/// The largest clock value: 2^53−1 (JavaScript's `Number.MAX_SAFE_INTEGER`).
pub const MAX_CLOCK: u64 = (1 << 53) - 1;

/// A process-wide Lamport clock.
#[derive(Debug, Default)]
pub struct LamportClock {
    value: AtomicU64,
}

impl LamportClock {
    /// A clock starting at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an event that carried `received` (or none) and returns the new
    /// local time, strictly greater than both the previous local time and
    /// `received` (saturating at [`MAX_CLOCK`]).
    pub fn tick(&self, received: Option<u64>) -> u64 {
        if let Some(received) = received {
            self.observe(received);
        }
        let previous = self
            .value
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |value| {
                Some(value.saturating_add(1).min(MAX_CLOCK))
            })
            // The closure always returns `Some`.
            .unwrap_or(MAX_CLOCK);
        previous.saturating_add(1).min(MAX_CLOCK)
    }

    /// Merges a time observed from another process without counting a local
    /// event (capped at [`MAX_CLOCK`]).
    pub fn observe(&self, received: u64) {
        self.value
            .fetch_max(received.min(MAX_CLOCK), Ordering::AcqRel);
    }

    /// The current value.
    pub fn now(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_max_plus_one() {
        let clock = LamportClock::new();
        assert_eq!(clock.tick(None), 1);
        assert_eq!(clock.tick(Some(10)), 11);
        assert_eq!(clock.tick(Some(3)), 12);
        clock.observe(20);
        assert_eq!(clock.now(), 20);
        assert_eq!(clock.tick(None), 21);
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let clock = LamportClock::new();
        assert_eq!(clock.tick(Some(MAX_CLOCK - 1)), MAX_CLOCK);
        assert_eq!(clock.tick(None), MAX_CLOCK, "stays at the maximum");
        assert_eq!(clock.tick(Some(u64::MAX)), MAX_CLOCK);
        clock.observe(u64::MAX);
        assert_eq!(clock.now(), MAX_CLOCK);
        let other = LamportClock::new();
        other.observe(u64::MAX);
        assert_eq!(other.now(), MAX_CLOCK, "observed values are capped");
    }

    #[test]
    fn concurrent_ticks_are_unique() {
        let clock = std::sync::Arc::new(LamportClock::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..1000).map(|_| clock.tick(None)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        assert_eq!(clock.now(), 4000);
    }
}
