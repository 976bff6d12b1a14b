//! Where a channel's offsets start when Redis has no epoch for it.
//!
//! Offsets must never repeat in PostgreSQL, where `(channel, offset)` is
//! unique, so a new epoch (first use, or Redis lost the channel) continues
//! after the highest offset already stored there.

use crate::history::{History, HistoryError};
use crate::store::{Position, Registry, Store, StoreError};

/// Why an epoch could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// PostgreSQL failed.
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Starts the channel's epoch if it has none (another gateway may have just
/// done so: then that epoch is returned).
pub async fn start(
    store: &Store,
    history: &History,
    channel: &str,
) -> Result<Position, EpochError> {
    // A new epoch may mean Redis lost everything: register the name again.
    store.register(Registry::Channels, channel).await?;
    let floor = history.max_offset(channel).await?;
    let position = store.init_channel(channel, floor).await?;
    tracing::info!(%channel, epoch = %position.epoch, floor, "channel epoch started");
    Ok(position)
}
