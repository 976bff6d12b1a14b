//! Every Redis read and write of the gateway, each one round trip.
//!
//! Writes go through the Lua scripts of `chatcluster_protocol::scripts`, so the
//! offset, the history copy, the durable copy and the fan-out of a message are
//! decided together. The connection is a multiplexed `ConnectionManager`:
//! concurrent requests from many WebSocket connections are pipelined on one
//! socket, and it reconnects by itself after Redis comes back.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use chatcluster_protocol::entry::{StoredDirect, StoredMessage, TopicEvent};
use chatcluster_protocol::frame::{ChannelMessage, PresenceEvent};
use chatcluster_protocol::{keys, scripts};

/// A Redis request that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The channel has no epoch yet; initialize it and retry.
    #[error("channel has no epoch")]
    NoEpoch,
    /// A stored entry does not decode.
    #[error("corrupt history entry: {0}")]
    Corrupt(String),
}

/// Where a channel's history stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Epoch of the channel's history.
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
pub type Page = (Vec<String>, Option<String>);

struct Scripts {
    read: Script,
    init: Script,
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
    /// History stream length.
    pub history_size: u64,
    /// History and epoch lifetime when idle.
    pub history_ttl: Duration,
    /// Presence entry lifetime.
    pub presence_ttl: Duration,
    /// Request timeout.
    pub timeout: Duration,
}

/// The gateway's Redis client.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    settings: StoreSettings,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// `EVAL` of a script sent whole, followed by its `keys` keys and then its
/// arguments. Used for the writes a connection may pipeline: `EVALSHA` fails
/// with `NOSCRIPT` after a Redis restart, and the retries of several in-flight
/// calls could then run out of order; `EVAL` runs in the order it was sent
/// (Redis still compiles the script once and caches it by its hash).
fn in_order(script: &str, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys);
    cmd
}

fn parse_offset(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// A stream entry as XRANGE returns it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Decodes the reply of [`scripts::READ_RANGE`].
fn parse_read(reply: redis::Value) -> Result<(Option<Position>, Vec<ChannelMessage>), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("read reply: {what}"));
    let redis::Value::Array(parts) = reply else {
        return Err(corrupt("not an array"));
    };
    let [epoch, top, entries]: [redis::Value; 3] =
        parts.try_into().map_err(|_| corrupt("not three parts"))?;
    let epoch = match epoch {
        redis::Value::Nil => return Ok((None, Vec::new())),
        other => redis::from_redis_value::<String>(other).map_err(|_| corrupt("epoch"))?,
    };
    let top = redis::from_redis_value::<u64>(top).map_err(|_| corrupt("top"))?;
    let entries: Vec<StreamEntry> =
        redis::from_redis_value(entries).map_err(|_| corrupt("entries"))?;
    let messages = entries
        .into_iter()
        .map(|(id, fields)| {
            let offset = parse_offset(&id).ok_or_else(|| corrupt(&format!("entry id {id}")))?;
            let data = fields
                .iter()
                .find(|(name, _)| name == chatcluster_protocol::entry::field::DATA)
                .map(|(_, data)| data.as_slice())
                .ok_or_else(|| corrupt(&format!("entry {id} has no data")))?;
            let message =
                StoredMessage::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(message.into_channel_message(offset))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok((Some(Position { top, epoch }), messages))
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
                read: Script::new(scripts::READ_RANGE),
                init: Script::new(scripts::INIT_CHANNEL),
                register: Script::new(scripts::REGISTER_NAME),
                index: Script::new(scripts::INDEX_NAMES),
                join: Script::new(scripts::PRESENCE_JOIN),
                leave: Script::new(scripts::PRESENCE_LEAVE),
                sweep: Script::new(scripts::PRESENCE_SWEEP),
            }),
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

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.timed(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }

    fn ttl_secs(&self) -> u64 {
        self.settings.history_ttl.as_secs()
    }

    /// Publishes a channel message; returns its offset and the channel's epoch.
    pub async fn publish(&self, message: &StoredMessage) -> Result<(u64, String), StoreError> {
        let channel = &message.channel;
        let shards = self.settings.shards;
        let mut conn = self.conn.clone();
        let mut eval = in_order(scripts::PUBLISH_MESSAGE, 3);
        eval.arg(keys::meta_key(channel, shards))
            .arg(keys::history_key(channel, shards))
            .arg(keys::persist_key(keys::shard_of(channel, shards)))
            .arg(message.encode())
            .arg(self.settings.history_size)
            .arg(self.ttl_secs())
            .arg(keys::channel_topic(channel));
        match self.timed(eval.query_async(&mut conn)).await {
            Err(StoreError::Redis(e)) if e.code() == Some(scripts::NO_EPOCH) => {
                Err(StoreError::NoEpoch)
            }
            other => other,
        }
    }

    /// Starts the channel's epoch (after `floor`) if it has none; returns its position.
    pub async fn init_channel(&self, channel: &str, floor: u64) -> Result<Position, StoreError> {
        let shards = self.settings.shards;
        let mut conn = self.conn.clone();
        let epoch = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut invocation = self.scripts.init.prepare_invoke();
        invocation
            .key(keys::meta_key(channel, shards))
            .key(keys::history_key(channel, shards))
            .arg(epoch)
            .arg(floor)
            .arg(self.ttl_secs());
        let (top, epoch): (u64, String) = self.timed(invocation.invoke_async(&mut conn)).await?;
        Ok(Position { top, epoch })
    }

    /// The channel's position and the history messages in `from..=until`
    /// (at most the history length), read in one atomic step.
    pub async fn read(
        &self,
        channel: &str,
        from: Option<u64>,
        until: Option<u64>,
        with_messages: bool,
    ) -> Result<(Option<Position>, Vec<ChannelMessage>), StoreError> {
        let shards = self.settings.shards;
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.read.prepare_invoke();
        invocation
            .key(keys::meta_key(channel, shards))
            .key(keys::history_key(channel, shards))
            .arg(from.map_or_else(|| "-".to_owned(), |from| format!("{from}-0")))
            .arg(until.map_or_else(|| "+".to_owned(), |until| format!("{until}-0")))
            .arg(if with_messages {
                self.settings.history_size
            } else {
                0
            });
        let reply: redis::Value = self.timed(invocation.invoke_async(&mut conn)).await?;
        parse_read(reply)
    }

    /// Sends a direct message (persisted, published to recipient and sender).
    pub async fn send_direct(&self, direct: &StoredDirect) -> Result<(), StoreError> {
        let shards = self.settings.shards;
        let mut conn = self.conn.clone();
        let sender_topic = if direct.from == direct.to {
            String::new()
        } else {
            keys::user_topic(&direct.from)
        };
        let mut eval = in_order(scripts::PUBLISH_DIRECT, 1);
        eval.arg(keys::persist_key(keys::shard_of(&direct.to, shards)))
            .arg(direct.encode())
            .arg(keys::user_topic(&direct.to))
            .arg(sender_topic);
        self.timed(eval.query_async::<i64>(&mut conn))
            .await
            .map(drop)
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
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.register.prepare_invoke();
        invocation
            .key(registry.set())
            .key(keys::persist_key(keys::shard_of(name, shards)))
            .key(registry.index())
            .arg(registry.kind())
            .arg(name)
            .arg(chrono::Utc::now().timestamp_millis());
        if let Some((creator, limits)) = limits {
            invocation
                .key(keys::channel_quota_key(creator))
                .arg(limits.max_total)
                .arg(limits.per_creator)
                .arg(limits.window.as_secs().max(1));
        }
        let outcome: i64 = self.timed(invocation.invoke_async(&mut conn)).await?;
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
    ) -> Result<Page, StoreError> {
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
            let mut invocation = self.scripts.index.prepare_invoke();
            invocation
                .key(registry.set())
                .key(registry.index())
                .arg(&cursor);
            cursor = self.timed(invocation.invoke_async(&mut conn)).await?;
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
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.join.prepare_invoke();
        invocation
            .key(zset)
            .key(hash)
            .arg(member)
            .arg(user)
            .arg(expiry)
            .arg(ttl * 4);
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// Removes a presence member; `true` when the user just left.
    pub async fn presence_leave(
        &self,
        channel: &str,
        member: &str,
        user: &str,
    ) -> Result<bool, StoreError> {
        let (zset, hash) = self.presence_keys(channel);
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.leave.prepare_invoke();
        invocation.key(zset).key(hash).arg(member).arg(user);
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// Removes expired members; returns the users who left.
    pub async fn presence_sweep(&self, channel: &str) -> Result<Vec<String>, StoreError> {
        let (zset, hash) = self.presence_keys(channel);
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.sweep.prepare_invoke();
        invocation
            .key(zset)
            .key(hash)
            .arg(chrono::Utc::now().timestamp_millis());
        self.timed(invocation.invoke_async(&mut conn)).await
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
    #[test]
    fn offsets_from_entry_ids() {
        assert_eq!(super::parse_offset("42-0"), Some(42));
        assert_eq!(super::parse_offset("x-0"), None);
        assert_eq!(super::parse_offset("42"), None);
    }
}
