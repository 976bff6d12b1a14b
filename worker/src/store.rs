//! PostgreSQL: schema migrations and the idempotent batch write.
//!
//! One batch is one transaction, and writing it twice adds no row: a message or
//! direct message whose `msg_id` is already stored is skipped
//! (`ON CONFLICT (msg_id) DO NOTHING`), as are inbox rows already there
//! (`(user_name, msg_id)`) and users and channels already registered.
//! At-least-once from the stream, exactly-once in the tables.
//!
//! A direct message arrives twice by design (once per inbox it enters, often
//! in different batches), so `direct_messages` is always written with
//! `ON CONFLICT (msg_id) DO NOTHING`; `conversations` keeps the newest message
//! per user and partner (an upsert that only moves forward).
//!
//! The conflict target is the message id only: a *different* message at a
//! `(channel, channel_offset)` — or `(user_name, inbox_offset)` — already taken
//! (an offset reused) still fails the insert on the primary key, and the
//! worker moves it to the dead letters ([`clash`]) instead of dropping it
//! without a word.
//!
//! `ON CONFLICT` costs about 40 % of an insert's time, and redelivery is rare
//! (a crash between commit and `XACK`). So messages and inbox rows are
//! first written without it, optimistically; if that transaction fails on a
//! unique violation it is rolled back whole and written again [`Insert::Idempotent`].
//! Users and channels (few rows, often re-registered) always use `ON CONFLICT`.
//!
//! Two write paths exist ([`WriteMode`]); both send each table's rows in one
//! statement: `UNNEST` of binary arrays, or `COPY` (straight into the table on
//! the optimistic path, through a temporary staging table on the idempotent one).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Executor, PgConnection};

use crate::batch::{DirectRow, InboxRow, MessageRow, NameRow, Rows};
use crate::config::WriteMode;
use crate::error::{Error, Result};

/// The schema migrations in `worker/migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const STAGING: &str = "\
CREATE TEMP TABLE IF NOT EXISTS stage_messages (channel text, channel_offset bigint, msg_id uuid, \
 user_name text, body text, sent_at timestamptz, clock bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_directs (msg_id uuid, from_user text, to_user text, body text, \
 sent_at timestamptz, clock bigint) ON COMMIT DELETE ROWS;";

/// `INSERT ... SELECT FROM UNNEST` of messages; [`ON_CONFLICT`] is appended on the idempotent path.
const MESSAGES_UNNEST: &str = "\
INSERT INTO messages (channel, channel_offset, msg_id, user_name, body, sent_at, clock)
SELECT c, o, m, u, b, timestamptz 'epoch' + t * interval '1 millisecond', k
FROM UNNEST($1::text[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::int8[], $7::int8[])
     AS r(c, o, m, u, b, t, k)";

const MESSAGES_UNNEST_IDEMPOTENT: &str = "\
INSERT INTO messages (channel, channel_offset, msg_id, user_name, body, sent_at, clock)
SELECT c, o, m, u, b, timestamptz 'epoch' + t * interval '1 millisecond', k
FROM UNNEST($1::text[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::int8[], $7::int8[])
     AS r(c, o, m, u, b, t, k)
ON CONFLICT (msg_id) DO NOTHING";

const MESSAGES_COPY: &str = "\
COPY messages (channel, channel_offset, msg_id, user_name, body, sent_at, clock) FROM STDIN";

const MESSAGES_FROM_STAGE: &str = "\
INSERT INTO messages (channel, channel_offset, msg_id, user_name, body, sent_at, clock)
SELECT channel, channel_offset, msg_id, user_name, body, sent_at, clock
FROM stage_messages
ON CONFLICT (msg_id) DO NOTHING";

const DIRECTS_UNNEST_IDEMPOTENT: &str = "\
INSERT INTO direct_messages (msg_id, from_user, to_user, body, sent_at, clock)
SELECT m, f, t, b, timestamptz 'epoch' + s * interval '1 millisecond', k
FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[])
     AS r(m, f, t, b, s, k)
ON CONFLICT (msg_id) DO NOTHING";

const DIRECTS_FROM_STAGE: &str = "\
INSERT INTO direct_messages (msg_id, from_user, to_user, body, sent_at, clock)
SELECT msg_id, from_user, to_user, body, sent_at, clock
FROM stage_directs
ON CONFLICT (msg_id) DO NOTHING";

const INBOX_UNNEST: &str = "\
INSERT INTO inbox (user_name, inbox_offset, msg_id, partner)
SELECT u, o, m, p FROM UNNEST($1::text[], $2::int8[], $3::uuid[], $4::text[]) AS r(u, o, m, p)";

const INBOX_UNNEST_IDEMPOTENT: &str = "\
INSERT INTO inbox (user_name, inbox_offset, msg_id, partner)
SELECT u, o, m, p FROM UNNEST($1::text[], $2::int8[], $3::uuid[], $4::text[]) AS r(u, o, m, p)
ON CONFLICT (user_name, msg_id) DO NOTHING";

/// The newest message per user and partner; never moves back.
const CONVERSATIONS_UPSERT: &str = "\
INSERT INTO conversations (user_name, partner, last_offset, msg_id)
SELECT u, p, o, m FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::uuid[]) AS r(u, p, o, m)
ON CONFLICT (user_name, partner) DO UPDATE
SET last_offset = EXCLUDED.last_offset, msg_id = EXCLUDED.msg_id
WHERE conversations.last_offset < EXCLUDED.last_offset";

const USERS_UNNEST: &str = "\
INSERT INTO users (name, created_at)
SELECT n, timestamptz 'epoch' + t * interval '1 millisecond'
FROM UNNEST($1::text[], $2::int8[]) AS r(n, t)
ON CONFLICT DO NOTHING";

const CHANNELS_UNNEST: &str = "\
INSERT INTO channels (name, created_at)
SELECT n, timestamptz 'epoch' + t * interval '1 millisecond'
FROM UNNEST($1::text[], $2::int8[]) AS r(n, t)
ON CONFLICT DO NOTHING";

/// How a transaction treats rows that already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Plain inserts: fastest, and fails whole on a unique violation.
    Optimistic,
    /// `ON CONFLICT (msg_id) DO NOTHING` (names: `ON CONFLICT DO NOTHING`):
    /// rows already present are skipped.
    Idempotent,
}

/// The primary key of `messages`: `(channel, channel_offset)`.
const MESSAGES_PKEY: &str = "messages_pkey";
/// The primary key of `inbox`: `(user_name, inbox_offset)`.
const INBOX_PKEY: &str = "inbox_pkey";

/// Rows inserted by one transaction, per table (rows already present are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// New `messages` rows.
    pub messages: u64,
    /// New `direct_messages` rows.
    pub directs: u64,
    /// New `inbox` rows.
    pub inbox: u64,
    /// New `users` rows.
    pub users: u64,
    /// New `channels` rows.
    pub channels: u64,
}

/// The worker's PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    mode: WriteMode,
}

impl Store {
    /// A pool that connects on first use, so the worker starts (and reports
    /// not ready) while PostgreSQL is still down.
    pub fn connect_lazy(url: &str, mode: WriteMode, writers: usize) -> Result<Self> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|source| Error::DatabaseUrl { source })?;
        let mut pool = PgPoolOptions::new()
            .max_connections(writers as u32 + 1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3));
        if mode == WriteMode::Copy {
            // Each session gets its own staging tables, emptied at every commit.
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move { conn.execute(STAGING).await.map(drop) })
            });
        }
        let pool = pool.connect_lazy_with(options.application_name("chatcluster-worker"));
        Ok(Self { pool, mode })
    }

    /// The pool (for probes and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the schema migrations (serialised across workers by an advisory lock).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// One round trip to check PostgreSQL answers.
    pub async fn ping(&self) -> Result<()> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    /// Writes `rows` in one transaction, skipping rows already present;
    /// nothing is written when it fails.
    pub async fn write(&self, rows: &Rows) -> Result<Written, sqlx::Error> {
        match self.write_with(rows, Insert::Optimistic).await {
            Err(error) if is_unique_violation(&error) => {
                tracing::debug!(%error, "batch holds rows already written: writing it idempotently");
                self.write_with(rows, Insert::Idempotent).await
            }
            other => other,
        }
    }

    /// The id of the direct message stored at `offset` of `user`'s inbox, if any.
    pub async fn inbox_at(&self, user: &str, offset: i64) -> Result<Option<uuid::Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT msg_id FROM inbox WHERE user_name = $1 AND inbox_offset = $2",
        )
        .bind(user)
        .bind(offset)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The id of the message stored at `offset` of `channel`, if any.
    pub async fn message_at(&self, channel: &str, offset: i64) -> Result<Option<uuid::Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT msg_id FROM messages WHERE channel = $1 AND channel_offset = $2",
        )
        .bind(channel)
        .bind(offset)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Writes `rows` in one transaction, treating existing rows as `insert` says.
    pub async fn write_with(&self, rows: &Rows, insert: Insert) -> Result<Written, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut written = Written::default();
        if !rows.messages.is_empty() {
            written.messages = match (self.mode, insert) {
                (WriteMode::Unnest, Insert::Optimistic) => {
                    insert_messages(&mut tx, MESSAGES_UNNEST, &rows.messages).await?
                }
                (WriteMode::Unnest, Insert::Idempotent) => {
                    insert_messages(&mut tx, MESSAGES_UNNEST_IDEMPOTENT, &rows.messages).await?
                }
                (WriteMode::Copy, Insert::Optimistic) => {
                    copy_messages(&mut tx, MESSAGES_COPY, &rows.messages).await?
                }
                (WriteMode::Copy, Insert::Idempotent) => {
                    copy_messages(&mut tx, "COPY stage_messages FROM STDIN", &rows.messages)
                        .await?;
                    tx.execute(MESSAGES_FROM_STAGE).await?.rows_affected()
                }
            };
        }
        if !rows.directs.is_empty() {
            // Each direct message comes once per inbox: always idempotent.
            written.directs = match self.mode {
                WriteMode::Unnest => {
                    insert_directs(&mut tx, DIRECTS_UNNEST_IDEMPOTENT, &rows.directs).await?
                }
                WriteMode::Copy => {
                    copy_directs(&mut tx, "COPY stage_directs FROM STDIN", &rows.directs).await?;
                    tx.execute(DIRECTS_FROM_STAGE).await?.rows_affected()
                }
            };
        }
        if !rows.inbox.is_empty() {
            let sql = match insert {
                Insert::Optimistic => INBOX_UNNEST,
                Insert::Idempotent => INBOX_UNNEST_IDEMPOTENT,
            };
            written.inbox = insert_inbox(&mut tx, sql, &rows.inbox).await?;
            upsert_conversations(&mut tx, &rows.inbox).await?;
        }
        if !rows.users.is_empty() {
            written.users = insert_names(&mut tx, USERS_UNNEST, &rows.users).await?;
        }
        if !rows.channels.is_empty() {
            written.channels = insert_names(&mut tx, CHANNELS_UNNEST, &rows.channels).await?;
        }
        tx.commit().await?;
        Ok(written)
    }
}

/// Whether the error is a unique violation (SQLSTATE 23505).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Whether a write failed because a message's `(channel, channel_offset)`
/// (or a direct message's `(user_name, inbox_offset)`) already holds a
/// message with another id: an offset used twice.
pub fn clash(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505")
            && matches!(db.constraint(), Some(MESSAGES_PKEY | INBOX_PKEY)))
}

/// Whether a failed write will fail the same way on every retry, because of
/// the data (SQLSTATE classes 22 data exception, 23 integrity violation,
/// 54 program limit such as an index row too large). Connection loss, shutdown,
/// timeouts and everything else are worth retrying.
pub fn is_permanent(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
        }),
        _ => false,
    }
}

async fn insert_messages(
    conn: &mut PgConnection,
    sql: &'static str,
    rows: &[MessageRow],
) -> Result<u64, sqlx::Error> {
    let n = rows.len();
    let (mut c, mut o, mut m, mut u, mut b, mut t, mut k) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for row in rows {
        c.push(row.channel.as_str());
        o.push(row.offset);
        m.push(row.msg_id);
        u.push(row.user.as_str());
        b.push(row.body.as_str());
        t.push(row.sent_at_ms);
        k.push(row.clock);
    }
    let done = sqlx::query(sql)
        .bind(c)
        .bind(o)
        .bind(m)
        .bind(u)
        .bind(b)
        .bind(t)
        .bind(k)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

async fn insert_directs(
    conn: &mut PgConnection,
    sql: &'static str,
    rows: &[DirectRow],
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(sql)
        .bind(rows.iter().map(|r| r.msg_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.from.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.to.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.body.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.sent_at_ms).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.clock).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

async fn insert_inbox(
    conn: &mut PgConnection,
    sql: &'static str,
    rows: &[InboxRow],
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(sql)
        .bind(rows.iter().map(|r| r.user.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.offset).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.msg_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.partner.as_str()).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// The newest inbox row per user and partner, in key order (so concurrent
/// transactions lock conversation rows in the same order).
fn newest_per_conversation(rows: &[InboxRow]) -> Vec<&InboxRow> {
    let mut newest: std::collections::BTreeMap<(&str, &str), &InboxRow> = Default::default();
    for row in rows {
        let slot = newest
            .entry((row.user.as_str(), row.partner.as_str()))
            .or_insert(row);
        if slot.offset < row.offset {
            *slot = row;
        }
    }
    newest.into_values().collect()
}

async fn upsert_conversations(
    conn: &mut PgConnection,
    rows: &[InboxRow],
) -> Result<(), sqlx::Error> {
    let newest = newest_per_conversation(rows);
    sqlx::query(CONVERSATIONS_UPSERT)
        .bind(newest.iter().map(|r| r.user.as_str()).collect::<Vec<_>>())
        .bind(
            newest
                .iter()
                .map(|r| r.partner.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(newest.iter().map(|r| r.offset).collect::<Vec<_>>())
        .bind(newest.iter().map(|r| r.msg_id).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(())
}

async fn insert_names(
    conn: &mut PgConnection,
    sql: &'static str,
    rows: &[NameRow],
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(sql)
        .bind(rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.created_ms).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// `COPY`s messages with `statement` (into `messages` or the staging table).
async fn copy_messages(
    conn: &mut PgConnection,
    statement: &'static str,
    rows: &[MessageRow],
) -> Result<u64, sqlx::Error> {
    let mut data = Vec::with_capacity(rows.iter().map(|r| r.body.len() + 128).sum());
    for row in rows {
        copy_field(&mut data, &row.channel);
        copy_number(&mut data, row.offset);
        copy_uuid(&mut data, row.msg_id);
        copy_field(&mut data, &row.user);
        copy_field(&mut data, &row.body);
        copy_timestamp(&mut data, row.sent_at_ms);
        copy_last(&mut data, row.clock);
    }
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await
}

/// `COPY`s direct messages with `statement` (into `direct_messages` or the staging table).
async fn copy_directs(
    conn: &mut PgConnection,
    statement: &'static str,
    rows: &[DirectRow],
) -> Result<u64, sqlx::Error> {
    let mut data = Vec::with_capacity(rows.iter().map(|r| r.body.len() + 128).sum());
    for row in rows {
        copy_uuid(&mut data, row.msg_id);
        copy_field(&mut data, &row.from);
        copy_field(&mut data, &row.to);
        copy_field(&mut data, &row.body);
        copy_timestamp(&mut data, row.sent_at_ms);
        copy_last(&mut data, row.clock);
    }
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await
}

fn copy_uuid(out: &mut Vec<u8>, id: uuid::Uuid) {
    let mut buf = uuid::Uuid::encode_buffer();
    out.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
    out.push(b'\t');
}

/// A timestamp in ms as COPY text (`2026-11-22 20:00:00.123+00`), then a tab.
fn copy_timestamp(out: &mut Vec<u8>, ms: i64) {
    use std::io::Write as _;
    let time = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let _ = write!(out, "{}+00\t", time.format("%Y-%m-%d %H:%M:%S%.3f"));
}

/// Appends `text` escaped for COPY's text format, then a tab.
fn copy_field(out: &mut Vec<u8>, text: &str) {
    for &byte in text.as_bytes() {
        match byte {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            other => out.push(other),
        }
    }
    out.push(b'\t');
}

fn copy_number(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(n.to_string().as_bytes());
    out.push(b'\t');
}

fn copy_last(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(n.to_string().as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_separators() {
        let mut out = Vec::new();
        copy_field(&mut out, "a\tb\nc\\d\re");
        copy_number(&mut out, -5);
        copy_last(&mut out, 7);
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re\t-5\t7\n");
        out.clear();
        copy_timestamp(&mut out, 1_795_000_000_123);
        copy_uuid(&mut out, uuid::Uuid::from_u128(1));
        assert_eq!(
            out,
            b"2026-11-18 11:06:40.123+00\t00000000-0000-0000-0000-000000000001\t"
        );
    }

    #[test]
    fn one_conversation_row_per_user_and_partner_with_the_newest_message() {
        let row = |user: &str, partner: &str, offset| InboxRow {
            user: user.into(),
            offset,
            msg_id: uuid::Uuid::from_u128(offset as u128),
            partner: partner.into(),
        };
        let rows = [
            row("bob", "alice", 4),
            row("alice", "bob", 9),
            row("bob", "alice", 7),
            row("bob", "carol", 5),
        ];
        let newest: Vec<_> = newest_per_conversation(&rows)
            .iter()
            .map(|r| (r.user.as_str(), r.partner.as_str(), r.offset))
            .collect();
        assert_eq!(
            newest,
            [
                ("alice", "bob", 9),
                ("bob", "alice", 7),
                ("bob", "carol", 5)
            ]
        );
    }

    #[test]
    fn only_data_errors_are_permanent() {
        assert!(!is_permanent(&sqlx::Error::PoolTimedOut));
        assert!(!is_permanent(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
    }
}
