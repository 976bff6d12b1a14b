//! Carries out a sequencer's [`Fetch`]: one atomic Redis read of the stream's
//! position and history range, starting the stream's epoch first when asked.
//! An inbox whose epoch cannot be started (PostgreSQL down) is read as one
//! without an epoch, so users still log in: its first direct message starts it.

use chatcluster_protocol::stream::{StreamId, StreamKind};

use crate::blocks::Blocks;
use crate::delivery::sequencer::{Fetch, Fetched, ReadFrom};
use crate::epochs;
use crate::store::Store;

/// Runs `fetch` for `stream`; the error is a message for logs.
pub async fn run(
    store: &Store,
    blocks: &Blocks,
    stream: &StreamId,
    fetch: &Fetch,
) -> Result<Fetched, String> {
    let (from, until) = match fetch.range {
        Some((ReadFrom::Start, until)) => (None, until),
        Some((ReadFrom::After(offset), until)) => (Some(offset.saturating_add(1)), until),
        None => (None, None),
    };
    let (position, messages) = store
        .read(stream, from, until, fetch.range.is_some())
        .await
        .map_err(|e| e.to_string())?;
    let position = match position {
        None if fetch.start_epoch => match epochs::start(store, blocks, stream).await {
            Ok(position) => Some(position),
            Err(error) if stream.kind == StreamKind::Inbox => {
                tracing::warn!(%stream, %error, "inbox epoch not started yet");
                None
            }
            Err(error) => return Err(error.to_string()),
        },
        other => other,
    };
    Ok(Fetched { position, messages })
}
