//! Filling batches from the persistence streams.
//!
//! A batch closes when it holds `BATCH_SIZE` entries or when its first entry
//! has waited `BATCH_TIMEOUT`, whichever comes first. Entries come, in this
//! order of preference, from this consumer's own pending list (entries a
//! previous life of the same `WORKER_ID` read but never acknowledged), from
//! dead consumers (`XAUTOCLAIM` after `CLAIM_IDLE`), and from new entries
//! (`XREADGROUP >` across all shards, blocking at most [`MAX_BLOCK`]).
//!
//! A read is never cancelled half-way (its entries would be delivered to us
//! and then forgotten until claimed): shutdown is checked between reads.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::reply::{EntryKey, RawEntry};
use crate::streams::{self, Streams};

/// Longest `BLOCK` of one read, so shutdown and claims are never far away.
pub const MAX_BLOCK: Duration = Duration::from_millis(500);

/// How often consumers gone for good are removed from the group.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Entries read and not yet acknowledged, with the time they were last
/// (re)claimed, so that the heartbeat can keep them ours while they wait.
#[derive(Debug, Default)]
pub struct InFlight {
    entries: Mutex<HashMap<EntryKey, Instant>>,
}

impl InFlight {
    /// Records entries just read.
    pub fn add<'a>(&self, entries: impl IntoIterator<Item = &'a RawEntry>) {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in entries {
            map.insert(entry.key(), now);
        }
    }

    /// Forgets acknowledged entries.
    pub fn remove<'a>(&self, entries: impl IntoIterator<Item = &'a RawEntry>) {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in entries {
            map.remove(&entry.key());
        }
    }

    /// Entries held longer than `age`, marked as refreshed now.
    pub fn older_than(&self, age: Duration) -> Vec<EntryKey> {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter_mut()
            .filter(|(_, since)| now.duration_since(**since) >= age)
            .map(|(key, since)| {
                *since = now;
                *key
            })
            .collect()
    }

    /// Number of entries in flight.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds batches from the streams.
pub struct Reader {
    streams: Streams,
    size: usize,
    timeout: Duration,
    claim_idle: Duration,
    /// Per shard: the id after which to re-read own pending entries, until caught up.
    own: Vec<Option<String>>,
    claim_cursor: Vec<String>,
    next_claim: Instant,
    next_prune: Instant,
    needs_groups: bool,
    carry: VecDeque<RawEntry>,
    in_flight: Arc<InFlight>,
    metrics: Metrics,
    health: Arc<Health>,
}

impl Reader {
    /// A reader of `streams` making batches of up to `size` entries.
    pub fn new(
        streams: Streams,
        config: &crate::Config,
        in_flight: Arc<InFlight>,
        metrics: Metrics,
        health: Arc<Health>,
    ) -> Self {
        let shards = streams.shards() as usize;
        Self {
            streams,
            size: config.batch_size,
            timeout: config.batch_timeout,
            claim_idle: config.claim_idle,
            own: vec![Some("0".to_owned()); shards],
            claim_cursor: vec!["0-0".to_owned(); shards],
            next_claim: Instant::now(),
            next_prune: Instant::now() + PRUNE_EVERY,
            needs_groups: false,
            carry: VecDeque::new(),
            in_flight,
            metrics,
            health,
        }
    }

    /// How often dead consumers are looked for.
    fn claim_interval(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// The next batch's entries; `None` once `stop` is cancelled and nothing is left.
    pub async fn next_batch(&mut self, stop: &CancellationToken) -> Option<Vec<RawEntry>> {
        let take = self.carry.len().min(self.size);
        let mut raw: Vec<RawEntry> = self.carry.drain(..take).collect();
        let mut deadline = (!raw.is_empty()).then(|| Instant::now() + self.timeout);
        let mut backoff = Backoff::default();
        while raw.len() < self.size
            && !stop.is_cancelled()
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            let before = raw.len();
            match self.fill(&mut raw, deadline).await {
                Ok(()) => {
                    backoff.reset();
                    self.health.set_redis(true);
                    self.metrics.answered("redis");
                }
                Err(error) => {
                    self.needs_groups |= streams::is_missing_group(&error);
                    self.health.set_redis(false);
                    self.metrics.failed("redis");
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "reading the persistence streams failed");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
            if raw.len() > before {
                self.in_flight.add(&raw[before..]);
                deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            }
        }
        if raw.len() > self.size {
            self.carry.extend(raw.drain(self.size..));
        }
        (!raw.is_empty()).then_some(raw)
    }

    async fn fill(
        &mut self,
        raw: &mut Vec<RawEntry>,
        deadline: Option<Instant>,
    ) -> crate::Result<()> {
        if self.needs_groups {
            self.streams.ensure_groups().await?;
            self.needs_groups = false;
            self.own
                .iter_mut()
                .for_each(|own| *own = Some("0".to_owned()));
        }
        let room = self.size - raw.len();
        if self.own.iter().any(Option::is_some) {
            return self.read_own(raw, room).await;
        }
        if Instant::now() >= self.next_claim {
            return self.claim(raw).await;
        }
        let block = deadline.map_or(MAX_BLOCK, |d| {
            d.saturating_duration_since(Instant::now()).min(MAX_BLOCK)
        });
        if block.is_zero() {
            return Ok(());
        }
        let ids = vec![">".to_owned(); self.own.len()];
        raw.extend(self.streams.read(&ids, room, Some(block)).await?);
        Ok(())
    }

    /// Re-reads this consumer's own pending entries (left by a previous run with the same id).
    async fn read_own(&mut self, raw: &mut Vec<RawEntry>, room: usize) -> crate::Result<()> {
        let ids: Vec<String> = self
            .own
            .iter()
            .map(|own| own.clone().unwrap_or_else(|| ">".to_owned()))
            .collect();
        let got = self.streams.read(&ids, room, None).await?;
        for (shard, own) in self.own.iter_mut().enumerate() {
            if own.is_none() {
                continue;
            }
            let last = got.iter().rev().find(|e| e.shard as usize == shard);
            *own = last.map(|e| e.id.clone());
        }
        let recovered = got.iter().filter(|e| ids[e.shard as usize] != ">").count();
        if recovered > 0 {
            tracing::info!(
                entries = recovered,
                "re-reading entries this consumer left pending"
            );
        }
        raw.extend(got);
        Ok(())
    }

    /// Takes over entries idle for `CLAIM_IDLE` on any consumer.
    async fn claim(&mut self, raw: &mut Vec<RawEntry>) -> crate::Result<()> {
        let mut more = false;
        for shard in 0..self.streams.shards() {
            let room = self.size.saturating_sub(raw.len());
            if room == 0 {
                more = true;
                break;
            }
            let cursor = &self.claim_cursor[shard as usize];
            let claim = self
                .streams
                .autoclaim(shard, self.claim_idle, cursor, room)
                .await?;
            if !claim.claimed.is_empty() {
                tracing::info!(
                    shard,
                    entries = claim.claimed.len(),
                    "claimed entries idle on another consumer"
                );
                self.metrics.claimed.inc_by(claim.claimed.len() as u64);
            }
            more |= claim.next != "0-0";
            self.claim_cursor[shard as usize] = claim.next;
            raw.extend(claim.claimed);
        }
        if Instant::now() >= self.next_prune {
            self.next_prune = Instant::now() + PRUNE_EVERY;
            // Gone for ten claim periods (at least five minutes) with nothing pending.
            let idle = (self.claim_idle * 10).max(Duration::from_secs(300));
            for shard in 0..self.streams.shards() {
                let removed = self.streams.prune_consumers(shard, idle).await?;
                if !removed.is_empty() {
                    tracing::info!(shard, consumers = ?removed, "removed idle consumers without pending entries");
                }
            }
        }
        self.next_claim = if more {
            Instant::now()
        } else {
            Instant::now() + self.claim_interval()
        };
        Ok(())
    }
}
