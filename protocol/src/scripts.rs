//! Lua scripts that make each write one atomic round trip to Redis.
//!
//! `PUBLISH_MESSAGE` is the heart of ordering and durability: it assigns the
//! channel offset, appends to the history stream and to the persistence stream
//! and publishes to the topic in one step, so offset, durable copy and fan-out
//! can never disagree. Redis does not roll back a failing script, so each script
//! checks before it writes.

/// Publish a channel message.
///
/// `KEYS`: meta hash, history stream, persistence stream (one hash tag).
/// `ARGV`: 1 payload ([`crate::entry::StoredMessage`]), 2 history length (exact,
/// so the recovery window is what the operator configured),
/// 3 history TTL in seconds (0 = none), 4 channel topic. Returns `{offset, epoch}`.
///
/// A channel without an epoch fails with [`NO_EPOCH`]: the caller runs
/// [`INIT_CHANNEL`] with the channel's highest stored offset and retries, so
/// offsets keep growing across epochs and never collide in PostgreSQL.
pub const PUBLISH_MESSAGE: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  return redis.error_reply('NOEPOCH channel has no epoch')
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('XADD', KEYS[3], '*', 'k', 'msg', 'o', offset, 'd', ARGV[1])
redis.call('PUBLISH', ARGV[4], 'm' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
return {offset, epoch}
"#;

/// Prefix of the error [`PUBLISH_MESSAGE`] returns for a channel without an epoch.
pub const NO_EPOCH: &str = "NOEPOCH";

/// Start a channel's epoch if it has none, and read its position.
///
/// `KEYS`: meta hash, history stream. `ARGV`: 1 new epoch, 2 the offset to
/// start after (the highest offset already stored in PostgreSQL, or 0),
/// 3 TTL seconds (0 = none). Returns `{top, epoch}`. A new epoch deletes any
/// stale history stream of an earlier life.
pub const INIT_CHANNEL: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', ARGV[2])
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
end
return {tonumber(redis.call('HGET', KEYS[1], 'top')), epoch}
"#;

/// Read a channel's position and a range of its history in one atomic step.
///
/// `KEYS`: meta hash, history stream. `ARGV`: 1 first entry id (`-` for the
/// oldest, or `<offset>-0`), 2 last entry id (`+` for the newest, or
/// `<offset>-0`), 3 most entries (0: read the position only). Returns
/// `{epoch, top, entries}` with `epoch` false when the channel has none; every
/// message above `top` is published after this read, so a subscriber that
/// reads this while subscribed misses nothing and sees nothing twice.
pub const READ_RANGE: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'top')
if not meta[1] then
  return {false, 0, {}}
end
local entries = {}
if tonumber(ARGV[3]) > 0 then
  entries = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
end
return {meta[1], tonumber(meta[2] or 0), entries}
"#;

/// Send a direct message.
///
/// `KEYS`: persistence stream of the recipient's shard. `ARGV`: 1 payload
/// ([`crate::entry::StoredDirect`]), 2 recipient topic, 3 sender topic or empty
/// when the sender writes to itself. Returns the number of topic receivers.
pub const PUBLISH_DIRECT: &str = r#"
redis.call('XADD', KEYS[1], '*', 'k', 'dm', 'd', ARGV[1])
local n = redis.call('PUBLISH', ARGV[2], 'd' .. ARGV[1])
if ARGV[3] ~= '' then
  n = n + redis.call('PUBLISH', ARGV[3], 'd' .. ARGV[1])
end
return n
"#;

/// Register a user or channel name once and persist it the first time,
/// within the creation limits.
///
/// `KEYS`: 1 the set (`cc:users` or `cc:channels`), 2 the persistence stream
/// of the name's shard, optionally 3 the sorted index of the set (pages of
/// `users`/`channels`) and 4 the creator's quota counter. `ARGV`: 1 kind
/// (`user` or `chan`), 2 name, 3 time in ms, optionally 4 most names in the
/// set (0: no limit), 5 most names one creator may add per window (0: no
/// limit), 6 the window in seconds. Returns 1 when the name is new, 0 when it
/// existed, -1 when the set is full, -2 when the creator's quota is spent.
pub const REGISTER_NAME: &str = r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then
  if KEYS[3] then redis.call('ZADD', KEYS[3], 0, ARGV[2]) end
  return 0
end
local most = tonumber(ARGV[4] or '0')
if most > 0 and redis.call('SCARD', KEYS[1]) >= most then
  return -1
end
local quota = tonumber(ARGV[5] or '0')
if quota > 0 and KEYS[4] then
  local used = redis.call('INCR', KEYS[4])
  if used == 1 then redis.call('EXPIRE', KEYS[4], ARGV[6]) end
  if used > quota then return -2 end
end
redis.call('SADD', KEYS[1], ARGV[2])
if KEYS[3] then redis.call('ZADD', KEYS[3], 0, ARGV[2]) end
redis.call('XADD', KEYS[2], '*', 'k', ARGV[1], 'n', ARGV[2], 't', ARGV[3])
return 1
"#;

/// Copy one `SSCAN` step of a registry set into its sorted index (names
/// registered before the index existed).
///
/// `KEYS`: 1 the set, 2 its index. `ARGV`: 1 the `SSCAN` cursor. Returns the
/// next cursor (`"0"` when the scan is complete).
pub const INDEX_NAMES: &str = r#"
local step = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', 500)
for _, name in ipairs(step[2]) do
  redis.call('ZADD', KEYS[2], 0, name)
end
return step[1]
"#;

/// Add (or refresh) a connection's presence in a channel.
///
/// `KEYS`: presence zset (`<user>/<instance>/<conn>` scored by expiry ms), the
/// channel's per-user connection counts hash. `ARGV`: 1 member, 2 user, 3 expiry
/// ms, 4 key TTL ms. Returns 1 when this is the user's first connection there
/// (a join to announce), else 0.
pub const PRESENCE_JOIN: &str = r#"
local first = 0
if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then first = 1 end
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return first
"#;

/// Remove a connection's presence from a channel.
///
/// `KEYS`: as [`PRESENCE_JOIN`]. `ARGV`: 1 member, 2 user. Returns 1 when the
/// user has no connection left there (a leave to announce), else 0.
pub const PRESENCE_LEAVE: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    return 1
  end
end
return 0
"#;

/// Remove expired presence members (of a gateway that died) from a channel.
///
/// `KEYS`: as [`PRESENCE_JOIN`]. `ARGV`: 1 now in ms. Returns the users left
/// with no connection (leaves to announce). Atomic, so exactly one gateway
/// announces each leave.
pub const PRESENCE_SWEEP: &str = r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local left = {}
for _, member in ipairs(expired) do
  redis.call('ZREM', KEYS[1], member)
  local user = string.match(member, '^([^/]+)/')
  if user and redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    table.insert(left, user)
  end
end
return left
"#;
