//! Offset blocks reserved in PostgreSQL before Redis may hand them out.
//!
//! A stream (channel or inbox) assigns offsets only up to its `limit`, and a
//! limit is only ever a value this module got back from PostgreSQL's
//! `offset_blocks` table. So `reserved` there is at least every offset ever
//! assigned — including messages Redis lost in a crash and messages a worker
//! holds in memory — and an epoch started after any loss of Redis state
//! begins above it. A stream asks for its next block when half of one is
//! left, so a short PostgreSQL outage does not stop publishing.
//!
//! A gateway without a database (`--ephemeral`) reserves nothing: its blocks
//! are granted at once, and after Redis loses state a stream continues only
//! above what Redis itself still has.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sqlx::postgres::PgPool;

use chatcluster_protocol::stream::{StreamId, StreamKind};

use crate::history::{HistoryError, UNDEFINED_TABLE};

/// Reserve `$4` offsets for channel `$2` above `$3` and everything already reserved or stored.
const RESERVE_CHANNEL: &str = "\
INSERT INTO offset_blocks (kind, name, reserved)
VALUES ($1, $2, GREATEST($3, (SELECT COALESCE(MAX(channel_offset), 0) FROM messages WHERE channel = $2)) + $4)
ON CONFLICT (kind, name) DO UPDATE SET reserved = GREATEST(offset_blocks.reserved, $3) + $4
RETURNING reserved";

/// Reserve `$4` offsets for user `$2`'s inbox above `$3` and everything already reserved or stored.
const RESERVE_INBOX: &str = "\
INSERT INTO offset_blocks (kind, name, reserved)
VALUES ($1, $2, GREATEST($3, (SELECT COALESCE(MAX(inbox_offset), 0) FROM inbox WHERE user_name = $2)) + $4)
ON CONFLICT (kind, name) DO UPDATE SET reserved = GREATEST(offset_blocks.reserved, $3) + $4
RETURNING reserved";

/// A reserved block: offsets in `floor + 1..=limit` are the caller's; every
/// offset ever handed out for the stream before is at most `floor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Above every offset reserved before.
    pub floor: u64,
    /// The new limit.
    pub limit: u64,
}

/// Reserves offset blocks; cheap to clone.
#[derive(Debug, Clone)]
pub struct Blocks {
    pool: Option<PgPool>,
    size: u64,
    /// Streams whose next block is being reserved in the background.
    reserving: Arc<Mutex<HashSet<StreamId>>>,
}

/// Marks a background reservation in flight; ends it when dropped.
#[derive(Debug)]
pub struct Reserving {
    blocks: Blocks,
    stream: StreamId,
}

impl Drop for Reserving {
    fn drop(&mut self) {
        self.blocks
            .reserving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.stream);
    }
}

impl Blocks {
    /// Blocks of `size` offsets reserved in `pool` (`None`: granted without a database).
    pub fn new(pool: Option<PgPool>, size: u64) -> Self {
        Self {
            pool,
            size: size.max(2),
            reserving: Arc::default(),
        }
    }

    /// Offsets per block.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reserves the next block of `stream` above `at_least` (what Redis already has).
    pub async fn reserve(&self, stream: &StreamId, at_least: u64) -> Result<Block, HistoryError> {
        let Some(pool) = &self.pool else {
            return Ok(Block {
                floor: at_least,
                limit: at_least + self.size,
            });
        };
        let sql = match stream.kind {
            StreamKind::Channel => RESERVE_CHANNEL,
            StreamKind::Inbox => RESERVE_INBOX,
        };
        let at_least = i64::try_from(at_least).unwrap_or(i64::MAX - 2 * self.size as i64);
        let reserved: i64 = sqlx::query_scalar(sql)
            .bind(stream.kind.as_str())
            .bind(&*stream.name)
            .bind(at_least)
            .bind(self.size as i64)
            .fetch_one(pool)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some(UNDEFINED_TABLE) => {
                    HistoryError::NoSchema
                }
                _ => HistoryError::Database(e),
            })?;
        let limit = reserved.max(0) as u64;
        Ok(Block {
            floor: limit.saturating_sub(self.size),
            limit,
        })
    }

    /// Claims the background reservation of `stream`'s next block; `None`
    /// when one is already in flight.
    pub fn begin(&self, stream: &StreamId) -> Option<Reserving> {
        let fresh = self
            .reserving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream.clone());
        fresh.then(|| Reserving {
            blocks: self.clone(),
            stream: stream.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_database_blocks_are_granted_above_what_redis_has() {
        let blocks = Blocks::new(None, 100);
        let block = blocks.reserve(&StreamId::channel("c"), 250).await.unwrap();
        assert_eq!(
            block,
            Block {
                floor: 250,
                limit: 350
            }
        );
    }

    #[test]
    fn one_background_reservation_per_stream_at_a_time() {
        let blocks = Blocks::new(None, 100);
        let stream = StreamId::channel("c");
        let first = blocks.begin(&stream).expect("free");
        assert!(blocks.begin(&stream).is_none());
        assert!(blocks.begin(&StreamId::inbox("c")).is_some());
        drop(first);
        assert!(blocks.begin(&stream).is_some());
    }
}
