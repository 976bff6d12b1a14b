//! Redis key layout (DESIGN.md "Redis layout").
//!
//! All keys of one channel share the hash tag `{sN}` of its persistence shard,
//! so one Lua script touches one Cluster slot. `shard(ch) = crc32(ch) % S`.

/// Consumer group of the persistence streams.
pub const PERSIST_GROUP: &str = "persist";
/// Set of every channel name ever created.
pub const CHANNELS_SET: &str = "cc:channels";
/// Set of every user name that ever logged in.
pub const USERS_SET: &str = "cc:users";
/// Sorted set (every score 0, so ordered by name) of the names in
/// [`CHANNELS_SET`]: `channels` pages through it by name.
pub const CHANNELS_INDEX: &str = "cc:channels:index";
/// Sorted index of [`USERS_SET`], like [`CHANNELS_INDEX`].
pub const USERS_INDEX: &str = "cc:users:index";

/// `cc:quota:chan:<user>`: channels the user created in the current
/// `CHANNEL_CREATE_WINDOW` (expires with the window).
pub fn channel_quota_key(user: &str) -> String {
    format!("cc:quota:chan:{user}")
}
/// Prefix of the dead-letter stream of a shard (`cc:{sN}:dead`).
const DEAD_SUFFIX: &str = "dead";

/// The persistence shard of a name (channel or user) among `shards` shards.
pub fn shard_of(name: &str, shards: u32) -> u32 {
    crc32fast::hash(name.as_bytes()) % shards.max(1)
}

/// `cc:{sN}:meta:<channel>`: hash with `epoch` and `top`.
pub fn meta_key(channel: &str, shards: u32) -> String {
    format!("cc:{{s{}}}:meta:{channel}", shard_of(channel, shards))
}

/// `cc:{sN}:hist:<channel>`: the channel's recent-history stream.
pub fn history_key(channel: &str, shards: u32) -> String {
    format!("cc:{{s{}}}:hist:{channel}", shard_of(channel, shards))
}

/// `cc:{sN}:presence:<channel>`: zset of `<user>/<conn-id>`, score = expiry ms.
pub fn presence_key(channel: &str, shards: u32) -> String {
    format!("cc:{{s{}}}:presence:{channel}", shard_of(channel, shards))
}

/// `cc:{sN}:presence-users:<channel>`: hash of user to connection count, so
/// joins and leaves are announced once per user, not per connection.
pub fn presence_users_key(channel: &str, shards: u32) -> String {
    format!(
        "cc:{{s{}}}:presence-users:{channel}",
        shard_of(channel, shards)
    )
}

/// `cc:{sN}:imeta:<user>`: hash with the user inbox's `epoch`, `top` and the
/// offset last pushed to the user (`seen`).
pub fn inbox_meta_key(user: &str, shards: u32) -> String {
    format!("cc:{{s{}}}:imeta:{user}", shard_of(user, shards))
}

/// `cc:{sN}:inbox:<user>`: the user's recent direct messages, sent and
/// received, entry id `<inbox offset>-0`.
pub fn inbox_key(user: &str, shards: u32) -> String {
    format!("cc:{{s{}}}:inbox:{user}", shard_of(user, shards))
}

/// `cc:{sN}:life`: hash with the life of Redis a shard's epochs belong to
/// (`run`, `gen`, `lossless`; see [`crate::scripts::NEW_LIFE`]).
pub fn life_key(shard: u32) -> String {
    format!("cc:{{s{shard}}}:life")
}

/// `cc:{sN}:idem:<channel>/<user>/<key>`: the first result of a publish by
/// `user` with idempotency key `key` (channel names hold no `/`).
pub fn publish_record_key(channel: &str, user: &str, key: &str, shards: u32) -> String {
    format!(
        "cc:{{s{}}}:idem:{channel}/{user}/{key}",
        shard_of(channel, shards)
    )
}

/// `cc:{sN}:idem:@<owner>/<sender>/<key>`: the first result of a direct
/// message by `sender` with idempotency key `key`, in `owner`'s inbox (`@`
/// never starts a channel name, so these never meet a publish record).
pub fn direct_record_key(owner: &str, sender: &str, key: &str, shards: u32) -> String {
    format!(
        "cc:{{s{}}}:idem:@{owner}/{sender}/{key}",
        shard_of(owner, shards)
    )
}

/// `cc:{sN}:persist`: the persistence stream of shard `shard`.
pub fn persist_key(shard: u32) -> String {
    format!("cc:{{s{shard}}}:persist")
}

/// `cc:{sN}:dead`: entries of shard `shard` the worker could not decode.
pub fn dead_letter_key(shard: u32) -> String {
    format!("cc:{{s{shard}}}:{DEAD_SUFFIX}")
}

/// Every persistence stream key for `shards` shards.
pub fn persist_keys(shards: u32) -> Vec<String> {
    (0..shards.max(1)).map(persist_key).collect()
}

/// Prefix of channel topics; the channel name follows.
pub const CHANNEL_TOPIC_PREFIX: &str = "cc:ch:";
/// Prefix of user topics; the user name follows.
pub const USER_TOPIC_PREFIX: &str = "cc:user:";

/// `cc:ch:<channel>`: pub/sub topic of a channel's messages and presence events.
pub fn channel_topic(channel: &str) -> String {
    format!("{CHANNEL_TOPIC_PREFIX}{channel}")
}

/// `cc:user:<user>`: pub/sub topic of a user's direct messages.
pub fn user_topic(user: &str) -> String {
    format!("{USER_TOPIC_PREFIX}{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_channel_share_a_hash_tag() {
        let s = shard_of("geral", 4);
        let tag = format!("{{s{s}}}");
        assert!(meta_key("geral", 4).contains(&tag));
        assert!(history_key("geral", 4).contains(&tag));
        assert!(presence_key("geral", 4).contains(&tag));
        assert!(presence_users_key("geral", 4).contains(&tag));
        assert!(persist_key(s).contains(&tag));
        assert!(life_key(s).contains(&tag));
        assert!(publish_record_key("geral", "bob", "k1", 4).contains(&tag));
        let u = format!("{{s{}}}", shard_of("bob", 4));
        assert!(inbox_meta_key("bob", 4).contains(&u));
        assert!(inbox_key("bob", 4).contains(&u));
        assert!(direct_record_key("bob", "alice", "k1", 4).contains(&u));
    }

    #[test]
    fn layout_matches_design() {
        // crc32("geral") is fixed; the layout must never change under users' data.
        assert_eq!(shard_of("geral", 4), crc32fast::hash(b"geral") % 4);
        assert_eq!(persist_key(2), "cc:{s2}:persist");
        assert_eq!(dead_letter_key(1), "cc:{s1}:dead");
        assert_eq!(channel_topic("a.b"), "cc:ch:a.b");
        assert_eq!(user_topic("bob"), "cc:user:bob");
        assert_eq!(
            persist_keys(3),
            ["cc:{s0}:persist", "cc:{s1}:persist", "cc:{s2}:persist"]
        );
        assert_eq!(shard_of("x", 0), 0, "zero shards is treated as one");
    }
}
