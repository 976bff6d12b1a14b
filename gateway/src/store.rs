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
    /// Newest offset (0 when nothing was published in this epoch's range).
    pub top: u64,
    /// Epoch of the channel's history.
    pub epoch: String,
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

    fn kind(self) -> &'static str {
        match self {
            Self::Users => chatcluster_protocol::entry::kind::USER,
            Self::Channels => chatcluster_protocol::entry::kind::CHANNEL,
        }
    }
}

struct Scripts {
    publish: Script,
    init: Script,
    direct: Script,
    register: Script,
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

fn parse_offset(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
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
                publish: Script::new(scripts::PUBLISH_MESSAGE),
                init: Script::new(scripts::INIT_CHANNEL),
                direct: Script::new(scripts::PUBLISH_DIRECT),
                register: Script::new(scripts::REGISTER_NAME),
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
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(keys::meta_key(channel, shards))
            .key(keys::history_key(channel, shards))
            .key(keys::persist_key(keys::shard_of(channel, shards)))
            .arg(message.encode())
            .arg(self.settings.history_size)
            .arg(self.ttl_secs())
            .arg(keys::channel_topic(channel));
        match self.timed(invocation.invoke_async(&mut conn)).await {
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

    /// The channel's position, or `None` when it has no epoch.
    pub async fn position(&self, channel: &str) -> Result<Option<Position>, StoreError> {
        let mut conn = self.conn.clone();
        let key = keys::meta_key(channel, self.settings.shards);
        let (epoch, top): (Option<String>, Option<u64>) = self
            .timed(
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("epoch")
                    .arg("top")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(epoch.map(|epoch| Position {
            top: top.unwrap_or(0),
            epoch,
        }))
    }

    /// Messages of the history stream with offsets in `from..=to` (`to = None`: to the end),
    /// at most `count`, oldest first.
    pub async fn history_range(
        &self,
        channel: &str,
        from: u64,
        to: Option<u64>,
        count: usize,
    ) -> Result<Vec<ChannelMessage>, StoreError> {
        let mut conn = self.conn.clone();
        let key = keys::history_key(channel, self.settings.shards);
        let end = to.map_or_else(|| "+".to_owned(), |to| format!("{to}-0"));
        let reply: redis::streams::StreamRangeReply = self
            .timed(conn.xrange_count(key, format!("{from}-0"), end, count))
            .await?;
        reply
            .ids
            .into_iter()
            .map(|entry| {
                let offset = parse_offset(&entry.id)
                    .ok_or_else(|| StoreError::Corrupt(format!("entry id {}", entry.id)))?;
                let data = match entry.map.get(chatcluster_protocol::entry::field::DATA) {
                    Some(redis::Value::BulkString(bytes)) => bytes.as_slice(),
                    _ => {
                        return Err(StoreError::Corrupt(format!(
                            "entry {} has no data",
                            entry.id
                        )));
                    }
                };
                let message =
                    StoredMessage::decode(data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(message.into_channel_message(offset))
            })
            .collect()
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
        let mut invocation = self.scripts.direct.prepare_invoke();
        invocation
            .key(keys::persist_key(keys::shard_of(&direct.to, shards)))
            .arg(direct.encode())
            .arg(keys::user_topic(&direct.to))
            .arg(sender_topic);
        self.timed(invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// Registers a user or channel name; `true` when it is new.
    pub async fn register(&self, registry: Registry, name: &str) -> Result<bool, StoreError> {
        let shards = self.settings.shards;
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.register.prepare_invoke();
        invocation
            .key(registry.set())
            .key(keys::persist_key(keys::shard_of(name, shards)))
            .arg(registry.kind())
            .arg(name)
            .arg(chrono::Utc::now().timestamp_millis());
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// Whether a name is registered.
    pub async fn exists(&self, registry: Registry, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        self.timed(conn.sismember(registry.set(), name)).await
    }

    /// Every registered name, sorted.
    pub async fn list(&self, registry: Registry) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = self.timed(conn.smembers(registry.set())).await?;
        names.sort_unstable();
        Ok(names)
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
