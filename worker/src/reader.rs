//! Filling batches from the persistence streams.
//!
//! A batch closes when it holds `BATCH_SIZE` entries or when its first entry
//! has waited `BATCH_TIMEOUT`, whichever comes first. Entries come, in this
//! order of preference, from:
//!
//! 1. this consumer's own pending list, taken back at start (entries a
//!    previous life of the same `WORKER_ID` read but never acknowledged) and
//!    after *any* read error (a read whose reply was lost still delivered its
//!    entries to this consumer; they are retried at once, not after `CLAIM_IDLE`);
//! 2. other consumers' entries idle for `CLAIM_IDLE` (dead workers);
//! 3. new entries (`XREADGROUP >` across all shards, blocking at most [`MAX_BLOCK`]).
//!
//! **Counting deliveries.** Redis counts a new entry's first delivery. An
//! entry taken back from a pending list is its delivery `n + 1` (`n` from
//! `XPENDING`); that count is recorded in Redis when its batch leaves the
//! reader, not when it is taken (an entry still waiting here when the worker
//! crashes was not tried). A second delivery travels in an ordinary batch. A
//! third or later one was in flight during two failures: it is handed on
//! *alone*, once everything else in flight is acknowledged, so that a crash
//! while it is written counts against it only. Beyond `MAX_DELIVERIES` the
//! entry becomes a dead letter without being tried (see [`crate::batch`]).
//! Hence an innocent entry that only shared a batch with a crashing one is
//! delivered at most 3 times, and `MAX_DELIVERIES` is at least 3.
//!
//! A read is never cancelled half-way (its entries would be delivered to us
//! and then forgotten until claimed): shutdown is checked between reads.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::in_flight::InFlight;
use crate::metrics::Metrics;
use crate::reply::{Delivery, EntryKey, Pending, RawEntry};
use crate::retry::{Backend, Retry};
use crate::streams::{self, Holder, Streams};

/// Longest `BLOCK` of one read, so shutdown and claims are never far away.
pub const MAX_BLOCK: Duration = Duration::from_millis(500);

/// How often consumers gone for good are removed from the group.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Entries of the own pending list listed per round trip.
const PENDING_PAGE: usize = 200;

/// From this delivery on, an entry is written alone.
pub const ALONE_FROM: u64 = 3;

/// Builds batches from the streams.
pub struct Reader {
    streams: Streams,
    size: usize,
    timeout: Duration,
    claim_idle: Duration,
    max_deliveries: u64,
    /// Per shard: where to continue listing the own pending list (`-` or
    /// `(<id>`); `None` once it has been taken back.
    own: Vec<Option<String>>,
    /// Per shard: where to continue listing idle entries of other consumers.
    claim_cursor: Vec<String>,
    next_claim: Instant,
    next_prune: Instant,
    needs_groups: bool,
    /// Entries read beyond the batch size, for the next batch.
    carry: VecDeque<RawEntry>,
    /// Entries on their third or later delivery, each to be handed on alone.
    alone: VecDeque<RawEntry>,
    /// The last batch was an entry alone: wait until it is acknowledged.
    after_alone: bool,
    in_flight: Arc<InFlight>,
    metrics: Metrics,
    health: Arc<Health>,
}

impl Reader {
    /// A reader of `streams` with the batch size, timeouts and cap of `config`.
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
            max_deliveries: config.max_deliveries,
            own: vec![Some("-".to_owned()); shards],
            claim_cursor: vec!["-".to_owned(); shards],
            next_claim: Instant::now(),
            next_prune: Instant::now() + PRUNE_EVERY,
            needs_groups: false,
            carry: VecDeque::new(),
            alone: VecDeque::new(),
            after_alone: false,
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
        loop {
            if self.after_alone || !self.alone.is_empty() {
                // Everything handed on before must be acknowledged first.
                let held = self.carry.len() + self.alone.len();
                tokio::select! {
                    () = self.in_flight.wait_at_most(held) => {}
                    () = stop.cancelled() => return None,
                }
                self.after_alone = false;
                if let Some(entry) = self.alone.pop_front() {
                    self.after_alone = true;
                    let raw = vec![entry];
                    self.count_deliveries(&raw, stop).await;
                    return Some(raw);
                }
            }
            let raw = self.fill_batch(stop).await;
            if !raw.is_empty() {
                self.count_deliveries(&raw, stop).await;
                return Some(raw);
            }
            if stop.is_cancelled() {
                return None;
            }
        }
    }

    /// Reads until the batch is full, its first entry has waited long enough,
    /// an entry must go alone while the batch is still empty, or `stop`.
    async fn fill_batch(&mut self, stop: &CancellationToken) -> Vec<RawEntry> {
        let take = self.carry.len().min(self.size);
        let mut raw: Vec<RawEntry> = self.carry.drain(..take).collect();
        let mut deadline = (!raw.is_empty()).then(|| Instant::now() + self.timeout);
        let (metrics, health) = (self.metrics.clone(), self.health.clone());
        let retry = Retry {
            backend: Backend::Redis,
            metrics: &metrics,
            health: &health,
            cancel: stop,
            interrupt: false,
        };
        let mut backoff = Backoff::default();
        while raw.len() < self.size
            && !stop.is_cancelled()
            && deadline.is_none_or(|d| Instant::now() < d)
            && (self.alone.is_empty() || !raw.is_empty())
        {
            match self.fill(&mut raw, deadline).await {
                Ok(()) => {
                    backoff.reset();
                    retry.succeeded();
                }
                Err(error) => {
                    self.after_error(&error);
                    let delay =
                        retry.failed("reading the persistence streams", &error, &mut backoff);
                    // Abandoned means `stop`, which ends the loop.
                    let _ = retry.pause(delay).await;
                }
            }
            if !raw.is_empty() {
                deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            }
        }
        if raw.len() > self.size {
            self.carry.extend(raw.drain(self.size..));
        }
        raw
    }

    /// Records in Redis which delivery each taken-back entry of `raw` is, so
    /// the count survives a crash while it is written. Entries beyond
    /// `MAX_DELIVERIES` are not tried, so not counted.
    async fn count_deliveries(&self, raw: &[RawEntry], stop: &CancellationToken) {
        let max = self.max_deliveries;
        if !raw
            .iter()
            .any(|e| matches!(e.delivery, Delivery::Again(n) if n <= max))
        {
            return;
        }
        let retry = Retry {
            backend: Backend::Redis,
            metrics: &self.metrics,
            health: &self.health,
            cancel: stop,
            interrupt: false,
        };
        let streams = &self.streams;
        // On shutdown the batch is still written, only its count is not recorded.
        let _ = retry
            .until_ok("recording deliveries", || {
                let mut streams = streams.clone();
                async move { streams.count_deliveries(raw, max).await }
            })
            .await;
    }

    /// After a failed read: recreate the groups if Redis lost them, and take
    /// back the own pending list, since the failed read may have delivered
    /// entries whose reply never arrived.
    fn after_error(&mut self, error: &Error) {
        self.needs_groups |= streams::is_missing_group(error);
        self.own
            .iter_mut()
            .for_each(|own| *own = Some("-".to_owned()));
    }

    async fn fill(&mut self, raw: &mut Vec<RawEntry>, deadline: Option<Instant>) -> Result<()> {
        if self.needs_groups {
            self.streams.ensure_groups().await?;
            self.needs_groups = false;
        }
        if let Some(shard) = self.own.iter().position(Option::is_some) {
            return self.take_own(shard as u32, raw).await;
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
        let room = self.size - raw.len();
        let got = self.streams.read(&ids, room, Some(block)).await?;
        self.accept(raw, got);
        Ok(())
    }

    /// Holds `got` in flight and sorts it: into the batch, or aside to go alone.
    fn accept(&mut self, raw: &mut Vec<RawEntry>, got: Vec<RawEntry>) {
        self.in_flight.add(&got);
        for entry in got {
            match entry.delivery {
                Delivery::Again(n) if (ALONE_FROM..=self.max_deliveries).contains(&n) => {
                    self.alone.push_back(entry);
                }
                _ => raw.push(entry),
            }
        }
    }

    /// Pending entries not held by this worker right now.
    fn not_in_flight(&self, shard: u32, pending: Vec<Pending>) -> Vec<Pending> {
        pending
            .into_iter()
            .filter(|p| !self.in_flight.contains(&EntryKey::new(shard, &p.id)))
            .collect()
    }

    /// Takes back one page of this consumer's own pending entries of `shard`
    /// that nothing in this process holds.
    async fn take_own(&mut self, shard: u32, raw: &mut Vec<RawEntry>) -> Result<()> {
        let after = self.own[shard as usize]
            .clone()
            .unwrap_or_else(|| "-".to_owned());
        let page = self
            .streams
            .pending(shard, Holder::Me, &after, PENDING_PAGE)
            .await?;
        self.own[shard as usize] = match page.last() {
            Some(last) if page.len() == PENDING_PAGE => Some(format!("({}", last.id)),
            _ => None,
        };
        let lost = self.not_in_flight(shard, page);
        let got = self.streams.take(shard, &lost, Duration::ZERO).await?;
        if !got.is_empty() {
            tracing::info!(
                shard,
                entries = got.len(),
                "taking back entries delivered to this consumer and never acknowledged"
            );
            self.metrics.recovered.inc_by(got.len() as u64);
        }
        self.accept(raw, got);
        Ok(())
    }

    /// Takes over entries idle for `CLAIM_IDLE` on any consumer.
    async fn claim(&mut self, raw: &mut Vec<RawEntry>) -> Result<()> {
        let mut more = false;
        for shard in 0..self.streams.shards() {
            let room = self.size.saturating_sub(raw.len());
            if room == 0 {
                more = true;
                break;
            }
            let cursor = self.claim_cursor[shard as usize].clone();
            let page = self
                .streams
                .pending(shard, Holder::IdleFor(self.claim_idle), &cursor, room)
                .await?;
            self.claim_cursor[shard as usize] = match page.last() {
                Some(last) if page.len() == room => {
                    more = true;
                    format!("({}", last.id)
                }
                _ => "-".to_owned(),
            };
            let idle = self.not_in_flight(shard, page);
            let got = self.streams.take(shard, &idle, self.claim_idle).await?;
            if !got.is_empty() {
                tracing::info!(
                    shard,
                    entries = got.len(),
                    "claimed entries idle on another consumer"
                );
                self.metrics.claimed.inc_by(got.len() as u64);
            }
            self.accept(raw, got);
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
