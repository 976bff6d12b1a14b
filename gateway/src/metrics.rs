//! Prometheus metrics of one gateway process, served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set of one label.
pub type Label = [(&'static str, &'static str); 1];

/// Every metric of the gateway, cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket connections accepted since start, by encoding (`accepted_connections_total`).
    pub connections_total: Family<Label, Counter>,
    /// Upgrades refused (limit reached, draining, unauthorized).
    pub rejected_total: Family<Label, Counter>,
    /// Channel subscriptions held by local connections.
    pub subscriptions: Gauge,
    /// Redis topics this process is subscribed to.
    pub topics: Gauge,
    /// Client requests, by op.
    pub requests_total: Family<Label, Counter>,
    /// Error replies, by code.
    pub errors_total: Family<Label, Counter>,
    /// Messages accepted for publishing (channel messages and direct messages).
    pub messages_in_total: Counter,
    /// Frames queued to local connections (pushes, one per recipient).
    pub messages_out_total: Counter,
    /// Time from receiving a publish to its Redis script returning.
    pub publish_latency: Histogram,
    /// Connections closed because they did not read fast enough.
    pub slow_reader_disconnects_total: Counter,
    /// Failed Redis requests and lost Redis connections.
    pub redis_errors_total: Counter,
    /// Messages fetched from history to fill a gap in the live stream.
    pub gap_fills_total: Counter,
    /// Offsets skipped because the history stream no longer had them.
    pub lost_offsets_total: Counter,
    /// Topic messages dropped at the intake because a dispatcher's queue was
    /// full (their channels are then caught up from history).
    pub intake_overflow_total: Counter,
    /// Publishes and direct messages answered from an earlier call with the
    /// same idempotency key (nothing stored twice).
    pub idempotent_replays_total: Counter,
    /// Writes answered `unknown_outcome` (Redis did not answer after the
    /// request was sent).
    pub unknown_outcomes_total: Counter,
    /// Epochs this gateway started (first use of a channel or inbox, or after
    /// Redis lost its state).
    pub epochs_started_total: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `chatcluster_gateway` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chatcluster_gateway");
        let metrics = Self {
            connections: Gauge::default(),
            connections_total: Family::default(),
            rejected_total: Family::default(),
            subscriptions: Gauge::default(),
            topics: Gauge::default(),
            requests_total: Family::default(),
            errors_total: Family::default(),
            messages_in_total: Counter::default(),
            messages_out_total: Counter::default(),
            publish_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            slow_reader_disconnects_total: Counter::default(),
            redis_errors_total: Counter::default(),
            gap_fills_total: Counter::default(),
            lost_offsets_total: Counter::default(),
            intake_overflow_total: Counter::default(),
            idempotent_replays_total: Counter::default(),
            unknown_outcomes_total: Counter::default(),
            epochs_started_total: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open WebSocket connections",
            metrics.connections.clone(),
        );
        r.register(
            "accepted_connections",
            "WebSocket connections accepted",
            metrics.connections_total.clone(),
        );
        r.register(
            "rejected_connections",
            "Upgrades refused, by reason",
            metrics.rejected_total.clone(),
        );
        r.register(
            "subscriptions",
            "Channel subscriptions of local connections",
            metrics.subscriptions.clone(),
        );
        r.register(
            "topics",
            "Redis pub/sub topics subscribed",
            metrics.topics.clone(),
        );
        r.register(
            "requests",
            "Client requests by op",
            metrics.requests_total.clone(),
        );
        r.register(
            "errors",
            "Error replies by code",
            metrics.errors_total.clone(),
        );
        r.register(
            "messages_in",
            "Messages accepted for publishing",
            metrics.messages_in_total.clone(),
        );
        r.register(
            "messages_out",
            "Frames queued to local connections",
            metrics.messages_out_total.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Publish request to Redis commit",
            metrics.publish_latency.clone(),
        );
        r.register(
            "slow_reader_disconnects",
            "Connections closed for not reading fast enough",
            metrics.slow_reader_disconnects_total.clone(),
        );
        r.register(
            "redis_errors",
            "Failed Redis requests and connections",
            metrics.redis_errors_total.clone(),
        );
        r.register(
            "gap_fills",
            "Messages fetched from history to fill live gaps",
            metrics.gap_fills_total.clone(),
        );
        r.register(
            "lost_offsets",
            "Offsets skipped because the history stream no longer had them",
            metrics.lost_offsets_total.clone(),
        );
        r.register(
            "intake_overflow",
            "Topic messages dropped at a full dispatcher queue and caught up from history",
            metrics.intake_overflow_total.clone(),
        );
        r.register(
            "idempotent_replays",
            "Writes answered from an earlier call with the same idempotency key",
            metrics.idempotent_replays_total.clone(),
        );
        r.register(
            "unknown_outcomes",
            "Writes whose Redis reply never came (answered unknown_outcome)",
            metrics.unknown_outcomes_total.clone(),
        );
        r.register(
            "epochs_started",
            "Channel and inbox epochs started by this gateway",
            metrics.epochs_started_total.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let metrics = Metrics::new();
        metrics.connections.inc();
        metrics
            .errors_total
            .get_or_create(&[("code", "bad_request")])
            .inc();
        metrics.publish_latency.observe(0.002);
        let text = metrics.render();
        assert!(text.contains("chatcluster_gateway_connections 1"), "{text}");
        assert!(
            text.contains("chatcluster_gateway_errors_total{code=\"bad_request\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chatcluster_gateway_publish_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("chatcluster_gateway_slow_reader_disconnects_total 0"),
            "{text}"
        );
    }
}
