//! Prometheus metrics of the operator: reconciles, failures by kind, durations, leadership.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`Error::metric_label`] of the failure.
    pub error: String,
}

/// The operator's metrics, registered once at start.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles failed, by error kind.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile durations in seconds.
    pub duration: Histogram,
    /// 1 while this instance holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `chatcluster_operator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let sub = registry.sub_registry_with_prefix("chatcluster_operator");
        sub.register(
            "reconciles",
            "Reconciles started",
            metrics.reconciles.clone(),
        );
        sub.register(
            "reconcile_errors",
            "Reconciles failed, by error kind",
            metrics.failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            metrics.duration.clone(),
        );
        sub.register(
            "leader",
            "1 while this instance is the leader",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, error: &Error) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label().to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric_with_prefix() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.reconciles.inc();
        metrics.failed(&Error::InvalidSpec("x".to_owned()));
        metrics.duration.observe(0.2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("chatcluster_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("chatcluster_operator_reconcile_errors_total{error=\"invalid_spec\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chatcluster_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("chatcluster_operator_leader 0"), "{text}");
    }
}
