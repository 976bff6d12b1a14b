//! Reads of the permanent history the worker writes to PostgreSQL.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use chatcluster_protocol::entry::Timestamp;
use chatcluster_protocol::frame::ChannelMessage;

/// PostgreSQL error code of an undefined table (the worker has not migrated yet).
const UNDEFINED_TABLE: &str = "42P01";

/// A history read that failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No `DATABASE_URL` was configured.
    #[error("history is not configured on this gateway (no DATABASE_URL)")]
    NotConfigured,
    /// PostgreSQL failed or is unreachable.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
}

/// Pool of PostgreSQL connections for history reads.
#[derive(Debug, Clone)]
pub struct History {
    pool: Option<PgPool>,
}

impl History {
    /// Connects lazily (the gateway starts while PostgreSQL is down); `None`
    /// disables history. Every query of the pool runs with PostgreSQL's
    /// `statement_timeout` set to `statement_timeout`, so a slow or blocked
    /// read is cancelled by the server instead of holding a connection.
    pub fn new(
        database_url: Option<&str>,
        timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self, HistoryError> {
        let pool = database_url
            .map(|url| {
                let options = url.parse::<PgConnectOptions>()?.options([(
                    "statement_timeout",
                    statement_timeout.as_millis().max(1).to_string(),
                )]);
                Ok::<_, sqlx::Error>(
                    PgPoolOptions::new()
                        .max_connections(8)
                        .acquire_timeout(timeout)
                        .connect_lazy_with(options),
                )
            })
            .transpose()?;
        Ok(Self { pool })
    }

    fn pool(&self) -> Result<&PgPool, HistoryError> {
        self.pool.as_ref().ok_or(HistoryError::NotConfigured)
    }

    /// Whether a database is configured.
    pub fn is_configured(&self) -> bool {
        self.pool.is_some()
    }

    /// Up to `limit` messages of `channel` with offsets below `before`, newest last.
    pub async fn page(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelMessage>, HistoryError> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        let rows = sqlx::query(
            "SELECT channel_offset, msg_id, user_name, body, sent_at, clock FROM messages \
             WHERE channel = $1 AND channel_offset < $2 ORDER BY channel_offset DESC LIMIT $3",
        )
        .bind(channel)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(self.pool()?)
        .await;
        let rows = match rows {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => {
                Vec::new()
            }
            other => other?,
        };
        let mut messages = rows
            .into_iter()
            .map(|row| {
                Ok(ChannelMessage {
                    channel: channel.to_owned(),
                    offset: row.try_get::<i64, _>(0)?.max(0) as u64,
                    msg_id: row.try_get(1)?,
                    user: row.try_get(2)?,
                    text: row.try_get(3)?,
                    ts: Timestamp::from_datetime(row.try_get(4)?),
                    clock: row.try_get::<i64, _>(5)?.max(0) as u64,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        messages.reverse();
        Ok(messages)
    }

    /// The highest offset stored for `channel` (0 when none, or without a
    /// database): a new Redis epoch continues after it so offsets never repeat.
    pub async fn max_offset(&self, channel: &str) -> Result<u64, HistoryError> {
        let Ok(pool) = self.pool() else {
            return Ok(0);
        };
        let result = sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(MAX(channel_offset), 0) FROM messages WHERE channel = $1",
        )
        .bind(channel)
        .fetch_one(pool)
        .await;
        match result {
            Ok(max) => Ok(max.max(0) as u64),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}
