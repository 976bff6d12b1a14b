//! A dispatcher task: owns the sequencers of the topics that hash to it (a
//! channel's, or a user's inbox of direct messages), and carries out their
//! effects.
//!
//! Everything a sequencer does happens on this one task, in the order the
//! events arrive, so sequencers need no locks. Redis work (subscribing a topic,
//! reading history) runs in spawned tasks whose answers come back as events:
//! a stream waiting for a read never holds up another one. For an inbox, the
//! newest offset pushed to one of the user's connections is written back to
//! Redis (`seen`), so a later login without a position gets what came after.

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
use chatcluster_protocol::stream::{StreamId, StreamKind};

use crate::blocks::Blocks;
use crate::delivery::fetch;
use crate::delivery::sequencer::{
    Effect, Fetched, Input, JoinRequest, PresenceMember, Sequencer, Tally,
};
use crate::metrics::Metrics;
use crate::outbox::{ConnId, SharedFrame};
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
    /// Messages of these topics (or of all, when `all`) may have been
    /// missed: catch up from history.
    Resync {
        /// Topics that overflowed the intake.
        topics: Vec<Bytes>,
        /// The pub/sub connection was lost: every stream catches up.
        all: bool,
    },
    /// A connection subscribes to a channel, or a logged-in connection joins
    /// its user's inbox.
    Join {
        /// The channel or inbox.
        stream: StreamId,
        /// The request.
        request: JoinRequest,
    },
    /// A connection leaves a channel or its user's inbox.
    Leave {
        /// The channel or inbox.
        stream: StreamId,
        /// The connection.
        conn: ConnId,
    },
    /// A topic subscription's outcome.
    Subscribed {
        /// The stream.
        stream: StreamId,
        /// Which life of the stream's sequencer asked.
        generation: u64,
        /// The outcome.
        result: Result<(), String>,
    },
    /// A sequencer's read came back.
    Fetched {
        /// The stream.
        stream: StreamId,
        /// Which life of the stream's sequencer asked.
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
    /// Offset blocks (for a new epoch's floor).
    pub blocks: Blocks,
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

struct Sequenced {
    sequencer: Sequencer,
    generation: u64,
    /// The inbox offset last written back as `seen` (inboxes only).
    seen: Option<(Arc<str>, u64)>,
}

/// One dispatcher task's state.
pub struct Dispatcher {
    rx: mpsc::Receiver<Event>,
    /// Its own queue, for the answers of spawned work (weak: the dispatcher
    /// stops once every [`crate::delivery::Delivery`] handle is gone).
    tx: mpsc::WeakSender<Event>,
    ctx: Arc<Context>,
    streams: HashMap<StreamId, Sequenced>,
    effects: Vec<Effect>,
    tally: Tally,
    next_generation: u64,
}

/// The stream a topic name carries.
fn parse_topic(topic: &[u8]) -> Option<StreamId> {
    let topic = std::str::from_utf8(topic).ok()?;
    if let Some(channel) = topic.strip_prefix(keys::CHANNEL_TOPIC_PREFIX) {
        Some(StreamId::channel(channel))
    } else {
        topic
            .strip_prefix(keys::USER_TOPIC_PREFIX)
            .map(StreamId::inbox)
    }
}

impl Dispatcher {
    /// A dispatcher reading `rx`; `tx` is its own queue, for answers of spawned work.
    pub fn new(rx: mpsc::Receiver<Event>, tx: mpsc::WeakSender<Event>, ctx: Arc<Context>) -> Self {
        Self {
            rx,
            tx,
            ctx,
            streams: HashMap::new(),
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
                let streams: Vec<StreamId> = if all {
                    self.streams.keys().cloned().collect()
                } else {
                    topics.iter().filter_map(|t| parse_topic(t)).collect()
                };
                for stream in streams {
                    self.send(&stream, Input::Resync, now);
                }
            }
            Event::Join { stream, request } => {
                if !self.streams.contains_key(&stream) {
                    let generation = self.generation();
                    let sequencer =
                        Sequencer::new(stream.clone(), self.ctx.keep_limit, &mut self.effects);
                    let entry = Sequenced {
                        sequencer,
                        generation,
                        seen: None,
                    };
                    self.streams.insert(stream.clone(), entry);
                }
                self.send(&stream, Input::Join(request), now);
            }
            Event::Leave { stream, conn } => self.send(&stream, Input::Leave(conn), now),
            Event::Subscribed {
                stream,
                generation,
                result,
            } => self.subscribed(&stream, generation, result, now),
            Event::Fetched {
                stream,
                generation,
                id,
                result,
            } => {
                if self
                    .streams
                    .get(&stream)
                    .is_some_and(|c| c.generation == generation)
                {
                    self.send(&stream, Input::Fetched(id, result), now);
                }
            }
            Event::Members(reply) => {
                let members = self
                    .streams
                    .iter()
                    .filter(|(stream, _)| stream.kind == StreamKind::Channel)
                    .map(|(stream, c)| {
                        (
                            stream.name.clone(),
                            c.sequencer.presence_members().cloned().collect(),
                        )
                    })
                    .collect();
                let _ = reply.send(members);
            }
            Event::Users(reply) => {
                let users = self
                    .streams
                    .keys()
                    .filter(|stream| stream.kind == StreamKind::Inbox)
                    .map(|stream| stream.name.clone())
                    .collect();
                let _ = reply.send(users);
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
        let Some(stream) = parse_topic(topic) else {
            tracing::warn!(topic = %String::from_utf8_lossy(topic), "message on a foreign topic dropped");
            return;
        };
        let input = match (stream.kind, event) {
            (
                StreamKind::Channel,
                TopicEvent::Message {
                    offset,
                    epoch,
                    message,
                },
            ) if *message.channel == *stream.name => {
                self.ctx.clock.observe(message.clock);
                let frame =
                    SharedFrame::new(ServerFrame::Message(message.into_channel_message(offset)));
                Input::Live {
                    offset,
                    epoch: epoch.into(),
                    frame,
                }
            }
            (
                StreamKind::Inbox,
                TopicEvent::Inbox {
                    offset,
                    epoch,
                    direct,
                },
            ) if *direct.to == *stream.name || *direct.from == *stream.name => {
                self.ctx.clock.observe(direct.clock);
                let frame = SharedFrame::new(ServerFrame::Direct(
                    direct.into_direct_message(Some(offset)),
                ));
                Input::Live {
                    offset,
                    epoch: epoch.into(),
                    frame,
                }
            }
            (StreamKind::Channel, TopicEvent::Presence(event))
                if *event.channel == *stream.name =>
            {
                self.ctx.clock.observe(event.clock);
                Input::Presence(SharedFrame::new(ServerFrame::Presence(event)))
            }
            _ => {
                tracing::warn!(%stream, "message of another kind or stream on a topic dropped");
                return;
            }
        };
        self.send(&stream, input, now);
    }

    /// Gives an input to a stream's sequencer, if it exists, and carries out
    /// what it asks.
    fn send(&mut self, stream: &StreamId, input: Input, now: Instant) {
        if let Some(entry) = self.streams.get_mut(stream) {
            entry.sequencer.handle(input, now, &mut self.effects);
            self.after(stream);
        }
    }

    /// Carries out a sequencer's effects, collects its tally, writes an
    /// inbox's `seen` back, and drops the sequencer when it failed to start.
    fn after(&mut self, stream: &StreamId) {
        let Some(entry) = self.streams.get_mut(stream) else {
            return;
        };
        let tally = std::mem::take(&mut entry.sequencer.tally);
        self.tally.frames_out += tally.frames_out;
        self.tally.slow_readers += tally.slow_readers;
        self.tally.gap_filled += tally.gap_filled;
        self.tally.lost += tally.lost;
        let generation = entry.generation;
        let failed = entry.sequencer.is_failed();
        if stream.kind == StreamKind::Inbox
            && let Some(pushed) = entry.sequencer.pushed()
            && entry.seen.as_ref() != Some(pushed)
        {
            entry.seen = Some(pushed.clone());
            let (store, user, (epoch, offset)) =
                (self.ctx.store.clone(), stream.name.clone(), pushed.clone());
            tokio::spawn(async move {
                if let Err(error) = store.inbox_seen(&user, &epoch, offset).await {
                    tracing::debug!(%user, %error, "inbox position not recorded");
                }
            });
        }
        for effect in std::mem::take(&mut self.effects) {
            match effect {
                Effect::Subscribe => self.subscribe(stream.clone(), generation),
                Effect::Fetch(request) => {
                    let ctx = self.ctx.clone();
                    let Some(tx) = self.tx.upgrade() else {
                        continue;
                    };
                    let stream = stream.clone();
                    tokio::spawn(async move {
                        let result = fetch::run(&ctx.store, &ctx.blocks, &stream, &request).await;
                        let _ = tx
                            .send(Event::Fetched {
                                stream,
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
            self.streams.remove(stream);
            self.ctx.pubsub.try_unsubscribe(Bytes::from(stream.topic()));
        }
    }

    /// Asks for a topic subscription; the outcome comes back as an event.
    fn subscribe(&mut self, stream: StreamId, generation: u64) {
        match self.ctx.pubsub.try_subscribe(Bytes::from(stream.topic())) {
            Ok(answer) => {
                let Some(tx) = self.tx.upgrade() else { return };
                tokio::spawn(async move {
                    let result = match answer.await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err("pub/sub task stopped".to_owned()),
                    };
                    let _ = tx
                        .send(Event::Subscribed {
                            stream,
                            generation,
                            result,
                        })
                        .await;
                });
            }
            Err(error) => {
                let result = Err(error.to_string());
                self.subscribed(&stream, generation, result, Instant::now());
            }
        }
    }

    fn subscribed(
        &mut self,
        stream: &StreamId,
        generation: u64,
        result: Result<(), String>,
        now: Instant,
    ) {
        if self
            .streams
            .get(stream)
            .is_some_and(|c| c.generation == generation)
        {
            self.send(stream, Input::Subscribed(result), now);
        }
    }

    /// Releases topics idle past the linger and retries failed catch-ups.
    fn tick(&mut self, now: Instant) {
        let linger = self.ctx.linger;
        let streams: Vec<StreamId> = self.streams.keys().cloned().collect();
        for stream in streams {
            let Some(entry) = self.streams.get_mut(&stream) else {
                continue;
            };
            let finished = entry.sequencer.tick(now, linger, &mut self.effects);
            self.after(&stream);
            if finished && self.ctx.pubsub.try_unsubscribe(Bytes::from(stream.topic())) {
                self.streams.remove(&stream);
            }
        }
    }
}
