//! Reads of the permanent history the worker writes to PostgreSQL: channel
//! pages, inbox pages of one conversation, and a user's conversations.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use chatcluster_protocol::entry::Timestamp;
use chatcluster_protocol::frame::{ChannelMessage, Conversation, DirectMessage};

/// PostgreSQL error code of an undefined table (the worker has not migrated yet).
pub const UNDEFINED_TABLE: &str = "42P01";

/// A page of one conversation in a user's inbox, newest first.
const INBOX_PAGE: &str = "\
SELECT i.inbox_offset, d.msg_id, d.from_user, d.to_user, d.body, d.sent_at, d.clock
FROM inbox i JOIN direct_messages d ON d.msg_id = i.msg_id
WHERE i.user_name = $1 AND i.partner = $2 AND i.inbox_offset < $3
ORDER BY i.inbox_offset DESC LIMIT $4";

/// A user's conversations with their newest message, newest first.
const CONVERSATIONS: &str = "\
SELECT c.last_offset, d.msg_id, d.from_user, d.to_user, d.body, d.sent_at, d.clock, c.partner
FROM conversations c JOIN direct_messages d ON d.msg_id = c.msg_id
WHERE c.user_name = $1 AND c.last_offset < $2
ORDER BY c.last_offset DESC LIMIT $3";

/// A history read that failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// No `DATABASE_URL` was configured.
    #[error("history is not configured on this gateway (no DATABASE_URL)")]
    NotConfigured,
    /// PostgreSQL failed or is unreachable.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// The tables do not exist yet (the worker creates them when it starts).
    #[error("the database has no chatcluster schema yet (the worker applies it at start)")]
    NoSchema,
}

/// Binds an optional exclusive upper offset as a bigint.
fn below(before: Option<u64>) -> i64 {
    before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX))
}

/// Rows of an undefined table read as none (the worker has not migrated yet).
fn or_none<T>(rows: Result<Vec<T>, sqlx::Error>) -> Result<Vec<T>, HistoryError> {
    match rows {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => {
            Ok(Vec::new())
        }
        other => Ok(other?),
    }
}

/// A direct message from the columns `offset, msg_id, from, to, body, sent_at, clock`.
fn direct_row(row: &sqlx::postgres::PgRow) -> Result<DirectMessage, sqlx::Error> {
    Ok(DirectMessage {
        offset: Some(row.try_get::<i64, _>(0)?.max(0) as u64),
        msg_id: row.try_get(1)?,
        from: row.try_get(2)?,
        to: row.try_get(3)?,
        text: row.try_get(4)?,
        ts: Timestamp::from_datetime(row.try_get(5)?),
        clock: row.try_get::<i64, _>(6)?.max(0) as u64,
    })
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

    /// The connection pool, when a database is configured.
    pub fn pool_handle(&self) -> Option<PgPool> {
        self.pool.clone()
    }

    /// Up to `limit` messages of `channel` with offsets below `before`, newest last.
    pub async fn page(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelMessage>, HistoryError> {
        let rows = sqlx::query(
            "SELECT channel_offset, msg_id, user_name, body, sent_at, clock FROM messages \
             WHERE channel = $1 AND channel_offset < $2 ORDER BY channel_offset DESC LIMIT $3",
        )
        .bind(channel)
        .bind(below(before))
        .bind(i64::from(limit))
        .fetch_all(self.pool()?)
        .await;
        let mut messages = or_none(rows)?
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

    /// Up to `limit` messages of `user`'s conversation with `with` at inbox
    /// offsets below `before`, newest last.
    pub async fn inbox_page(
        &self,
        user: &str,
        with: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<DirectMessage>, HistoryError> {
        let rows = sqlx::query(INBOX_PAGE)
            .bind(user)
            .bind(with)
            .bind(below(before))
            .bind(i64::from(limit))
            .fetch_all(self.pool()?)
            .await;
        let mut messages = or_none(rows)?
            .iter()
            .map(direct_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        messages.reverse();
        Ok(messages)
    }

    /// Up to `limit` of `user`'s conversations whose newest message is below
    /// inbox offset `before`, newest first.
    pub async fn conversations(
        &self,
        user: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Conversation>, HistoryError> {
        let rows = sqlx::query(CONVERSATIONS)
            .bind(user)
            .bind(below(before))
            .bind(i64::from(limit))
            .fetch_all(self.pool()?)
            .await;
        Ok(or_none(rows)?
            .iter()
            .map(|row| {
                Ok(Conversation {
                    last: direct_row(row)?,
                    with: row.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?)
    }
}
