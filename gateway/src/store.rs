//! Every Redis read and write of the gateway, each one round trip.
//!
//! Writes go through the Lua scripts of `chatcluster_protocol::scripts`, so the
//! offset, the history copy, the durable copy and the fan-out of a message are
//! decided together. The connection is a multiplexed `ConnectionManager`:
//! concurrent requests from many WebSocket connections are pipelined on one
//! socket, and it reconnects by itself after Redis comes back.
//!
//! Scripts run with `EVALSHA`. A `NOSCRIPT` answer means the Redis process is
//! not the one the scripts were loaded into (a restart or a failover): before
//! loading them again, the store records the new life of Redis in every
//! shard's life key (see [`crate::life`]), so no stream keeps an epoch whose
//! offsets Redis may have rewound.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, FromRedisValue, Script, ToRedisArgs};
use uuid::Uuid;

use chatcluster_protocol::entry::TopicEvent;
use chatcluster_protocol::frame::{PresenceEvent, ServerFrame, Since};
use chatcluster_protocol::stream::{AppendSettings, ScriptCall, StreamId};
use chatcluster_protocol::{keys, scripts};

use crate::life;

/// A Redis request that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The stream has no epoch in this generation of Redis; start one and retry.
    #[error("stream has no epoch")]
    NoEpoch,
    /// The stream's reserved offsets are used up; reserve more and retry.
    #[error("stream {epoch} reached its reserved offset {top}")]
    NoBlock {
        /// The stream's epoch.
        epoch: String,
        /// Its newest offset (= its limit).
        top: u64,
    },
    /// A stored entry or a reply does not decode.
    #[error("corrupt entry or reply: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether a write may have happened although it failed: the request may
    /// have reached Redis, and no answer came back (a timeout or a connection
    /// lost after sending). A refused connection or an error reply means it
    /// did not run.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Timeout(_) => true,
            Self::Redis(e) => e.is_io_error() && !e.is_connection_refusal(),
            Self::NoEpoch | Self::NoBlock { .. } | Self::Corrupt(_) => false,
        }
    }
}

/// Where a stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Epoch of the stream's history.
    pub epoch: String,
    /// Newest offset (the epoch's starting floor when nothing was published in it yet).
    pub top: u64,
}

/// Which registry set a name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registry {
    /// `cc:users`.
    Users,
    /// `cc:channels`.
    Channels,
}

impl Registry {
    fn set(self) -> &'static str {
        match self {
            Self::Users => keys::USERS_SET,
            Self::Channels => keys::CHANNELS_SET,
        }
    }

    fn index(self) -> &'static str {
        match self {
            Self::Users => keys::USERS_INDEX,
            Self::Channels => keys::CHANNELS_INDEX,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Users => chatcluster_protocol::entry::kind::USER,
            Self::Channels => chatcluster_protocol::entry::kind::CHANNEL,
        }
    }
}

/// Limits on creating a name (channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateLimits {
    /// Most names in the registry (0: none).
    pub max_total: u64,
    /// Most names one creator may add per window (0: none).
    pub per_creator: u64,
    /// The window of `per_creator`.
    pub window: Duration,
}

/// The outcome of registering a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The name is new.
    Created,
    /// The name existed.
    Existed,
    /// The registry holds `max_total` names already.
    Full,
    /// The creator used up its quota for the window.
    QuotaSpent,
}

/// One page of a registry: names in order, and the cursor of the next page
/// (`None` on the last).
pub type NamePage = (Vec<String>, Option<String>);

struct Scripts {
    append: Script,
    init: Script,
    extend: Script,
    read: Script,
    page: Script,
    cursor: Script,
    seen: Script,
    new_life: Script,
    register: Script,
    index: Script,
    join: Script,
    leave: Script,
    sweep: Script,
}

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Persistence shards.
    pub shards: u32,
    /// History stream length (channels and inboxes).
    pub history_size: u64,
    /// History and epoch lifetime when idle.
    pub history_ttl: Duration,
    /// Presence entry lifetime.
    pub presence_ttl: Duration,
    /// Request timeout.
    pub timeout: Duration,
    /// How long an idempotency key's first result is kept.
    pub idempotency_window: Duration,
    /// Offsets reserved in PostgreSQL at a time; the next block is asked for
    /// when half of one is left.
    pub offset_block: u64,
}

/// What to append to a stream.
#[derive(Debug, Clone)]
pub struct Append<'a> {
    /// The channel or inbox.
    pub stream: &'a StreamId,
    /// The MessagePack payload (`StoredMessage` or `StoredDirect`).
    pub payload: Vec<u8>,
    /// The message's id (kept in the idempotency record).
    pub msg_id: Uuid,
    /// The idempotency record key, when the client sent a key.
    pub record: Option<String>,
}

/// What [`Store::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The message's offset.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: String,
    /// The message's id (the first call's, when `replayed`).
    pub msg_id: Uuid,
    /// An earlier call with the same idempotency key answered; nothing was written.
    pub replayed: bool,
    /// The stream's limit, when the next block should be reserved now.
    pub running_low: Option<u64>,
}

/// A page of a history stream read backwards ([`Store::read_page`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// The offset the current epoch starts after (`None`: no valid epoch).
    /// Entries above it are the epoch's messages without a gap.
    pub base: Option<u64>,
    /// Entries, newest first, as pushes.
    pub entries: Vec<ServerFrame>,
}

/// The gateway's Redis client.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    settings: StoreSettings,
    scripts: std::sync::Arc<Scripts>,
    /// Held while a new life of Redis is recorded and the scripts loaded again.
    life: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Times the scripts were loaded, so a caller that met `NOSCRIPT` before
    /// another caller loaded them only retries.
    loads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn parse_offset(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// A stream entry as XRANGE returns it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn convert<T: FromRedisValue>(value: redis::Value, what: &str) -> Result<T, StoreError> {
    redis::from_redis_value(value).map_err(|_| corrupt(what))
}

/// Decodes history entries into the pushes they are.
fn decode_entries(
    stream: &StreamId,
    entries: Vec<StreamEntry>,
) -> Result<Vec<ServerFrame>, StoreError> {
    entries
        .into_iter()
        .map(|(id, fields)| {
            let offset = parse_offset(&id).ok_or_else(|| corrupt(&format!("entry id {id}")))?;
            let data = fields
                .iter()
                .find(|(name, _)| name == chatcluster_protocol::entry::field::DATA)
                .map(|(_, data)| data.as_slice())
                .ok_or_else(|| corrupt(&format!("entry {id} has no data")))?;
            stream
                .decode_entry(offset, data)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
}

/// Decodes the reply of [`scripts::READ_RANGE`].
fn parse_read(
    stream: &StreamId,
    reply: redis::Value,
) -> Result<(Option<Position>, Vec<ServerFrame>), StoreError> {
    let redis::Value::Array(parts) = reply else {
        return Err(corrupt("read reply: not an array"));
    };
    let [epoch, top, entries]: [redis::Value; 3] = parts
        .try_into()
        .map_err(|_| corrupt("read reply: not three parts"))?;
    let epoch = match epoch {
        redis::Value::Nil => return Ok((None, Vec::new())),
        other => convert::<String>(other, "read reply: epoch")?,
    };
    let top = convert::<u64>(top, "read reply: top")?;
    let entries = decode_entries(stream, convert(entries, "read reply: entries")?)?;
    Ok((Some(Position { top, epoch }), entries))
}

/// Decodes the reply of [`scripts::APPEND`].
fn parse_appended(reply: redis::Value) -> Result<Appended, StoreError> {
    let (offset, epoch, msg_id, replayed, limit): (u64, String, String, u8, u64) =
        convert(reply, "append reply")?;
    let msg_id = msg_id
        .parse()
        .map_err(|_| corrupt(&format!("append reply: message id {msg_id:?}")))?;
    Ok(Appended {
        offset,
        epoch,
        msg_id,
        replayed: replayed == 1,
        running_low: (limit > 0).then_some(limit),
    })
}

/// Maps the errors [`scripts::APPEND`] returns before writing.
fn append_error(error: StoreError) -> StoreError {
    let StoreError::Redis(e) = &error else {
        return error;
    };
    match e.code() {
        Some(scripts::NO_EPOCH) => StoreError::NoEpoch,
        Some(scripts::NO_BLOCK) => {
            let mut words = e.detail().unwrap_or_default().split_whitespace();
            match (words.next(), words.next().and_then(|t| t.parse().ok())) {
                (Some(epoch), Some(top)) => StoreError::NoBlock {
                    epoch: epoch.to_owned(),
                    top,
                },
                _ => corrupt("NOBLOCK without epoch and top"),
            }
        }
        _ => error,
    }
}

/// Keys and arguments of one script call.
#[derive(Default)]
struct Call {
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl From<ScriptCall> for Call {
    fn from(call: ScriptCall) -> Self {
        Self {
            keys: call.keys.into_iter().map(String::into_bytes).collect(),
            args: call.args,
        }
    }
}

impl Call {
    fn key(mut self, key: impl ToRedisArgs) -> Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn evalsha(&self, script: &Script) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

impl Store {
    /// A store connecting lazily to `client` (the gateway starts even while Redis is down).
    pub fn new(client: redis::Client, settings: StoreSettings) -> Result<Self, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.timeout))
            .set_connection_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            settings,
            scripts: std::sync::Arc::new(Scripts {
                append: Script::new(scripts::APPEND),
                init: Script::new(scripts::INIT_EPOCH),
                extend: Script::new(scripts::EXTEND_BLOCK),
                read: Script::new(scripts::READ_RANGE),
                page: Script::new(scripts::READ_PAGE),
                cursor: Script::new(scripts::INBOX_CURSOR),
                seen: Script::new(scripts::INBOX_SEEN),
                new_life: Script::new(scripts::NEW_LIFE),
                register: Script::new(scripts::REGISTER_NAME),
                index: Script::new(scripts::INDEX_NAMES),
                join: Script::new(scripts::PRESENCE_JOIN),
                leave: Script::new(scripts::PRESENCE_LEAVE),
                sweep: Script::new(scripts::PRESENCE_SWEEP),
            }),
            life: std::sync::Arc::default(),
            loads: std::sync::Arc::default(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    async fn timed<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        // Lazy connects and reconnect retries can outlast the response timeout.
        let limit = self.settings.timeout * 2;
        match tokio::time::timeout(limit, request).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(limit)),
        }
    }

    /// Runs a script by its hash; when Redis does not know it (a new Redis
    /// process), records the new life of Redis, loads the scripts (once for
    /// all the calls that met `NOSCRIPT` meanwhile) and runs it again.
    async fn run<T: FromRedisValue>(&self, script: &Script, call: Call) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let command = call.evalsha(script);
        let mut loads = self.loads.load(Ordering::Acquire);
        let mut result = self.timed(command.query_async(&mut conn)).await;
        for _ in 0..3 {
            match &result {
                Err(StoreError::Redis(e))
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {}
                _ => return result,
            }
            {
                let _recording = self.life.lock().await;
                if self.loads.load(Ordering::Acquire) == loads {
                    self.new_life().await?;
                    self.load_all().await?;
                    self.loads.fetch_add(1, Ordering::AcqRel);
                }
                loads = self.loads.load(Ordering::Acquire);
            }
            result = self.timed(command.query_async(&mut conn)).await;
        }
        result
    }

    /// Records the Redis process now serving in every shard's life key (see
    /// [`scripts::NEW_LIFE`]); a no-op for a process already recorded.
    /// Called with `life` held.
    async fn new_life(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let info: String = self
            .timed(
                redis::cmd("INFO")
                    .arg("server")
                    .arg("persistence")
                    .arg("replication")
                    .query_async(&mut conn),
            )
            .await?;
        // Managed Redis services may refuse CONFIG: then assume writes can be lost.
        let fsync: Option<String> = self
            .timed(
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendfsync")
                    .query_async::<Vec<String>>(&mut conn),
            )
            .await
            .ok()
            .and_then(|pair| pair.into_iter().nth(1));
        let life = life::parse(&info, fsync.as_deref()).map_err(|e| corrupt(&e))?;
        let (mut generations, mut recorded) = (Vec::new(), false);
        for shard in 0..self.settings.shards.max(1) {
            let (generation, new): (u64, u8) = self
                .timed(
                    self.scripts
                        .new_life
                        .key(keys::life_key(shard))
                        .arg(&life.run_id)
                        .arg(u8::from(life.lossless))
                        .invoke_async(&mut conn),
                )
                .await?;
            generations.push(generation);
            recorded |= new == 1;
        }
        if recorded {
            tracing::info!(
                run_id = %life.run_id,
                lossless = life.lossless,
                ?generations,
                "serving a Redis process not seen before: its life is recorded"
            );
        }
        Ok(())
    }

    /// Loads every script into Redis's script cache (one round trip).
    async fn load_all(&self) -> Result<(), StoreError> {
        let scripts = &self.scripts;
        let mut pipe = redis::pipe();
        for script in [
            &scripts.append,
            &scripts.init,
            &scripts.extend,
            &scripts.read,
            &scripts.page,
            &scripts.cursor,
            &scripts.seen,
            &scripts.register,
            &scripts.index,
            &scripts.join,
            &scripts.leave,
            &scripts.sweep,
        ] {
            pipe.load_script(script);
        }
        let mut conn = self.conn.clone();
        self.timed(pipe.query_async::<Vec<String>>(&mut conn))
            .await
            .map(drop)
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.timed(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }

    fn ttl_secs(&self) -> u64 {
        self.settings.history_ttl.as_secs()
    }

    /// Appends a message to a channel or an inbox (see [`scripts::APPEND`]).
    /// `StoreError::NoEpoch` and `StoreError::NoBlock` come before anything is written.
    pub async fn append(&self, append: &Append<'_>) -> Result<Appended, StoreError> {
        let settings = AppendSettings {
            history_size: self.settings.history_size,
            ttl_secs: self.ttl_secs(),
            record_ms: self.settings.idempotency_window.as_millis() as u64,
            block: self.settings.offset_block,
        };
        let call = append.stream.append_call(
            self.settings.shards,
            append.payload.clone(),
            append.msg_id,
            append.record.clone(),
            &settings,
        );
        match self
            .run::<redis::Value>(&self.scripts.append, call.into())
            .await
        {
            Ok(reply) => parse_appended(reply),
            Err(error) => Err(append_error(error)),
        }
    }

    /// Starts the stream's epoch after `floor` with `limit` reserved, unless
    /// it has a valid one; returns its position, its limit and whether this
    /// call started it.
    pub async fn init_epoch(
        &self,
        stream: &StreamId,
        floor: u64,
        limit: u64,
    ) -> Result<(Position, u64, bool), StoreError> {
        let epoch = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let call = stream.init_call(self.settings.shards, &epoch, floor, limit, self.ttl_secs());
        let (top, epoch, limit, started): (u64, String, u64, u8) =
            self.run(&self.scripts.init, call.into()).await?;
        Ok((Position { top, epoch }, limit, started == 1))
    }

    /// Raises the stream's limit to `limit` if `epoch` is still its valid
    /// epoch; returns whether it is.
    pub async fn extend_block(
        &self,
        stream: &StreamId,
        epoch: &str,
        limit: u64,
    ) -> Result<bool, StoreError> {
        let keys = stream.keys(self.settings.shards);
        let call = Call::default()
            .key(&keys.meta)
            .key(&keys.life)
            .arg(epoch)
            .arg(limit);
        let valid: u8 = self.run(&self.scripts.extend, call).await?;
        Ok(valid == 1)
    }

    /// The stream's position and the history messages of its current epoch in
    /// `from..=until` (at most the history length), read in one atomic step.
    pub async fn read(
        &self,
        stream: &StreamId,
        from: Option<u64>,
        until: Option<u64>,
        with_messages: bool,
    ) -> Result<(Option<Position>, Vec<ServerFrame>), StoreError> {
        let keys = stream.keys(self.settings.shards);
        let call = Call::default()
            .key(&keys.meta)
            .key(&keys.history)
            .key(&keys.life)
            .arg(from.map_or_else(|| "-".to_owned(), |from| format!("{from}-0")))
            .arg(until.map_or_else(|| "+".to_owned(), |until| format!("{until}-0")))
            .arg(if with_messages {
                self.settings.history_size
            } else {
                0
            });
        let reply: redis::Value = self.run(&self.scripts.read, call).await?;
        parse_read(stream, reply)
    }

    /// Up to `count` of the stream's newest history entries below `before`,
    /// newest first, with where its current epoch starts.
    pub async fn read_page(
        &self,
        stream: &StreamId,
        before: Option<u64>,
        count: u64,
    ) -> Result<Page, StoreError> {
        let last = match before {
            Some(0 | 1) => return Ok(Page::default()),
            Some(before) => format!("{}-0", before - 1),
            None => "+".to_owned(),
        };
        let keys = stream.keys(self.settings.shards);
        let call = Call::default()
            .key(&keys.meta)
            .key(&keys.history)
            .key(&keys.life)
            .arg(last)
            .arg(count.max(1));
        let (base, entries): (Option<u64>, Vec<StreamEntry>) =
            self.run(&self.scripts.page, call).await?;
        Ok(Page {
            base,
            entries: decode_entries(stream, entries)?,
        })
    }

    /// Where `user`'s inbox stands and what was last pushed to the user, as
    /// the position to recover from (`None`: the inbox has no valid epoch).
    pub async fn inbox_cursor(&self, user: &str) -> Result<Option<Since>, StoreError> {
        let keys = StreamId::inbox(user).keys(self.settings.shards);
        let call = Call::default().key(&keys.meta).key(&keys.life);
        let (epoch, offset): (Option<String>, u64) = self.run(&self.scripts.cursor, call).await?;
        Ok(epoch.map(|epoch| Since { offset, epoch }))
    }

    /// Records that `offset` of `user`'s inbox (in `epoch`) reached one of the user's connections.
    pub async fn inbox_seen(&self, user: &str, epoch: &str, offset: u64) -> Result<(), StoreError> {
        let keys = StreamId::inbox(user).keys(self.settings.shards);
        let call = Call::default().key(&keys.meta).arg(epoch).arg(offset);
        self.run::<u8>(&self.scripts.seen, call).await.map(drop)
    }

    /// Registers a user or channel name without limits; `true` when it is new.
    pub async fn register(&self, registry: Registry, name: &str) -> Result<bool, StoreError> {
        let registration = self.register_limited(registry, name, None).await?;
        Ok(registration == Registration::Created)
    }

    /// Registers a name created by `creator` within `limits` (no limits when `None`).
    pub async fn register_limited(
        &self,
        registry: Registry,
        name: &str,
        limits: Option<(&str, CreateLimits)>,
    ) -> Result<Registration, StoreError> {
        let shards = self.settings.shards;
        let call = Call::default()
            .key(registry.set())
            .key(keys::persist_key(keys::shard_of(name, shards)))
            .key(registry.index())
            .arg(registry.kind())
            .arg(name)
            .arg(chrono::Utc::now().timestamp_millis());
        let call = match limits {
            Some((creator, limits)) => call
                .key(keys::channel_quota_key(creator))
                .arg(limits.max_total)
                .arg(limits.per_creator)
                .arg(limits.window.as_secs().max(1)),
            None => call,
        };
        let outcome: i64 = self.run(&self.scripts.register, call).await?;
        Ok(match outcome {
            1 => Registration::Created,
            -1 => Registration::Full,
            -2 => Registration::QuotaSpent,
            _ => Registration::Existed,
        })
    }

    /// Whether a name is registered.
    pub async fn exists(&self, registry: Registry, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        self.timed(conn.sismember(registry.set(), name)).await
    }

    /// Up to `limit` registered names after `after` (from the start without
    /// it), in order, and the cursor of the next page.
    pub async fn list_page(
        &self,
        registry: Registry,
        after: Option<&str>,
        limit: u32,
    ) -> Result<NamePage, StoreError> {
        let mut conn = self.conn.clone();
        let start = after.map_or_else(|| "-".to_owned(), |name| format!("({name}"));
        let mut names: Vec<String> = self
            .timed(
                redis::cmd("ZRANGEBYLEX")
                    .arg(registry.index())
                    .arg(start)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(u64::from(limit) + 1)
                    .query_async(&mut conn),
            )
            .await?;
        let more = names.len() > limit as usize;
        names.truncate(limit as usize);
        let cursor = more.then(|| names.last().cloned()).flatten();
        Ok((names, cursor))
    }

    /// Copies names the sorted index lacks (registered before it existed)
    /// into it; returns how many steps it took. Cheap when complete: one
    /// `SCARD` and one `ZCARD`.
    pub async fn index_registry(&self, registry: Registry) -> Result<u32, StoreError> {
        let mut conn = self.conn.clone();
        let (set, index): (u64, u64) = self
            .timed(
                redis::pipe()
                    .scard(registry.set())
                    .zcard(registry.index())
                    .query_async(&mut conn),
            )
            .await?;
        if index >= set {
            return Ok(0);
        }
        let (mut cursor, mut steps) = ("0".to_owned(), 0);
        loop {
            let call = Call::default()
                .key(registry.set())
                .key(registry.index())
                .arg(&cursor);
            cursor = self.run(&self.scripts.index, call).await?;
            steps += 1;
            if cursor == "0" {
                return Ok(steps);
            }
        }
    }

    fn presence_keys(&self, channel: &str) -> (String, String) {
        let shards = self.settings.shards;
        (
            keys::presence_key(channel, shards),
            keys::presence_users_key(channel, shards),
        )
    }

    /// Adds or refreshes a presence member; `true` when the user just joined.
    pub async fn presence_join(
        &self,
        channel: &str,
        member: &str,
        user: &str,
    ) -> Result<bool, StoreError> {
        let (zset, hash) = self.presence_keys(channel);
        let ttl = self.settings.presence_ttl.as_millis() as i64;
        let expiry = chrono::Utc::now().timestamp_millis() + ttl;
        let call = Call::default()
            .key(zset)
            .key(hash)
            .arg(member)
            .arg(user)
            .arg(expiry)
            .arg(ttl * 4);
        self.run(&self.scripts.join, call).await
    }

    /// Removes a presence member; `true` when the user just left.
    pub async fn presence_leave(
        &self,
        channel: &str,
        member: &str,
        user: &str,
    ) -> Result<bool, StoreError> {
        let (zset, hash) = self.presence_keys(channel);
        let call = Call::default().key(zset).key(hash).arg(member).arg(user);
        self.run(&self.scripts.leave, call).await
    }

    /// Removes expired members; returns the users who left.
    pub async fn presence_sweep(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let (zset, hash) = self.presence_keys(channel);
        let call = Call::default()
            .key(zset)
            .key(hash)
            .arg(chrono::Utc::now().timestamp_millis());
        self.run(&self.scripts.sweep, call).await
    }

    /// Users present in a channel, sorted.
    pub async fn presence_users(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let (_, hash) = self.presence_keys(channel);
        let mut conn = self.conn.clone();
        let mut users: Vec<String> = self.timed(conn.hkeys(hash)).await?;
        users.sort_unstable();
        Ok(users)
    }

    /// Announces a presence change on the channel topic.
    pub async fn publish_presence(&self, event: PresenceEvent) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let topic = keys::channel_topic(&event.channel);
        let payload = TopicEvent::Presence(event).encode();
        self.timed(conn.publish::<_, _, i64>(topic, payload))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_from_entry_ids() {
        assert_eq!(parse_offset("42-0"), Some(42));
        assert_eq!(parse_offset("x-0"), None);
        assert_eq!(parse_offset("42"), None);
    }

    #[test]
    fn lost_answers_are_unknown_outcomes_refusals_and_replies_are_not() {
        let io = |kind| StoreError::Redis(std::io::Error::new(kind, "x").into());
        assert!(StoreError::Timeout(Duration::from_secs(1)).outcome_unknown());
        assert!(io(std::io::ErrorKind::ConnectionReset).outcome_unknown());
        assert!(io(std::io::ErrorKind::BrokenPipe).outcome_unknown());
        assert!(!io(std::io::ErrorKind::ConnectionRefused).outcome_unknown());
        assert!(!StoreError::NoEpoch.outcome_unknown());
    }
}
