//! Writing to a sequenced stream so that its offsets are never reused.
//!
//! A stream (channel or inbox) hands out offsets only inside blocks reserved
//! in PostgreSQL ([`crate::blocks`]), and its epoch belongs to one generation
//! of Redis ([`crate::life`]). [`append`] does what a write needs: when Redis
//! has no valid epoch for the stream (first use, a wipe, or a restart that may
//! have lost writes) it starts one above every offset ever reserved, and when
//! the stream's block is used up it reserves the next one, then retries.

use chatcluster_protocol::stream::{StreamId, StreamKind};

use crate::blocks::Blocks;
use crate::history::HistoryError;
use crate::metrics::Metrics;
use crate::store::{Append, Appended, Position, Registry, Store, StoreError};

/// How often a write may meet a missing epoch or block before giving up
/// (each retry follows a successful start or reservation, so more than two
/// means other gateways keep changing the stream: then the caller retries).
const ATTEMPTS: usize = 4;

/// Why an epoch could not be started or a write not be made.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// PostgreSQL failed (no block could be reserved).
    #[error(transparent)]
    Database(#[from] HistoryError),
    /// The stream's epoch or block kept changing under the write.
    #[error("{0}: its epoch or offset block kept changing")]
    Contended(StreamId),
}

/// Starts the stream's epoch if it has none valid (another gateway may have
/// just done so: then that epoch is returned), above every offset reserved.
pub async fn start(
    store: &Store,
    blocks: &Blocks,
    stream: &StreamId,
) -> Result<Position, EpochError> {
    if stream.kind == StreamKind::Channel {
        // A new epoch may mean Redis lost everything: register the name again.
        store.register(Registry::Channels, &stream.name).await?;
    }
    let block = blocks.reserve(stream, 0).await?;
    let (position, limit, started) = store.init_epoch(stream, block.floor, block.limit).await?;
    if started {
        tracing::info!(%stream, epoch = %position.epoch, floor = position.top, limit, "epoch started");
    }
    Ok(position)
}

/// Reserves the next block of `stream` above `at_least` and raises its limit
/// if `epoch` is still its epoch.
pub async fn extend(
    store: &Store,
    blocks: &Blocks,
    stream: &StreamId,
    epoch: &str,
    at_least: u64,
) -> Result<(), EpochError> {
    let block = blocks.reserve(stream, at_least).await?;
    if store.extend_block(stream, epoch, block.limit).await? {
        tracing::debug!(%stream, %epoch, limit = block.limit, "offset block reserved");
    }
    Ok(())
}

/// Appends to the stream, starting its epoch and reserving blocks as needed.
/// When the block runs low, the next one is reserved in the background.
///
/// A write that waits for an epoch or a block is sent again after it: writes
/// sent meanwhile (a connection's pipelined publishes) may take the offsets
/// before it. Each is still stored once; only their order may differ from
/// the order they were sent in.
///
/// When Redis may have run the append without answering, an append with an
/// idempotency record is sent once more: if Redis answers now, the record
/// tells what happened. If it does not, the outcome stays unknown, and the
/// first error (not the retry's) is returned.
pub async fn append(
    store: &Store,
    blocks: &Blocks,
    metrics: &Metrics,
    append: &Append<'_>,
) -> Result<Appended, EpochError> {
    let stream = append.stream;
    let mut result = store.append(append).await;
    let mut unknown = None::<StoreError>;
    for _ in 0..ATTEMPTS {
        match result {
            Ok(appended) => {
                if appended.replayed {
                    metrics.idempotent_replays_total.inc();
                }
                if let Some(limit) = appended.running_low {
                    reserve_ahead(store, blocks, stream, &appended.epoch, limit);
                }
                return Ok(appended);
            }
            Err(StoreError::NoEpoch) => {
                start(store, blocks, stream).await?;
                metrics.epochs_started_total.inc();
            }
            Err(StoreError::NoBlock { epoch, top }) => {
                extend(store, blocks, stream, &epoch, top).await?;
            }
            Err(error)
                if error.outcome_unknown() && append.record.is_some() && unknown.is_none() =>
            {
                tracing::debug!(%stream, %error, "append unanswered: asking again with its idempotency record");
                unknown = Some(error);
            }
            Err(error) => return Err(unknown.unwrap_or(error).into()),
        }
        result = store.append(append).await;
    }
    Err(unknown.map_or_else(|| EpochError::Contended(stream.clone()), EpochError::from))
}

/// Reserves the block after `limit` in a task of its own, unless one is
/// already being reserved; a failure is only logged (the write that finds the
/// block used up reserves it again).
fn reserve_ahead(store: &Store, blocks: &Blocks, stream: &StreamId, epoch: &str, limit: u64) {
    let Some(reserving) = blocks.begin(stream) else {
        return;
    };
    let (store, blocks, stream, epoch) = (
        store.clone(),
        blocks.clone(),
        stream.clone(),
        epoch.to_owned(),
    );
    tokio::spawn(async move {
        if let Err(error) = extend(&store, &blocks, &stream, &epoch, limit).await {
            tracing::warn!(%stream, %error, "next offset block not reserved yet");
        }
        drop(reserving);
    });
}
