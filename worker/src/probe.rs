//! The prober: refreshes readiness and the backlog gauges every second.
//!
//! Reads and writes keep readiness current while work flows; the probe covers
//! idle times, so `/ready` never waits on a dead backend.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::metrics::{Metrics, ShardLabel};
use crate::store::Store;
use crate::streams::Streams;

/// How often readiness and stream lag are refreshed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Probes PostgreSQL and Redis until `stop`.
pub async fn probe(
    store: Store,
    mut streams: Streams,
    metrics: Metrics,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let pg_up = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await,
            Ok(Ok(()))
        );
        health.set_postgres(pg_up);
        if pg_up {
            metrics.answered("postgres");
        } else {
            metrics.unreachable("postgres");
        }
        match tokio::time::timeout(PROBE_TIMEOUT, streams.lag()).await {
            Ok(Ok(shards)) => {
                health.set_redis(true);
                metrics.answered("redis");
                for (shard, lag) in shards.iter().enumerate() {
                    let label = ShardLabel {
                        shard: shard as u32,
                    };
                    metrics.stream_lag.get_or_create(&label).set(lag.lag as i64);
                    metrics
                        .stream_pending
                        .get_or_create(&label)
                        .set(lag.pending as i64);
                    metrics
                        .dead_letters
                        .get_or_create(&label)
                        .set(lag.dead as i64);
                }
            }
            Ok(Err(error)) => {
                // An error reply (e.g. the streams are being recreated after
                // Redis lost its data) still means Redis answers.
                tracing::debug!(%error, "reading stream lag failed");
                let up = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, streams.ping()).await,
                    Ok(Ok(()))
                );
                health.set_redis(up);
            }
            Err(_) => {
                health.set_redis(false);
                metrics.unreachable("redis");
            }
        }
    }
}
