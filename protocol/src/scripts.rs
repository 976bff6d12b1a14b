//! Lua scripts that make each write one atomic round trip to Redis.
//!
//! [`APPEND`] is the heart of ordering and durability: it assigns the next
//! offset of a sequenced stream (a channel, or a user's inbox of direct
//! messages), appends to its history stream and to the persistence stream and
//! publishes to the topic in one step, so offset, durable copy and fan-out can
//! never disagree. Redis does not roll back a failing script, so each script
//! checks before it writes.
//!
//! Offsets are never reused, whatever Redis loses (docs/protocol.md, "Offsets
//! are never reused"):
//! - a stream may only assign offsets up to its `limit`, a block reserved in
//!   PostgreSQL before Redis hears of it ([`EXTEND_BLOCK`]), so PostgreSQL always
//!   knows an upper bound of every offset ever handed out;
//! - an epoch is valid only in the *generation* of Redis it was started in:
//!   each shard's life key (`cc:{sN}:life`) holds that generation, and
//!   [`NEW_LIFE`] moves it on when Redis restarted in a way that may have lost
//!   writes (no AOF with `appendfsync always`, or a promoted replica). A stream
//!   of an older generation has no epoch: the next write starts a new one
//!   ([`INIT_EPOCH`]) above the reserved bound.

/// Append a message to a sequenced stream (channel or inbox), idempotently.
///
/// `KEYS`: 1 meta hash, 2 history stream, 3 persistence stream, 4 life key,
/// 5 (optional) the idempotency record — all with one hash tag.
/// `ARGV`: 1 payload, 2 history length (exact, so the recovery window is what
/// the operator configured), 3 TTL in seconds of meta and history (0 = none),
/// 4 topic, 5 topic tag (`m` channel, `i` inbox), 6 persistence kind (`msg`,
/// `dm`), 7 inbox owner (empty for a channel), 8 message id, 9 lifetime of
/// the idempotency record in ms, 10 low-water mark and 11 its step (see below).
///
/// Returns `{offset, epoch, msg_id, replayed, limit}`: `replayed` is 1 when
/// the record of an earlier call with the same key answered (nothing was
/// written; `msg_id` is the first call's); `limit` is the stream's reserved
/// bound when fewer than the low-water mark offsets are left (at every `step`-th
/// offset), so the caller reserves the next block in time, else 0.
///
/// Errors, before anything is written: [`NO_EPOCH`] (start one with
/// [`INIT_EPOCH`] and retry), [`NO_BLOCK`]` <epoch> <top>` (reserve a block,
/// [`EXTEND_BLOCK`], and retry).
pub const APPEND: &str = r#"
if KEYS[5] then
  local prior = redis.call('GET', KEYS[5])
  if prior then
    local offset, epoch, id = string.match(prior, '^(%d+):([^:]*):(.*)$')
    return {tonumber(offset), epoch, id, 1, 0}
  end
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'top', 'limit')
local gen = redis.call('HGET', KEYS[4], 'gen') or '0'
if not meta[1] or (meta[2] or '0') ~= gen then
  return redis.error_reply('NOEPOCH no epoch in this generation of Redis')
end
local top = tonumber(meta[3] or 0)
local limit = tonumber(meta[4] or 0)
if top >= limit then
  return redis.error_reply('NOBLOCK ' .. meta[1] .. ' ' .. top)
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
if ARGV[7] == '' then
  redis.call('XADD', KEYS[3], '*', 'k', ARGV[6], 'o', offset, 'd', ARGV[1])
else
  redis.call('XADD', KEYS[3], '*', 'k', ARGV[6], 'u', ARGV[7], 'o', offset, 'd', ARGV[1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5] .. offset .. ':' .. meta[1] .. ':' .. ARGV[1])
if KEYS[5] then
  redis.call('SET', KEYS[5], offset .. ':' .. meta[1] .. ':' .. ARGV[8], 'PX', ARGV[9])
end
local left = limit - offset
if left <= tonumber(ARGV[10]) and left % tonumber(ARGV[11]) == 0 then
  return {offset, meta[1], ARGV[8], 0, limit}
end
return {offset, meta[1], ARGV[8], 0, 0}
"#;

/// Prefix of the error [`APPEND`] returns for a stream without a valid epoch.
pub const NO_EPOCH: &str = "NOEPOCH";

/// Prefix of the error [`APPEND`] returns when the stream's reserved block is
/// used up; followed by the epoch and the top offset.
pub const NO_BLOCK: &str = "NOBLOCK";

/// Start a stream's epoch unless it has a valid one, and read its position.
///
/// `KEYS`: meta hash, history stream, life key. `ARGV`: 1 new epoch, 2 the
/// offset to start after (the bound reserved in PostgreSQL), 3 the limit (the
/// newly reserved bound), 4 TTL seconds (0 = none). Returns `{top, epoch,
/// limit, started}`. The epoch starts after the highest of the floor, the old
/// meta's `top` and the newest entry left in the history stream, so even a
/// stream without reservations (a gateway without PostgreSQL) never goes back.
/// Entries of the old epoch stay in the history stream (they are real
/// messages, with offsets below the new ones); `base` marks where the epoch
/// starts, so recovery reads only the new epoch.
pub const INIT_EPOCH: &str = r#"
local gen = redis.call('HGET', KEYS[3], 'gen') or '0'
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'top', 'limit')
if meta[1] and (meta[2] or '0') == gen then
  return {tonumber(meta[3] or 0), meta[1], tonumber(meta[4] or 0), 0}
end
local floor = math.max(tonumber(ARGV[2]), tonumber(meta[3] or 0))
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then
  floor = math.max(floor, tonumber(string.match(last[1][1], '^(%d+)')))
end
local limit = math.max(tonumber(ARGV[3]), floor)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'gen', gen, 'top', floor, 'base', floor, 'limit', limit)
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {floor, ARGV[1], limit, 1}
"#;

/// Raise a stream's limit to a bound just reserved in PostgreSQL.
///
/// `KEYS`: meta hash, life key. `ARGV`: 1 the epoch the block was reserved
/// for, 2 the new limit. Returns 1 when the epoch is still the valid one (the
/// limit is raised, never lowered), else 0.
pub const EXTEND_BLOCK: &str = r#"
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'limit')
if meta[1] ~= ARGV[1] or (meta[2] or '0') ~= gen then
  return 0
end
if tonumber(meta[3] or 0) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'limit', ARGV[2])
end
return 1
"#;

/// Read a stream's position and a range of its current epoch in one atomic step.
///
/// `KEYS`: meta hash, history stream, life key. `ARGV`: 1 first entry id (`-`
/// for the first message of the current epoch, or `<offset>-0`), 2 last entry
/// id (`+` for the newest, or `<offset>-0`), 3 most entries (0: the position
/// only). Returns `{epoch, top, entries}` with `epoch` false when the stream
/// has no valid epoch; every message above `top` is published after this
/// read, so a subscriber that reads this while subscribed misses nothing and
/// sees nothing twice.
pub const READ_RANGE: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'top', 'base')
local gen = redis.call('HGET', KEYS[3], 'gen') or '0'
if not meta[1] or (meta[2] or '0') ~= gen then
  return {false, 0, {}}
end
local entries = {}
if tonumber(ARGV[3]) > 0 then
  local first = ARGV[1]
  if first == '-' then
    first = (tonumber(meta[4] or 0) + 1) .. '-0'
  end
  entries = redis.call('XRANGE', KEYS[2], first, ARGV[2], 'COUNT', ARGV[3])
end
return {meta[1], tonumber(meta[3] or 0), entries}
"#;

/// Read the newest entries of a history stream below a position, with the
/// offset the current epoch starts after.
///
/// `KEYS`: meta hash, history stream, life key. `ARGV`: 1 last entry id (`+`
/// or `<offset>-0`), 2 most entries. Returns `{base, entries}`, newest first;
/// `base` is false when the stream has no valid epoch. Entries above `base`
/// are every message of the epoch from the oldest one kept, without a gap;
/// entries at or below it are what survived of older epochs.
pub const READ_PAGE: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'base')
local gen = redis.call('HGET', KEYS[3], 'gen') or '0'
local base = false
if meta[1] and (meta[2] or '0') == gen then
  base = tonumber(meta[3] or 0)
end
return {base, redis.call('XREVRANGE', KEYS[2], ARGV[1], '-', 'COUNT', ARGV[2])}
"#;

/// Record the Redis process serving a shard, moving the shard's generation on
/// when that process may have lost writes of the previous one.
///
/// `KEYS`: the shard's life key. `ARGV`: 1 the process's `run_id`, 2 `1` when
/// this process loses no acknowledged write in a crash (AOF with `appendfsync
/// always`, and not a promoted replica), else `0`. The same process again (its
/// script cache was flushed) changes nothing. A new process keeps the
/// generation only when both it and the previous one were lossless: a crash
/// of either kind of loss, a wipe (no life key), or a failover starts a new
/// generation, and every stream of the shard a new epoch on its next use.
/// Returns `{generation, recorded}`: `recorded` is 1 when this call recorded
/// the process (0: it was already).
pub const NEW_LIFE: &str = r#"
local life = redis.call('HMGET', KEYS[1], 'run', 'gen', 'lossless')
if life[1] == ARGV[1] then
  return {tonumber(life[2] or 0), 0}
end
local gen = tonumber(life[2] or 0)
if not (life[3] == '1' and ARGV[2] == '1') then
  gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
end
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'lossless', ARGV[2])
return {gen, 1}
"#;

/// Read where a user's inbox stands and what was last pushed to the user.
///
/// `KEYS`: inbox meta hash, life key. Returns `{epoch, seen}` (`seen`: the
/// newest inbox offset pushed to a connection of the user in this epoch, or
/// the epoch's start), or `{false, 0}` without a valid epoch.
pub const INBOX_CURSOR: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'gen', 'seen', 'base')
local gen = redis.call('HGET', KEYS[2], 'gen') or '0'
if not meta[1] or (meta[2] or '0') ~= gen then
  return {false, 0}
end
return {meta[1], tonumber(meta[3] or meta[4] or 0)}
"#;

/// Record that inbox `offset` of `epoch` reached a connection of the user.
///
/// `KEYS`: inbox meta hash. `ARGV`: 1 epoch, 2 offset. Only moves forward,
/// and only within the epoch. Returns 1 when it moved.
pub const INBOX_SEEN: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
if tonumber(redis.call('HGET', KEYS[1], 'seen') or 0) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'seen', ARGV[2])
  return 1
end
return 0
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
