//! The entries this worker holds: read and not yet acknowledged.
//!
//! The reader adds what it reads, the acker removes what it acknowledged, the
//! heartbeat re-claims what has been held for long, the reader skips them when
//! it re-reads its own pending list, and waits for them to drain before it
//! hands on an entry that must be written alone.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::reply::{EntryKey, RawEntry};

/// Entries read and not yet acknowledged, with the time they were last
/// (re)claimed, so that the heartbeat can keep them ours while they wait.
#[derive(Debug)]
pub struct InFlight {
    entries: Mutex<HashMap<EntryKey, Instant>>,
    len: watch::Sender<usize>,
}

impl Default for InFlight {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            len: watch::Sender::new(0),
        }
    }
}

impl InFlight {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<EntryKey, Instant>) -> T) -> T {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut map);
        self.len.send_replace(map.len());
        out
    }

    /// Records entries just read.
    pub fn add<'a>(&self, entries: impl IntoIterator<Item = &'a RawEntry>) {
        let now = Instant::now();
        self.with(|map| {
            for entry in entries {
                map.insert(entry.key(), now);
            }
        });
    }

    /// Forgets acknowledged entries.
    pub fn remove<'a>(&self, entries: impl IntoIterator<Item = &'a RawEntry>) {
        self.with(|map| {
            for entry in entries {
                map.remove(&entry.key());
            }
        });
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: &EntryKey) -> bool {
        self.with(|map| map.contains_key(key))
    }

    /// Entries held longer than `age`, marked as refreshed now.
    pub fn older_than(&self, age: Duration) -> Vec<EntryKey> {
        let now = Instant::now();
        self.with(|map| {
            map.iter_mut()
                .filter(|(_, since)| now.duration_since(**since) >= age)
                .map(|(key, since)| {
                    *since = now;
                    *key
                })
                .collect()
        })
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        *self.len.borrow()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at most `n` entries are held.
    pub async fn wait_at_most(&self, n: usize) {
        let mut len = self.len.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = len.wait_for(|len| *len <= n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Delivery;

    fn entry(id: &str) -> RawEntry {
        RawEntry {
            shard: 0,
            id: id.into(),
            fields: None,
            delivery: Delivery::First,
        }
    }

    #[tokio::test]
    async fn waits_until_the_others_are_acknowledged() {
        let in_flight = std::sync::Arc::new(InFlight::default());
        let (a, b) = (entry("1-0"), entry("2-0"));
        in_flight.add([&a, &b]);
        assert!(in_flight.contains(&a.key()));
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.wait_at_most(1).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        in_flight.remove([&a]);
        waiter.await.unwrap();
        assert_eq!(in_flight.older_than(Duration::ZERO), [b.key()]);
        assert!(in_flight.older_than(Duration::from_secs(60)).is_empty());
        assert_eq!(in_flight.len(), 1);
    }
}
