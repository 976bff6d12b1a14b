//! The heartbeat: keeps the entries this worker holds its own.
//!
//! Entries held longer than a third of `CLAIM_IDLE` (a write retried during an
//! outage, a long queue) are re-claimed with `XCLAIM ... JUSTID`, which resets
//! their idle time without counting a delivery, so no live worker's entries are
//! claimed by another.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::in_flight::InFlight;
use crate::streams::Streams;

/// Re-claims entries held for `every` or longer, every `every`, until `done`.
pub async fn keep_claimed(
    mut streams: Streams,
    in_flight: Arc<InFlight>,
    every: Duration,
    done: CancellationToken,
) {
    let every = every.max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = done.cancelled() => return,
        }
        let held = in_flight.older_than(every);
        if held.is_empty() {
            continue;
        }
        match streams.keep_claimed(&held, every / 2).await {
            Ok(()) => tracing::debug!(entries = held.len(), "re-claimed entries still in flight"),
            Err(error) => tracing::warn!(%error, "re-claiming entries in flight failed"),
        }
    }
}
