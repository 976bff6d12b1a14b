//! Prometheus metrics of the worker, all prefixed `chatcluster_worker_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dead_letters::Cause;
use crate::store::Written;

/// Label of per-table counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// `messages`, `direct_messages`, `users` or `channels`.
    pub table: &'static str,
}

/// Label of per-shard gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// The persistence shard number.
    pub shard: u32,
}

/// Label of dead-letter counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    /// `poison`, `rejected`, `offset_clash` or `max_deliveries`.
    pub cause: &'static str,
}

/// Label of per-backend series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// `redis` or `postgres`.
    pub backend: &'static str,
}

/// The worker's metrics, registered once at start.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Batches committed and acknowledged.
    pub batches: Counter,
    /// Stream entries acknowledged (written, already present, or dead-lettered).
    pub entries_acked: Counter,
    /// Rows inserted, per table (redelivered rows already present are not counted).
    pub rows_written: Family<TableLabel, Counter>,
    /// Time from a batch's first read to its acknowledgement.
    pub batch_duration: Histogram,
    /// Entries per batch.
    pub batch_entries: Histogram,
    /// Age of the oldest message of a batch when it committed (publish → PostgreSQL).
    pub persistence_lag: Histogram,
    /// Entries not yet delivered to the group, per shard.
    pub stream_lag: Family<ShardLabel, Gauge>,
    /// Entries delivered and not acknowledged, per shard.
    pub stream_pending: Family<ShardLabel, Gauge>,
    /// Entries taken over from idle consumers.
    pub claimed: Counter,
    /// Entries taken back from this consumer's own pending list (after a
    /// restart, or after a read whose reply was lost).
    pub recovered: Counter,
    /// Entries moved to a dead-letter stream, per cause.
    pub dead_lettered: Family<CauseLabel, Counter>,
    /// Entries in each shard's dead-letter stream.
    pub dead_letters: Family<ShardLabel, Gauge>,
    /// Failed attempts (each followed by a retry), per backend.
    pub errors: Family<BackendLabel, Counter>,
    /// 1 while the backend answers, per backend.
    pub up: Family<BackendLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            batches: Counter::default(),
            entries_acked: Counter::default(),
            rows_written: Family::default(),
            batch_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            batch_entries: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            persistence_lag: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            stream_lag: Family::default(),
            stream_pending: Family::default(),
            claimed: Counter::default(),
            recovered: Counter::default(),
            dead_lettered: Family::default(),
            dead_letters: Family::default(),
            errors: Family::default(),
            up: Family::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `chatcluster_worker_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("chatcluster_worker");
        sub.register(
            "batches",
            "Batches committed to PostgreSQL and acknowledged",
            m.batches.clone(),
        );
        sub.register(
            "entries_acked",
            "Stream entries acknowledged and deleted",
            m.entries_acked.clone(),
        );
        sub.register(
            "rows_written",
            "Rows inserted, per table",
            m.rows_written.clone(),
        );
        sub.register(
            "batch_duration_seconds",
            "Time from a batch's first entry read to its acknowledgement",
            m.batch_duration.clone(),
        );
        sub.register(
            "batch_entries",
            "Stream entries per batch",
            m.batch_entries.clone(),
        );
        sub.register(
            "persistence_lag_seconds",
            "Age of a batch's oldest message when its transaction committed",
            m.persistence_lag.clone(),
        );
        sub.register(
            "stream_lag",
            "Entries not yet delivered to the persist group, per shard",
            m.stream_lag.clone(),
        );
        sub.register(
            "stream_pending",
            "Entries delivered and not yet acknowledged, per shard",
            m.stream_pending.clone(),
        );
        sub.register(
            "claimed",
            "Entries taken over from idle consumers",
            m.claimed.clone(),
        );
        sub.register(
            "recovered",
            "Entries taken back from this consumer's own pending list",
            m.recovered.clone(),
        );
        sub.register(
            "dead_lettered",
            "Entries moved to a dead-letter stream, per cause",
            m.dead_lettered.clone(),
        );
        sub.register(
            "dead_letters",
            "Entries in the dead-letter stream, per shard",
            m.dead_letters.clone(),
        );
        sub.register(
            "errors",
            "Failed Redis or PostgreSQL attempts, each retried",
            m.errors.clone(),
        );
        sub.register("up", "1 while the backend answers", m.up.clone());
        m
    }

    /// Counts rows inserted by one transaction.
    pub fn written(&self, written: &Written) {
        for (table, n) in [
            ("messages", written.messages),
            ("direct_messages", written.directs),
            ("inbox", written.inbox),
            ("users", written.users),
            ("channels", written.channels),
        ] {
            if n > 0 {
                self.rows_written
                    .get_or_create(&TableLabel { table })
                    .inc_by(n);
            }
        }
    }

    /// Records a failed attempt on `backend`.
    pub fn failed(&self, backend: &'static str) {
        self.errors.get_or_create(&BackendLabel { backend }).inc();
        self.up.get_or_create(&BackendLabel { backend }).set(0);
    }

    /// Records a backend answering.
    pub fn answered(&self, backend: &'static str) {
        self.up.get_or_create(&BackendLabel { backend }).set(1);
    }

    /// Records a backend not answering a probe.
    pub fn unreachable(&self, backend: &'static str) {
        self.up.get_or_create(&BackendLabel { backend }).set(0);
    }

    /// Counts one dead letter of `cause`.
    pub fn dead_letter(&self, cause: Cause) {
        self.dead_lettered
            .get_or_create(&CauseLabel {
                cause: cause.label(),
            })
            .inc();
    }

    /// The sum of rows written to `table` so far.
    pub fn rows(&self, table: &'static str) -> u64 {
        self.rows_written.get_or_create(&TableLabel { table }).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric_with_prefix() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.batches.inc();
        metrics.written(&Written {
            messages: 3,
            ..Written::default()
        });
        metrics
            .stream_lag
            .get_or_create(&ShardLabel { shard: 2 })
            .set(7);
        metrics.failed("postgres");
        metrics.dead_letter(Cause::OffsetClash);
        metrics.batch_duration.observe(0.01);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for expected in [
            "chatcluster_worker_batches_total 1",
            "chatcluster_worker_rows_written_total{table=\"messages\"} 3",
            "chatcluster_worker_stream_lag{shard=\"2\"} 7",
            "chatcluster_worker_errors_total{backend=\"postgres\"} 1",
            "chatcluster_worker_up{backend=\"postgres\"} 0",
            "chatcluster_worker_batch_duration_seconds_count 1",
            "chatcluster_worker_claimed_total 0",
            "chatcluster_worker_recovered_total 0",
            "chatcluster_worker_dead_lettered_total{cause=\"offset_clash\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
        assert_eq!(metrics.rows("messages"), 3);
    }
}
