//! What one client may cost: the weighted budget of its connection's ops and
//! the number of connections one user may hold on this process.
//!
//! Every op has a cost in budget units, roughly the backend work it causes
//! (`subscribe` is about six Redis calls and presence pushes; `ping` none).
//! A connection's ops draw on one token bucket (`OP_RATE` units per second,
//! `OP_BURST` at once); `publish` and `message` draw on the message bucket
//! (`PUBLISH_RATE`) instead, which is the budget's second bucket. An op the
//! budget cannot pay for yet waits until it can, up to `OP_WAIT`, with the
//! connection unread meanwhile (a client that pipelines is slowed down, not
//! refused); an op that would wait longer is answered `rate_limited`, and
//! that refusal (like a malformed frame, or a refused `publish` or
//! `message`: no request is free) is charged one unit, which may put
//! the bucket in debt: while it is, the socket is not read, so a client that
//! ignores `rate_limited` is slowed down by TCP instead of costing CPU.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use chatcluster_protocol::frame::Op;

/// Cost of the costliest op (`OP_BURST` must allow one).
pub const MAX_COST: f64 = 10.0;
/// Cost charged for a refused or malformed request.
pub const REFUSAL_COST: f64 = 1.0;

/// The op budget cost of `op`; `None` for the ops paid from the message
/// bucket (`publish`, `message`).
pub fn cost(op: &Op) -> Option<f64> {
    Some(match op {
        Op::Ping => 1.0,
        Op::Presence { .. } => 2.0,
        Op::Login { .. } | Op::Refresh { .. } | Op::Unsubscribe { .. } => 5.0,
        Op::Subscribe { .. }
        | Op::Channel { .. }
        | Op::Users { .. }
        | Op::Channels { .. }
        | Op::History { .. }
        | Op::Conversations { .. }
        | Op::DmHistory { .. } => MAX_COST,
        Op::Publish { .. } | Op::Message { .. } => return None,
    })
}

/// Shards of [`UserConnections`] (a login locks one).
const SHARDS: usize = 16;

/// Open connections per user on this process, limited to `max` each.
#[derive(Debug)]
pub struct UserConnections {
    max: u32,
    shards: Vec<Mutex<HashMap<String, u32>>>,
}

/// One user's connection slot; released when dropped.
#[derive(Debug)]
pub struct UserSlot {
    owner: Arc<UserConnections>,
    user: String,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut shard = self.owner.shard(&self.user);
        if let Some(count) = shard.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(&self.user);
            }
        }
    }
}

impl UserConnections {
    /// At most `max` connections per user; 0 means no limit.
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        })
    }

    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        let mut hasher = DefaultHasher::new();
        user.hash(&mut hasher);
        let index = (hasher.finish() % SHARDS as u64) as usize;
        // A poisoned shard only means a panic elsewhere held it; the counts stay usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for one more connection of `user`, or `None` at the limit.
    pub fn acquire(self: &Arc<Self>, user: &str) -> Option<UserSlot> {
        let mut shard = self.shard(user);
        let count = shard.entry(user.to_owned()).or_default();
        if self.max > 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        drop(shard);
        Some(UserSlot {
            owner: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Open connections of `user`.
    #[cfg(test)]
    fn count(&self, user: &str) -> u32 {
        self.shard(user).get(user).copied().unwrap_or(0)
    }

    /// The limit (0: none).
    pub fn max(&self) -> u32 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::frame::Token;

    #[test]
    fn every_op_has_a_cost_within_the_maximum() {
        let ops = [
            Op::Ping,
            Op::Login {
                user: "a".into(),
                since: None,
            },
            Op::Users {
                cursor: None,
                limit: None,
            },
            Op::Channels {
                cursor: None,
                limit: None,
            },
            Op::Channel {
                channel: "a".into(),
            },
            Op::Subscribe {
                channel: "a".into(),
                since: None,
            },
            Op::Unsubscribe {
                channel: "a".into(),
            },
            Op::Presence {
                channel: "a".into(),
            },
            Op::History {
                channel: "a".into(),
                before: None,
                limit: None,
            },
            Op::Refresh {
                token: Token("t".into()),
            },
            Op::Conversations {
                before: None,
                limit: None,
            },
            Op::DmHistory {
                with: "b".into(),
                before: None,
                limit: None,
            },
        ];
        for op in &ops {
            let cost = cost(op).expect("op budget");
            assert!(cost > 0.0 && cost <= MAX_COST, "{op:?}");
        }
        assert_eq!(
            cost(&Op::Publish {
                channel: "a".into(),
                text: "t".into(),
                idempotency_key: None,
            }),
            None
        );
    }

    #[test]
    fn user_slots_are_limited_and_released() {
        let users = UserConnections::new(2);
        let a1 = users.acquire("alice").expect("first");
        let a2 = users.acquire("alice").expect("second");
        assert!(users.acquire("alice").is_none(), "third refused");
        let b = users.acquire("bob").expect("other users are separate");
        assert_eq!(users.count("alice"), 2);
        drop(a1);
        let a3 = users.acquire("alice").expect("a slot was released");
        drop((a2, a3, b));
        assert_eq!(users.count("alice"), 0);
        assert!(users.shards.iter().all(|s| s.lock().unwrap().is_empty()));
        let unlimited = UserConnections::new(0);
        let slots: Vec<_> = (0..1000).filter_map(|_| unlimited.acquire("x")).collect();
        assert_eq!(slots.len(), 1000);
    }
}
