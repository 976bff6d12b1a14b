//! Redis side of the worker: the `persist` consumer group on every shard.
//!
//! Reading (`XREADGROUP`); taking entries back from a pending list
//! (`XPENDING` for their ids and delivery counts, `XCLAIM ... JUSTID` to own
//! them without counting a delivery, `XRANGE` for their fields); recording a
//! delivery (`XCLAIM ... RETRYCOUNT`); keeping in-flight entries ours; and
//! finishing a batch: dead letters written, entries acknowledged and deleted,
//! all in one `MULTI`/`EXEC` so an entry is never acknowledged without its dead
//! letter and never left in the stream once acknowledged. Deleting acknowledged
//! entries (`XACK` + `XDEL`) keeps a stream's length equal to its backlog.

use std::collections::BTreeMap;
use std::time::Duration;

use chatcluster_protocol::keys::{PERSIST_GROUP, dead_letter_key, persist_key};
use redis::aio::ConnectionManager;
use redis::streams::{StreamInfoGroupsReply, StreamReadOptions};
use redis::{AsyncCommands, Value};

use crate::batch::Batch;
use crate::dead_letters;
use crate::error::{Error, Result};
use crate::reply::{self, Delivery, EntryKey, Pending, RawEntry};

/// Deletes a consumer only if it holds no pending entry, atomically: deleting
/// a consumer drops its pending entries, which would then never be delivered.
/// `KEYS[1]` stream, `ARGV[1]` group, `ARGV[2]` consumer; -1 when kept.
const DELETE_IDLE_CONSUMER: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
";

/// A connection to Redis with the stream layout of this worker.
#[derive(Clone)]
pub struct Streams {
    conn: ConnectionManager,
    keys: Vec<String>,
    consumer: String,
}

/// Backlog of one shard, from `XINFO GROUPS` and `XLEN`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardLag {
    /// Entries not yet delivered to the group.
    pub lag: u64,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Entries in the shard's dead-letter stream.
    pub dead: u64,
}

/// Which part of a group's pending list to list.
#[derive(Debug, Clone, Copy)]
pub enum Holder<'a> {
    /// This consumer's entries, however recently delivered.
    Me,
    /// Any consumer's entries idle for at least this long.
    IdleFor(Duration),
    /// The named consumer's entries (tests and tools).
    Consumer(&'a str),
}

/// Connects lazily to `url`; `response_timeout` must exceed the longest `BLOCK`.
pub fn connect(url: &str, response_timeout: Duration) -> Result<ConnectionManager> {
    let client = redis::Client::open(url).map_err(|source| Error::RedisUrl {
        url: crate::config::redact_url(url),
        source,
    })?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

impl Streams {
    /// The streams of `shards` shards, read as consumer `consumer`.
    pub fn new(conn: ConnectionManager, shards: u32, consumer: &str) -> Self {
        Self {
            conn,
            keys: (0..shards).map(persist_key).collect(),
            consumer: consumer.to_owned(),
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.keys.len() as u32
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn shard_of_key(&self, key: &str) -> Option<u32> {
        self.keys.iter().position(|k| k == key).map(|i| i as u32)
    }

    /// Creates the group on every shard (and the stream, at id 0) where missing.
    pub async fn ensure_groups(&mut self) -> Result<()> {
        for key in &self.keys {
            let created: redis::RedisResult<()> = self
                .conn
                .xgroup_create_mkstream(key, PERSIST_GROUP, "0")
                .await;
            match created {
                Ok(()) => {
                    tracing::info!(stream = %key, group = PERSIST_GROUP, "created consumer group")
                }
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// `XREADGROUP`: `ids[shard]` is `>` for new entries or an id to re-read this
    /// consumer's own pending entries after it; up to `count` per shard,
    /// blocking up to `block` (only honoured when every id is `>`).
    pub async fn read(
        &mut self,
        ids: &[String],
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<RawEntry>> {
        let mut options = StreamReadOptions::default()
            .group(PERSIST_GROUP, &self.consumer)
            .count(count);
        if let Some(block) = block {
            options = options.block(block.as_millis().max(1) as usize);
        }
        let value: Value = redis::cmd("XREADGROUP")
            .arg(&options)
            .arg("STREAMS")
            .arg(&self.keys)
            .arg(ids)
            .query_async(&mut self.conn)
            .await?;
        reply::parse_read(value, |key| self.shard_of_key(key))
    }

    /// Up to `count` entries of `shard`'s pending list held by `holder`, with
    /// ids after `after` (exclusive; `-` for the start), oldest first.
    pub async fn pending(
        &mut self,
        shard: u32,
        holder: Holder<'_>,
        after: &str,
        count: usize,
    ) -> Result<Vec<Pending>> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.keys[shard as usize]).arg(PERSIST_GROUP);
        if let Holder::IdleFor(idle) = holder {
            cmd.arg("IDLE").arg(idle.as_millis() as u64);
        }
        cmd.arg(after).arg("+").arg(count);
        match holder {
            Holder::Me => {
                cmd.arg(&self.consumer);
            }
            Holder::Consumer(name) => {
                cmd.arg(name);
            }
            Holder::IdleFor(_) => {}
        }
        let value: Value = cmd.query_async(&mut self.conn).await?;
        reply::parse_pending(value)
    }

    /// Takes `pending` entries of `shard` over for this consumer without
    /// counting a delivery (`XCLAIM ... JUSTID`; only entries still idle for
    /// `min_idle`, so one another worker just took is left to it) and reads
    /// their fields (`XRANGE`). Each comes back as delivery `n + 1`, `n` being
    /// its count in `pending`. Entries deleted from the stream come without fields.
    pub async fn take(
        &mut self,
        shard: u32,
        pending: &[Pending],
        min_idle: Duration,
    ) -> Result<Vec<RawEntry>> {
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let key = &self.keys[shard as usize];
        let mut pipe = redis::pipe();
        pipe.cmd("XCLAIM")
            .arg(key)
            .arg(PERSIST_GROUP)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64);
        for entry in pending {
            pipe.arg(&entry.id);
        }
        pipe.arg("JUSTID");
        for entry in pending {
            pipe.cmd("XRANGE").arg(key).arg(&entry.id).arg(&entry.id);
        }
        let mut replies: Vec<Value> = pipe.query_async(&mut self.conn).await?;
        let ranges = replies.split_off(1);
        let claimed = reply::parse_ids(replies.pop().unwrap_or(Value::Nil))?;
        let mut taken = Vec::with_capacity(claimed.len());
        for (entry, range) in pending.iter().zip(ranges) {
            if !claimed.contains(&entry.id) {
                continue;
            }
            let fields = reply::parse_range(shard, range)?
                .pop()
                .and_then(|e| e.fields);
            taken.push(RawEntry {
                shard,
                id: entry.id.clone(),
                fields,
                delivery: Delivery::Again(entry.deliveries + 1),
            });
        }
        Ok(taken)
    }

    /// Records in the group that `entries` are delivered again: each one's
    /// delivery count is set to its [`Delivery::Again`] number (and its idle
    /// time reset). Entries on their first delivery are already counted;
    /// those beyond `max` are not tried, so not counted.
    pub async fn count_deliveries(&mut self, entries: &[RawEntry], max: u64) -> Result<()> {
        let mut groups: BTreeMap<(u32, u64), Vec<&str>> = BTreeMap::new();
        for entry in entries {
            if let Delivery::Again(n) = entry.delivery
                && n <= max
            {
                groups.entry((entry.shard, n)).or_default().push(&entry.id);
            }
        }
        if groups.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for ((shard, n), ids) in groups {
            pipe.cmd("XCLAIM")
                .arg(&self.keys[shard as usize])
                .arg(PERSIST_GROUP)
                .arg(&self.consumer)
                .arg(0)
                .arg(ids)
                .arg("RETRYCOUNT")
                .arg(n)
                .arg("JUSTID")
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn).await?;
        Ok(())
    }

    /// Resets the idle time of entries this consumer still works on, so no
    /// other worker claims them while a write is being retried. Only entries
    /// idle for `min_idle` are touched: one that another worker claimed a
    /// moment ago (after this one stalled) is not taken back.
    pub async fn keep_claimed(&mut self, entries: &[EntryKey], min_idle: Duration) -> Result<()> {
        let mut groups: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for key in entries {
            groups.entry(key.shard).or_default().push(key.id());
        }
        let mut pipe = redis::pipe();
        for (shard, ids) in groups {
            pipe.cmd("XCLAIM")
                .arg(&self.keys[shard as usize])
                .arg(PERSIST_GROUP)
                .arg(&self.consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&ids)
                .arg("JUSTID")
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn).await?;
        Ok(())
    }

    /// Writes the batch's dead letters (each dead-letter stream capped at
    /// `dead_max_len` entries, oldest dropped), then acknowledges and deletes
    /// all its entries, atomically. Returns how many entries were acknowledged
    /// now (fewer when some were acknowledged before, e.g. by another worker).
    pub async fn finish(&mut self, batch: &Batch, dead_max_len: u64) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for dead in &batch.dead {
            let entry = &batch.entries[dead.entry];
            pipe.cmd("XADD")
                .arg(dead_letter_key(entry.shard))
                .arg("MAXLEN")
                .arg(dead_max_len)
                .arg("*")
                .arg(dead_letters::encode(entry, dead.cause, &dead.reason))
                .ignore();
        }
        let groups = ids_by_shard(batch);
        for (shard, ids) in &groups {
            let key = &self.keys[*shard as usize];
            pipe.cmd("XACK").arg(key).arg(PERSIST_GROUP).arg(ids);
            pipe.cmd("XDEL").arg(key).arg(ids).ignore();
        }
        let acked: Vec<u64> = pipe.query_async(&mut self.conn).await?;
        Ok(acked.iter().sum())
    }

    /// Backlog per shard: the group's `lag` (undelivered entries; when Redis
    /// cannot tell, the stream length minus pending), pending count, and the
    /// length of the dead-letter stream.
    pub async fn lag(&mut self) -> Result<Vec<ShardLag>> {
        let mut pipe = redis::pipe();
        for (shard, key) in self.keys.iter().enumerate() {
            pipe.xinfo_groups(key)
                .xlen(key)
                .xlen(dead_letter_key(shard as u32));
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn).await?;
        let parse = |e: redis::ParsingError| Error::Reply {
            command: "XINFO GROUPS",
            detail: e.to_string(),
        };
        let mut lags = Vec::with_capacity(self.keys.len());
        let mut replies = replies.into_iter();
        while let (Some(info), Some(len), Some(dead)) =
            (replies.next(), replies.next(), replies.next())
        {
            let info: StreamInfoGroupsReply = redis::from_redis_value(info).map_err(parse)?;
            let len: u64 = redis::from_redis_value(len).map_err(parse)?;
            let dead: u64 = redis::from_redis_value(dead).map_err(parse)?;
            let group = info.groups.into_iter().find(|g| g.name == PERSIST_GROUP);
            lags.push(group.map_or(
                ShardLag {
                    lag: len,
                    pending: 0,
                    dead,
                },
                |g| {
                    let pending = g.pending as u64;
                    ShardLag {
                        lag: g.lag.map_or(len.saturating_sub(pending), |lag| lag as u64),
                        pending,
                        dead,
                    }
                },
            ));
        }
        Ok(lags)
    }

    /// Removes consumers of `shard` that hold no pending entry and have not
    /// read for `idle` (workers gone for good, e.g. pods of an old rollout).
    /// A live consumer reads at least every [`crate::reader::MAX_BLOCK`], and
    /// one removed by mistake is recreated by its next read. Returns the names removed.
    pub async fn prune_consumers(&mut self, shard: u32, idle: Duration) -> Result<Vec<String>> {
        let key = &self.keys[shard as usize];
        let consumers: redis::streams::StreamInfoConsumersReply =
            self.conn.xinfo_consumers(key, PERSIST_GROUP).await?;
        let mut removed = Vec::new();
        for consumer in consumers.consumers {
            if consumer.name != self.consumer
                && consumer.pending == 0
                && consumer.idle as u128 >= idle.as_millis()
            {
                let deleted: i64 = redis::Script::new(DELETE_IDLE_CONSUMER)
                    .key(key)
                    .arg(PERSIST_GROUP)
                    .arg(&consumer.name)
                    .invoke_async(&mut self.conn)
                    .await?;
                if deleted >= 0 {
                    removed.push(consumer.name);
                }
            }
        }
        Ok(removed)
    }

    /// `PING`.
    pub async fn ping(&mut self) -> Result<()> {
        redis::cmd("PING").query_async::<()>(&mut self.conn).await?;
        Ok(())
    }
}

fn ids_by_shard(batch: &Batch) -> BTreeMap<u32, Vec<&str>> {
    let mut groups: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for entry in &batch.entries {
        groups.entry(entry.shard).or_default().push(&entry.id);
    }
    groups
}

/// Whether an error says the group (or stream) is gone, e.g. after Redis lost its data.
pub fn is_missing_group(error: &Error) -> bool {
    matches!(error, Error::Redis(e) if e.code() == Some("NOGROUP"))
}
