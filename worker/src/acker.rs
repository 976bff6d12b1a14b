//! The acker: acknowledges committed batches.
//!
//! One `MULTI` per batch writes its dead letters and `XACK`s and `XDEL`s all
//! its entries, so no writer waits for Redis. A failing Redis is retried with
//! backoff: a committed batch is acknowledged late rather than never.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::in_flight::InFlight;
use crate::metrics::Metrics;
use crate::retry::{Backend, Retry};
use crate::streams::Streams;
use crate::writer::Committed;

/// Acknowledges committed batches: dead letters, `XACK`, `XDEL`.
pub struct Acker {
    /// The streams.
    pub streams: Streams,
    /// Counters.
    pub metrics: Metrics,
    /// Readiness.
    pub health: Arc<Health>,
    /// Fires when the drain time is over: stop retrying.
    pub abandon: CancellationToken,
    /// What the worker holds.
    pub in_flight: Arc<InFlight>,
    /// Cap of each dead-letter stream.
    pub dead_max_len: u64,
}

impl Acker {
    /// Acknowledges batches until the writers are done.
    pub async fn run(self, mut committed: mpsc::Receiver<Committed>) {
        while let Some(Committed {
            batch,
            started,
            write_time,
        }) = committed.recv().await
        {
            for dead in &batch.dead {
                let entry = &batch.entries[dead.entry];
                tracing::warn!(
                    shard = entry.shard,
                    id = %entry.id,
                    cause = dead.cause.label(),
                    reason = %dead.reason,
                    "moving an entry to the dead-letter stream"
                );
            }
            let acking = Instant::now();
            let retry = Retry {
                backend: Backend::Redis,
                metrics: &self.metrics,
                health: &self.health,
                cancel: &self.abandon,
                interrupt: false,
            };
            let (streams, batch_ref, dead_max_len) = (&self.streams, &batch, self.dead_max_len);
            let acked = retry
                .until_ok("acknowledging a committed batch", || {
                    let mut streams = streams.clone();
                    async move { streams.finish(batch_ref, dead_max_len).await }
                })
                .await;
            let Ok(acked) = acked else {
                tracing::warn!(
                    entries = batch.len(),
                    "drain timeout: committed batch left unacknowledged (it will be delivered again and skipped)"
                );
                return;
            };
            self.in_flight.remove(&batch.entries);
            self.metrics.batches.inc();
            self.metrics.entries_acked.inc_by(acked);
            for dead in &batch.dead {
                self.metrics.dead_letter(dead.cause);
            }
            self.metrics.batch_entries.observe(batch.len() as f64);
            self.metrics
                .batch_duration
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(
                entries = batch.len(),
                rows = batch.rows.len(),
                dead = batch.dead.len(),
                write_ms = write_time.as_millis() as u64,
                ack_ms = acking.elapsed().as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "batch persisted"
            );
        }
    }
}
