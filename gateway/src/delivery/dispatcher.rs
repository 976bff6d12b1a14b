//! A dispatcher task: owns the sequencers and direct-message routes of the
//! topics that hash to it, and carries out their effects.
//!
//! Everything a sequencer does happens on this one task, in the order the
//! events arrive, so sequencers need no locks. Redis work (subscribing a topic,
//! reading history) runs in spawned tasks whose answers come back as events:
//! a channel waiting for a read never holds up another channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use chatcluster_protocol::LamportClock;
use chatcluster_protocol::entry::TopicEvent;
use chatcluster_protocol::frame::ServerFrame;
use chatcluster_protocol::keys;

use crate::delivery::fetch;
use crate::delivery::sequencer::{
    Effect, Fetched, Input, JoinRequest, PresenceMember, Sequencer, Tally,
};
use crate::delivery::users::{Online, UserRoute};
use crate::history::History;
use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox, SharedFrame};
use crate::pubsub::PubSub;
use crate::store::Store;

/// Events drained per wake-up at most.
const BATCH: usize = 256;
/// How often idle topics are released and failed reads retried.
const TICK: Duration = Duration::from_millis(500);

/// What a dispatcher is asked to do.
#[derive(Debug)]
pub enum Event {
    /// A message read on a topic.
    Topic {
        /// The topic.
        topic: Bytes,
        /// The raw topic payload.
        payload: Bytes,
    },
    /// Messages of these channel topics (or of all, when `all`) may have been
    /// missed: catch up from history.
    Resync {
        /// Topics that overflowed the intake.
        topics: Vec<Bytes>,
        /// The pub/sub connection was lost: every channel catches up.
        all: bool,
    },
    /// A connection subscribes to a channel.
    Join {
        /// The channel.
        channel: Arc<str>,
        /// The request.
        request: JoinRequest,
    },
    /// A connection leaves a channel.
    Leave {
        /// The channel.
        channel: Arc<str>,
        /// The connection.
        conn: ConnId,
    },
    /// A logged-in connection receives its user's direct messages.
    Online {
        /// The user.
        user: Arc<str>,
        /// The connection.
        outbox: Outbox,
        /// Answered once the user's topic is subscribed.
        online: Online,
    },
    /// A connection stops receiving its user's direct messages.
    Offline {
        /// The user.
        user: Arc<str>,
        /// The connection.
        conn: ConnId,
    },
    /// A topic subscription's outcome.
    Subscribed {
        /// The topic.
        topic: Bytes,
        /// Which life of the topic's sequencer or route asked.
        generation: u64,
        /// The outcome.
        result: Result<(), String>,
    },
    /// A sequencer's read came back.
    Fetched {
        /// The channel.
        channel: Arc<str>,
        /// Which life of the channel's sequencer asked.
        generation: u64,
        /// The read's id.
        id: u64,
        /// What it found.
        result: Result<Fetched, String>,
    },
    /// Presence members of every local subscription, for presence upkeep.
    Members(oneshot::Sender<Vec<(Arc<str>, Vec<PresenceMember>)>>),
    /// Users with a connection here.
    Users(oneshot::Sender<Vec<Arc<str>>>),
}

/// What the dispatchers share.
#[derive(Debug)]
pub struct Context {
    /// Redis requests.
    pub store: Store,
    /// PostgreSQL reads (for a new epoch's floor).
    pub history: History,
    /// The subscriber connection.
    pub pubsub: PubSub,
    /// The process's Lamport clock.
    pub clock: Arc<LamportClock>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Frames a joining connection may have kept for it.
    pub keep_limit: usize,
    /// How long a topic stays subscribed after its last local connection left.
    pub linger: Duration,
}

struct Channel {
    sequencer: Sequencer,
    generation: u64,
}

struct User {
    route: UserRoute,
    generation: u64,
}

/// One dispatcher task's state.
pub struct Dispatcher {
    rx: mpsc::Receiver<Event>,
    /// Its own queue, for the answers of spawned work (weak: the dispatcher
    /// stops once every [`crate::delivery::Delivery`] handle is gone).
    tx: mpsc::WeakSender<Event>,
    ctx: Arc<Context>,
    channels: HashMap<Arc<str>, Channel>,
    users: HashMap<Arc<str>, User>,
    effects: Vec<Effect>,
    tally: Tally,
    next_generation: u64,
}

/// Which kind of topic a topic name is.
enum Topic<'a> {
    Channel(&'a str),
    User(&'a str),
}

fn parse_topic(topic: &[u8]) -> Option<Topic<'_>> {
    let topic = std::str::from_utf8(topic).ok()?;
    if let Some(channel) = topic.strip_prefix(keys::CHANNEL_TOPIC_PREFIX) {
        Some(Topic::Channel(channel))
    } else {
        topic.strip_prefix(keys::USER_TOPIC_PREFIX).map(Topic::User)
    }
}

impl Dispatcher {
    /// A dispatcher reading `rx`; `tx` is its own queue, for answers of spawned work.
    pub fn new(rx: mpsc::Receiver<Event>, tx: mpsc::WeakSender<Event>, ctx: Arc<Context>) -> Self {
        Self {
            rx,
            tx,
            ctx,
            channels: HashMap::new(),
            users: HashMap::new(),
            effects: Vec::new(),
            tally: Tally::default(),
            next_generation: 1,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = self.rx.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    let now = Instant::now();
                    for event in batch.drain(..) {
                        self.handle(event, now);
                    }
                }
                _ = tick.tick() => self.tick(Instant::now()),
            }
            self.flush_tally();
        }
    }

    fn flush_tally(&mut self) {
        let tally = std::mem::take(&mut self.tally);
        let metrics = &self.ctx.metrics;
        if tally.frames_out > 0 {
            metrics.messages_out_total.inc_by(tally.frames_out);
        }
        if tally.slow_readers > 0 {
            metrics
                .slow_reader_disconnects_total
                .inc_by(tally.slow_readers);
        }
        if tally.gap_filled > 0 {
            metrics.gap_fills_total.inc_by(tally.gap_filled);
        }
        if tally.lost > 0 {
            metrics.lost_offsets_total.inc_by(tally.lost);
        }
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Topic { topic, payload } => self.topic(&topic, &payload, now),
            Event::Resync { topics, all } => {
                let channels: Vec<Arc<str>> = if all {
                    self.channels.keys().cloned().collect()
                } else {
                    topics
                        .iter()
                        .filter_map(|t| match parse_topic(t) {
                            Some(Topic::Channel(channel)) => Some(Arc::from(channel)),
                            _ => None,
                        })
                        .collect()
                };
                for channel in channels {
                    self.send_channel(&channel, Input::Resync, now);
                }
            }
            Event::Join { channel, request } => {
                if !self.channels.contains_key(&channel) {
                    let generation = self.generation();
                    let sequencer =
                        Sequencer::new(channel.clone(), self.ctx.keep_limit, &mut self.effects);
                    self.channels.insert(
                        channel.clone(),
                        Channel {
                            sequencer,
                            generation,
                        },
                    );
                }
                self.send_channel(&channel, Input::Join(request), now);
            }
            Event::Leave { channel, conn } => self.send_channel(&channel, Input::Leave(conn), now),
            Event::Online {
                user,
                outbox,
                online,
            } => self.online(user, outbox, online),
            Event::Offline { user, conn } => {
                if let Some(entry) = self.users.get_mut(&user) {
                    entry.route.remove(conn, now);
                }
            }
            Event::Subscribed {
                topic,
                generation,
                result,
            } => self.subscribed(&topic, generation, result, now),
            Event::Fetched {
                channel,
                generation,
                id,
                result,
            } => {
                if self
                    .channels
                    .get(&channel)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.send_channel(&channel, Input::Fetched(id, result), now);
                }
            }
            Event::Members(reply) => {
                let members = self
                    .channels
                    .iter()
                    .map(|(name, c)| {
                        (
                            name.clone(),
                            c.sequencer.presence_members().cloned().collect(),
                        )
                    })
                    .collect();
                let _ = reply.send(members);
            }
            Event::Users(reply) => {
                let _ = reply.send(self.users.keys().cloned().collect());
            }
        }
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// A message or event read on a topic.
    fn topic(&mut self, topic: &[u8], payload: &[u8], now: Instant) {
        let event = match TopicEvent::decode(payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(topic = %String::from_utf8_lossy(topic), %error, "undecodable topic message dropped");
                return;
            }
        };
        match (parse_topic(topic), event) {
            (
                Some(Topic::Channel(channel)),
                TopicEvent::Message {
                    offset,
                    epoch,
                    message,
                },
            ) if message.channel == channel => {
                self.ctx.clock.observe(message.clock);
                let Some(entry) = self.channels.get_mut(channel) else {
                    return;
                };
                let frame =
                    SharedFrame::new(ServerFrame::Message(message.into_channel_message(offset)));
                let input = Input::Live {
                    offset,
                    epoch: epoch.into(),
                    frame,
                };
                entry.sequencer.handle(input, now, &mut self.effects);
                let channel: Arc<str> = entry.sequencer.channel().clone();
                self.after(&channel);
            }
            (Some(Topic::Channel(channel)), TopicEvent::Presence(event))
                if event.channel == channel =>
            {
                self.ctx.clock.observe(event.clock);
                if self.channels.contains_key(channel) {
                    let channel: Arc<str> = channel.into();
                    let frame = SharedFrame::new(ServerFrame::Presence(event));
                    self.send_channel(&channel, Input::Presence(frame), now);
                }
            }
            (Some(Topic::User(user)), TopicEvent::Direct(direct)) => {
                self.ctx.clock.observe(direct.clock);
                if let Some(entry) = self.users.get(user) {
                    let frame = SharedFrame::new(ServerFrame::Direct(direct.into_direct_message()));
                    let (queued, slow) = entry.route.deliver(&frame);
                    self.tally.frames_out += queued;
                    self.tally.slow_readers += slow;
                }
            }
            _ => {
                tracing::warn!(topic = %String::from_utf8_lossy(topic), "message on a foreign topic dropped");
            }
        }
    }

    /// Gives an input to a channel's sequencer, if it exists, and carries out
    /// what it asks.
    fn send_channel(&mut self, channel: &Arc<str>, input: Input, now: Instant) {
        if let Some(entry) = self.channels.get_mut(channel) {
            entry.sequencer.handle(input, now, &mut self.effects);
            self.after(channel);
        }
    }

    /// Carries out a sequencer's effects, collects its tally, and drops it
    /// when it failed to start.
    fn after(&mut self, channel: &Arc<str>) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let tally = std::mem::take(&mut entry.sequencer.tally);
        self.tally.frames_out += tally.frames_out;
        self.tally.slow_readers += tally.slow_readers;
        self.tally.gap_filled += tally.gap_filled;
        self.tally.lost += tally.lost;
        let generation = entry.generation;
        let failed = entry.sequencer.is_failed();
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Subscribe => {
                    self.subscribe(Bytes::from(keys::channel_topic(channel)), generation)
                }
                Effect::Fetch(request) => {
                    let ctx = self.ctx.clone();
                    let Some(tx) = self.tx.upgrade() else {
                        continue;
                    };
                    let channel = channel.clone();
                    tokio::spawn(async move {
                        let result = fetch::run(&ctx.store, &ctx.history, &channel, &request).await;
                        let _ = tx
                            .send(Event::Fetched {
                                channel,
                                generation,
                                id: request.id,
                                result,
                            })
                            .await;
                    });
                }
            }
        }
        if failed {
            self.channels.remove(channel);
            self.ctx
                .pubsub
                .try_unsubscribe(Bytes::from(keys::channel_topic(channel)));
        }
    }

    /// Asks for a topic subscription; the outcome comes back as an event.
    fn subscribe(&mut self, topic: Bytes, generation: u64) {
        match self.ctx.pubsub.try_subscribe(topic.clone()) {
            Ok(answer) => {
                let Some(tx) = self.tx.upgrade() else { return };
                tokio::spawn(async move {
                    let result = match answer.await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err("pub/sub task stopped".to_owned()),
                    };
                    let _ = tx
                        .send(Event::Subscribed {
                            topic,
                            generation,
                            result,
                        })
                        .await;
                });
            }
            Err(error) => {
                let result = Err(error.to_string());
                self.subscribed(&topic, generation, result, Instant::now());
            }
        }
    }

    fn subscribed(
        &mut self,
        topic: &[u8],
        generation: u64,
        result: Result<(), String>,
        now: Instant,
    ) {
        match parse_topic(topic) {
            Some(Topic::Channel(channel)) => {
                let channel: Arc<str> = channel.into();
                if self
                    .channels
                    .get(&channel)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.send_channel(&channel, Input::Subscribed(result), now);
                }
            }
            Some(Topic::User(user)) => {
                if let Some(entry) = self.users.get_mut(user)
                    && entry.generation == generation
                    && !entry.route.subscribed(result)
                {
                    self.users.remove(user);
                }
            }
            None => {}
        }
    }

    fn online(&mut self, user: Arc<str>, outbox: Outbox, online: Online) {
        if let Some(entry) = self.users.get_mut(&user) {
            entry.route.add(outbox, online);
            return;
        }
        let generation = self.generation();
        let route = UserRoute::new(outbox, online);
        self.users.insert(user.clone(), User { route, generation });
        self.subscribe(Bytes::from(keys::user_topic(&user)), generation);
    }

    /// Releases topics idle past the linger and retries failed catch-ups.
    fn tick(&mut self, now: Instant) {
        let linger = self.ctx.linger;
        let names: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        for channel in names {
            let Some(entry) = self.channels.get_mut(&channel) else {
                continue;
            };
            let finished = entry.sequencer.tick(now, linger, &mut self.effects);
            self.after(&channel);
            if finished
                && self
                    .ctx
                    .pubsub
                    .try_unsubscribe(Bytes::from(keys::channel_topic(&channel)))
            {
                self.channels.remove(&channel);
            }
        }
        let pubsub = &self.ctx.pubsub;
        self.users.retain(|user, entry| {
            !(entry.route.expired(now, linger)
                && pubsub.try_unsubscribe(Bytes::from(keys::user_topic(user))))
        });
    }
}
