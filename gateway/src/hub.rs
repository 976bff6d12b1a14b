//! Local routing: which connections of this process receive which topics.
//!
//! Messages of a channel reach a gateway in offset order on one pub/sub
//! connection and are dispatched from one task. The hub tracks the last offset
//! (and epoch) it delivered per channel: a repeat is dropped, a jump is filled
//! from the channel's history stream before the new message is delivered, and
//! after a pub/sub reconnect every channel is caught up the same way. So every
//! local subscriber sees a contiguous, duplicate-free sequence.
//!
//! A connection that is subscribing with recovery is first added as *pending*:
//! live messages are buffered for it until its reply (with the missed messages)
//! is queued, then only the buffered messages after its reply's offset follow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use chatcluster_protocol::LamportClock;
use chatcluster_protocol::entry::TopicEvent;
use chatcluster_protocol::frame::{ChannelMessage, ServerFrame};
use chatcluster_protocol::keys;

use crate::metrics::Metrics;
use crate::names::KnownNames;
use crate::outbox::{ConnId, Outbox, SharedFrame};
use crate::store::Store;

/// A connection's presence member name (`<user>/<instance>/<conn>`) and user.
pub type PresenceMember = (Arc<str>, Arc<str>);

/// Most messages fetched to fill one gap.
const GAP_FILL_LIMIT: usize = 10_000;

#[derive(Debug)]
struct Member {
    outbox: Outbox,
    presence: PresenceMember,
    /// `Some` while the member's subscribe reply is being prepared.
    pending: Option<Vec<(u64, Arc<SharedFrame>)>>,
    pending_limit: usize,
}

impl Member {
    /// Queues a frame, or buffers it while the member is pending.
    fn enqueue(&mut self, offset: u64, frame: &Arc<SharedFrame>) {
        match &mut self.pending {
            Some(buffer) if buffer.len() < self.pending_limit => {
                buffer.push((offset, frame.clone()))
            }
            Some(_) => {
                self.outbox.close(crate::outbox::CloseReason::SlowReader);
            }
            None => {
                self.outbox.push_shared(frame);
            }
        }
    }
}

#[derive(Debug, Default)]
struct ChannelState {
    members: HashMap<ConnId, Member>,
    /// Epoch and offset of the last message delivered here.
    last: Option<(String, u64)>,
}

/// Local subscribers and the delivery of topic messages to them.
#[derive(Debug)]
pub struct Hub {
    /// Names known to be registered in Redis.
    pub names: KnownNames,
    channels: Mutex<HashMap<String, ChannelState>>,
    users: Mutex<HashMap<String, HashMap<ConnId, Outbox>>>,
    store: Store,
    clock: Arc<LamportClock>,
    metrics: Arc<Metrics>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain maps behind, still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    /// An empty hub.
    pub fn new(store: Store, clock: Arc<LamportClock>, metrics: Arc<Metrics>) -> Self {
        Self {
            names: KnownNames::default(),
            channels: Mutex::default(),
            users: Mutex::default(),
            store,
            clock,
            metrics,
        }
    }

    /// Adds a connection to a channel as pending (buffering live messages, at
    /// most `pending_limit`) until [`Hub::activate`]. `presence` is the
    /// connection's presence member name and user.
    pub fn add_member(
        &self,
        channel: &str,
        outbox: Outbox,
        presence: PresenceMember,
        pending_limit: usize,
    ) {
        let mut channels = lock(&self.channels);
        let state = channels.entry(channel.to_owned()).or_default();
        state.members.insert(
            outbox.id(),
            Member {
                outbox,
                presence,
                pending: Some(Vec::new()),
                pending_limit,
            },
        );
        self.metrics.subscriptions.inc();
    }

    /// Ends a member's pending state: buffered messages after `offset` are
    /// queued (the reply holding everything up to `offset` is already queued).
    pub fn activate(&self, channel: &str, id: ConnId, epoch: &str, offset: u64) {
        let mut channels = lock(&self.channels);
        let Some(state) = channels.get_mut(channel) else {
            return;
        };
        if state.last.is_none() {
            state.last = Some((epoch.to_owned(), offset));
        }
        if let Some(member) = state.members.get_mut(&id) {
            for (message_offset, frame) in member.pending.take().unwrap_or_default() {
                if message_offset > offset && !member.outbox.push_shared(&frame) {
                    break;
                }
            }
        }
    }

    /// Removes a connection from a channel.
    pub fn remove_member(&self, channel: &str, id: ConnId) {
        let mut channels = lock(&self.channels);
        let Some(state) = channels.get_mut(channel) else {
            return;
        };
        if state.members.remove(&id).is_some() {
            self.metrics.subscriptions.dec();
        }
        if state.members.is_empty() {
            channels.remove(channel);
        }
    }

    /// Adds a connection as a receiver of a user's direct messages.
    pub fn add_user(&self, user: &str, outbox: Outbox) {
        lock(&self.users)
            .entry(user.to_owned())
            .or_default()
            .insert(outbox.id(), outbox);
    }

    /// Removes a connection of a user.
    pub fn remove_user(&self, user: &str, id: ConnId) {
        let mut users = lock(&self.users);
        if let Some(conns) = users.get_mut(user) {
            conns.remove(&id);
            if conns.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Every local channel with the presence member names and users of its
    /// members (for presence upkeep).
    pub fn presence_members(&self) -> Vec<(String, Vec<PresenceMember>)> {
        lock(&self.channels)
            .iter()
            .map(|(name, state)| {
                let members = state.members.values().map(|m| m.presence.clone()).collect();
                (name.clone(), members)
            })
            .collect()
    }

    /// Delivers one message received on `topic`.
    pub async fn dispatch(&self, topic: &str, payload: &[u8]) {
        let event = match TopicEvent::decode(payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%topic, %error, "undecodable topic message dropped");
                return;
            }
        };
        match event {
            TopicEvent::Message {
                offset,
                epoch,
                message,
            } => {
                let channel = message.channel.clone();
                if topic.strip_prefix(keys::CHANNEL_TOPIC_PREFIX) != Some(channel.as_str()) {
                    tracing::warn!(%topic, %channel, "message on a foreign topic dropped");
                    return;
                }
                self.fill_gap(&channel, &epoch, offset).await;
                self.deliver_message(&epoch, message.into_channel_message(offset));
            }
            TopicEvent::Presence(event) => {
                self.clock.observe(event.clock);
                let frame = SharedFrame::new(ServerFrame::Presence(event.clone()));
                let mut channels = lock(&self.channels);
                if let Some(state) = channels.get_mut(&event.channel) {
                    for member in state.members.values_mut() {
                        // Offset MAX: a pending member gets it right after its reply.
                        member.enqueue(u64::MAX, &frame);
                    }
                }
            }
            TopicEvent::Direct(direct) => {
                self.clock.observe(direct.clock);
                let Some(user) = topic.strip_prefix(keys::USER_TOPIC_PREFIX) else {
                    return;
                };
                let frame = SharedFrame::new(ServerFrame::Direct(direct.into_direct_message()));
                let users = lock(&self.users);
                for outbox in users.get(user).into_iter().flat_map(HashMap::values) {
                    outbox.push_shared(&frame);
                }
            }
        }
    }

    /// Delivers a message unless it was delivered already; records its offset.
    fn deliver_message(&self, epoch: &str, message: ChannelMessage) {
        self.clock.observe(message.clock);
        let offset = message.offset;
        let mut channels = lock(&self.channels);
        let Some(state) = channels.get_mut(&message.channel) else {
            return;
        };
        if let Some((last_epoch, last)) = &state.last
            && last_epoch == epoch
            && offset <= *last
        {
            return;
        }
        state.last = Some((epoch.to_owned(), offset));
        let frame = SharedFrame::new(ServerFrame::Message(message));
        for member in state.members.values_mut() {
            member.enqueue(offset, &frame);
        }
    }

    /// Fetches and delivers the messages between the last delivered offset and
    /// `offset` (exclusive; `None`: to the newest) from the history stream.
    async fn fill_gap(&self, channel: &str, epoch: &str, offset: u64) {
        let from = {
            let channels = lock(&self.channels);
            match channels.get(channel).and_then(|s| s.last.clone()) {
                Some((last_epoch, last)) if last_epoch == epoch && offset > last + 1 => last + 1,
                _ => return,
            }
        };
        self.catch_up(channel, epoch, from, Some(offset - 1)).await;
    }

    async fn catch_up(&self, channel: &str, epoch: &str, from: u64, to: Option<u64>) {
        match self
            .store
            .history_range(channel, from, to, GAP_FILL_LIMIT)
            .await
        {
            Ok(missing) => {
                self.metrics.gap_fills_total.inc_by(missing.len() as u64);
                for message in missing {
                    self.deliver_message(epoch, message);
                }
            }
            Err(error) => {
                self.metrics.redis_errors_total.inc();
                tracing::warn!(%channel, %error, "could not fill a gap from history");
            }
        }
    }

    /// After a pub/sub reconnect: delivers what every local channel missed
    /// while the subscription was down. A channel whose epoch changed (Redis
    /// lost its history) restarts its tracking from the new epoch. Redis may
    /// have restarted empty, so remembered names are forgotten and the users
    /// connected here are registered again.
    pub async fn resync(&self) {
        self.names.forget_all();
        let users: Vec<String> = lock(&self.users).keys().cloned().collect();
        for user in users {
            match self
                .store
                .register(crate::store::Registry::Users, &user)
                .await
            {
                Ok(_) => self.names.users.insert(&user),
                Err(error) => tracing::warn!(%user, %error, "could not register user again"),
            }
        }
        let tracked: Vec<(String, Option<(String, u64)>)> = lock(&self.channels)
            .iter()
            .map(|(name, state)| (name.clone(), state.last.clone()))
            .collect();
        for (channel, last) in tracked {
            let Some((epoch, last)) = last else { continue };
            match self.store.position(&channel).await {
                Ok(Some(position)) if position.epoch == epoch => {
                    self.catch_up(&channel, &epoch, last + 1, None).await;
                }
                Ok(_) => {
                    tracing::warn!(%channel, "channel history lost in Redis: new epoch");
                    if let Some(state) = lock(&self.channels).get_mut(&channel) {
                        state.last = None;
                    }
                }
                Err(error) => {
                    self.metrics.redis_errors_total.inc();
                    tracing::warn!(%channel, %error, "resync failed");
                }
            }
        }
    }
}
