//! Lamport clock shared by all connections of one process.
//!
//! On every request `clock = max(local, received) + 1`; replies and pushes carry
//! the value. Lock-free: one atomic `fetch_max` + `fetch_add` pair per event.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// `received`.
    pub fn tick(&self, received: Option<u64>) -> u64 {
        if let Some(received) = received {
            self.value.fetch_max(received, Ordering::AcqRel);
        }
        self.value.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Merges a time observed from another process without counting a local event.
    pub fn observe(&self, received: u64) {
        self.value.fetch_max(received, Ordering::AcqRel);
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
