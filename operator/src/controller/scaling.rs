//! Autoscaler glue: reads the persistence lag of a cluster's Redis, with backoff while it
//! cannot, and turns it into a worker count through [`crate::autoscale`].
//!
//! While Redis cannot be read (still starting, network policy, outage) the lag is read again
//! only after a backoff (5 s doubling to 1 min) instead of on every reconcile, the warning is
//! logged once when reading starts failing, and the status says it once (condition
//! `ScalingActive=False`, reason `LagUnavailable`) until a read succeeds.
//!
//! Until a read has shown the workers' consumer groups on every shard (a worker has migrated
//! the schema the gateways publish into), at least one worker runs even with `minReplicas: 0`.

use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

use super::{Context, lock};
use crate::autoscale::{self, Stabilizer};
use crate::crd::ChatCluster;

/// First wait after a failed lag read.
const FIRST_LAG_RETRY: Duration = Duration::from_secs(5);
/// Longest wait between lag reads while they fail: short, so a Redis that comes up (or
/// back) is noticed soon.
const MAX_LAG_RETRY: Duration = Duration::from_secs(60);

/// Wait before the lag is read again after `failures` failed reads in a row.
fn lag_retry(failures: u32) -> Duration {
    let factor = 2_u32.saturating_pow(failures.saturating_sub(1));
    FIRST_LAG_RETRY.saturating_mul(factor).min(MAX_LAG_RETRY)
}

/// Autoscaler memory of one cluster.
#[derive(Debug)]
pub(crate) struct ScaleState {
    stabilizer: Stabilizer,
    /// Lag reads failed in a row.
    failures: u32,
    /// No read before this instant (backoff after failures).
    next_read: Instant,
    /// Why the last read failed.
    last_error: Option<String>,
    /// The last successful read found the workers' consumer group on every shard.
    prepared: bool,
}

impl ScaleState {
    fn new(now: Instant) -> Self {
        Self {
            stabilizer: Stabilizer::new(now),
            failures: 0,
            next_read: now,
            last_error: None,
            prepared: false,
        }
    }
}

/// The lag of one round, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lag {
    /// Entries not yet read by the workers.
    Known(i64),
    /// Redis could not be read; the message says why.
    Unavailable(String),
}

impl Lag {
    /// The lag when known.
    pub(crate) fn value(&self) -> Option<i64> {
        match self {
            Self::Known(lag) => Some(*lag),
            Self::Unavailable(_) => None,
        }
    }
}

/// Reads the lag of `cluster`'s Redis unless a failed read's backoff has not passed yet.
pub(crate) async fn read_lag(
    ctx: &Context,
    cluster: &ChatCluster,
    url: &str,
    ca: Option<&str>,
) -> Lag {
    let key = ObjectRef::from_obj(cluster);
    let now = Instant::now();
    {
        let mut states = lock(&ctx.scaling);
        let state = states
            .entry(key.clone())
            .or_insert_with(|| ScaleState::new(now));
        if now < state.next_read {
            let error = state.last_error.clone().unwrap_or_default();
            return Lag::Unavailable(error);
        }
    }
    let result = ctx.lag.total_lag(url, ca, cluster.spec.stream_shards).await;
    let mut states = lock(&ctx.scaling);
    let state = states.entry(key).or_insert_with(|| ScaleState::new(now));
    match result {
        Ok(backlog) => {
            let lag = backlog.lag;
            if state.failures > 0 {
                info!(lag, "persistence lag readable again");
            }
            if backlog.prepared != state.prepared {
                info!(
                    prepared = backlog.prepared,
                    "workers' consumer groups (created after the schema migrations) {}",
                    if backlog.prepared {
                        "found on every shard"
                    } else {
                        "missing"
                    }
                );
            }
            state.failures = 0;
            state.last_error = None;
            state.next_read = now;
            state.prepared = backlog.prepared;
            Lag::Known(lag)
        }
        Err(error) => {
            state.failures = state.failures.saturating_add(1);
            let wait = lag_retry(state.failures);
            state.next_read = now + wait;
            if state.failures == 1 {
                warn!(%error, "persistence lag unavailable; keeping the worker count");
            } else {
                debug!(%error, retry_in = ?wait, "persistence lag still unavailable");
            }
            let message = error.to_string();
            state.last_error = Some(message.clone());
            Lag::Unavailable(message)
        }
    }
}

/// Worker replicas for this round: from the lag when known, else the current count, always
/// within the spec's bounds, and at least one until a read has shown the workers prepared
/// the database and Redis ([`autoscale::worker_floor`]).
pub(crate) fn scale_workers(
    ctx: &Context,
    cluster: &ChatCluster,
    current: i32,
    lag: Option<i64>,
) -> i32 {
    let worker = &cluster.spec.worker;
    let now = Instant::now();
    let mut states = lock(&ctx.scaling);
    let state = states
        .entry(ObjectRef::from_obj(cluster))
        .or_insert_with(|| ScaleState::new(now));
    let min = autoscale::worker_floor(worker.min_replicas, worker.max_replicas, state.prepared);
    let bounded = |replicas: i32| replicas.clamp(min, worker.max_replicas.max(min));
    let Some(lag) = lag else {
        return bounded(current);
    };
    let recommended =
        autoscale::replicas_for_lag(lag, worker.target_lag_per_replica, min, worker.max_replicas);
    let window =
        Duration::from_secs(u64::try_from(worker.scale_down_stabilization_seconds).unwrap_or(0));
    bounded(
        state
            .stabilizer
            .stabilize(now, bounded(current), recommended, window),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_retries_double_up_to_a_minute() {
        assert_eq!(lag_retry(1), Duration::from_secs(5));
        assert_eq!(lag_retry(2), Duration::from_secs(10));
        assert_eq!(lag_retry(4), Duration::from_secs(40));
        assert_eq!(lag_retry(5), Duration::from_secs(60));
        assert_eq!(lag_retry(u32::MAX), Duration::from_secs(60));
    }
}
