//! The delivery core: from topic messages to the outboxes of local connections.
//!
//! Each topic (a channel, or a user's inbox of direct messages) belongs to one
//! of as many dispatcher tasks as there are cores, by hash of its name; a
//! dispatcher owns the [`sequencer::Sequencer`]s of its topics, so the
//! delivery path has no global lock and spreads over every core. Queues
//! into dispatchers are bounded. The pub/sub intake never waits: when a
//! dispatcher's queue is full the message is dropped and its channel is marked
//! for a resync, which reads what was dropped back from the history stream.
//!
//! The rest of the gateway talks to this module through [`Delivery`]: joining
//! and leaving channels and inboxes, and the presence members to refresh.

pub mod dispatcher;
pub mod fetch;
pub mod sequencer;

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use chatcluster_protocol::frame::Since;
use chatcluster_protocol::stream::StreamId;

use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox};
use crate::pubsub::Inbound;
use dispatcher::{Context, Dispatcher, Event};
use sequencer::{JoinError, JoinRequest, Joined, PresenceMember, ReplyContext};

/// Events queued to one dispatcher at most.
const QUEUE: usize = 16 * 1024;

/// Topics dropped at the intake, waiting to be resynced.
#[derive(Default)]
struct Overflow {
    topics: Mutex<(HashSet<Bytes>, bool)>,
    wake: Notify,
}

struct Shard {
    tx: mpsc::Sender<Event>,
    overflow: Arc<Overflow>,
}

/// Handle to the delivery core; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    shards: Arc<[Shard]>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("dispatchers", &self.shards.len())
            .finish()
    }
}

/// The delivery core stopped (the gateway is shutting down).
fn stopped() -> JoinError {
    JoinError {
        code: chatcluster_protocol::ErrorCode::Unavailable,
        message: "gateway shutting down; reconnect".into(),
    }
}

impl Delivery {
    /// Starts `dispatchers` dispatcher tasks sharing `ctx`; they stop when
    /// every handle is dropped.
    pub fn start(dispatchers: usize, ctx: Context) -> Self {
        let ctx = Arc::new(ctx);
        let metrics = ctx.metrics.clone();
        let shards: Vec<Shard> = (0..dispatchers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let overflow = Arc::new(Overflow::default());
                tokio::spawn(Dispatcher::new(rx, tx.downgrade(), ctx.clone()).run());
                tokio::spawn(resync_overflowed(tx.downgrade(), overflow.clone()));
                Shard { tx, overflow }
            })
            .collect();
        Self {
            shards: shards.into(),
            metrics,
        }
    }

    fn shard(&self, topic: &[u8]) -> &Shard {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(topic);
        &self.shards[(hash % self.shards.len() as u64) as usize]
    }

    async fn send(&self, topic: &[u8], event: Event) -> bool {
        self.shard(topic).tx.send(event).await.is_ok()
    }

    /// Subscribes a connection to a channel, or joins a logged-in connection
    /// to its user's inbox. The sequencer queues the reply itself (so that it
    /// precedes every push above its offset); on error nothing was queued and
    /// the caller answers.
    pub async fn join(
        &self,
        stream: StreamId,
        outbox: Outbox,
        presence: Option<PresenceMember>,
        since: Option<Since>,
        reply: ReplyContext,
    ) -> Result<Joined, JoinError> {
        let (done, answer) = oneshot::channel();
        let request = JoinRequest {
            outbox,
            presence,
            since,
            reply,
            done,
        };
        let topic = stream.topic();
        if !self
            .send(topic.as_bytes(), Event::Join { stream, request })
            .await
        {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Removes a connection from a channel or inbox; nothing is queued to it
    /// for the stream after this returns.
    pub async fn leave(&self, stream: StreamId, conn: ConnId) {
        let topic = stream.topic();
        self.send(topic.as_bytes(), Event::Leave { stream, conn })
            .await;
    }

    /// Users with a connection on this gateway.
    pub async fn online_users(&self) -> Vec<Arc<str>> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let (reply, answer) = oneshot::channel();
            if shard.tx.send(Event::Users(reply)).await.is_ok()
                && let Ok(users) = answer.await
            {
                all.extend(users);
            }
        }
        all
    }

    /// Every local channel with the presence members of its subscribers.
    pub async fn presence_members(&self) -> Vec<(Arc<str>, Vec<PresenceMember>)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let (reply, answer) = oneshot::channel();
            if shard.tx.send(Event::Members(reply)).await.is_ok()
                && let Ok(members) = answer.await
            {
                all.extend(members);
            }
        }
        all
    }
}

impl Shard {
    /// Queues a topic message without waiting; when the queue is full the
    /// topic is marked for a resync instead. Returns whether it was queued.
    fn offer(&self, topic: &[u8], payload: Bytes) -> bool {
        let event = Event::Topic {
            topic: Bytes::copy_from_slice(topic),
            payload,
        };
        if self.tx.try_send(event).is_ok() {
            return true;
        }
        let mut pending = self
            .overflow
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.0.insert(Bytes::copy_from_slice(topic));
        drop(pending);
        self.overflow.wake.notify_one();
        false
    }
}

impl Inbound for Delivery {
    fn message(&self, topic: &[u8], payload: Bytes) {
        if !self.shard(topic).offer(topic, payload) {
            self.metrics.intake_overflow_total.inc();
        }
    }

    fn resubscribed(&self) {
        for shard in self.shards.iter() {
            shard
                .overflow
                .topics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .1 = true;
            shard.overflow.wake.notify_one();
        }
    }
}

/// Sends a shard the resyncs its intake could not queue, once there is room.
async fn resync_overflowed(tx: mpsc::WeakSender<Event>, overflow: Arc<Overflow>) {
    loop {
        overflow.wake.notified().await;
        let Some(tx) = tx.upgrade() else {
            return;
        };
        let (topics, all) = {
            let mut pending = overflow.topics.lock().unwrap_or_else(|p| p.into_inner());
            (pending.0.drain().collect(), std::mem::take(&mut pending.1))
        };
        if tx.send(Event::Resync { topics, all }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_turns_messages_into_one_resync_of_their_topics() {
        let (tx, mut rx) = mpsc::channel(1);
        let overflow = Arc::new(Overflow::default());
        let shard = Shard {
            tx: tx.clone(),
            overflow: overflow.clone(),
        };
        assert!(shard.offer(b"cc:ch:a", Bytes::from_static(b"1")));
        assert!(!shard.offer(b"cc:ch:a", Bytes::from_static(b"2")));
        assert!(!shard.offer(b"cc:ch:b", Bytes::from_static(b"3")));
        assert!(!shard.offer(b"cc:ch:a", Bytes::from_static(b"4")));
        tokio::spawn(resync_overflowed(tx.downgrade(), overflow));
        assert!(matches!(rx.recv().await, Some(Event::Topic { .. })));
        let Some(Event::Resync { mut topics, all }) = rx.recv().await else {
            panic!("the dropped topics come back as a resync");
        };
        topics.sort();
        assert_eq!(
            topics,
            [
                Bytes::from_static(b"cc:ch:a"),
                Bytes::from_static(b"cc:ch:b")
            ]
        );
        assert!(!all);
    }
}
