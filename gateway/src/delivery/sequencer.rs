//! One sequenced stream's sequencer: the only place that decides what each
//! local subscriber of a channel — or each connection of a user, for the
//! user's inbox of direct messages — receives, and in which order.
//!
//! It is a state machine without I/O. Its inputs are live messages from the
//! stream's topic, joins and leaves of local connections, and the results of the
//! Redis reads it asked for; its outputs are frames queued to outboxes and
//! [`Effect`]s (subscribe the topic, read history) that the dispatcher carries
//! out and answers with more inputs. Tests drive any interleaving of those
//! inputs directly.
//!
//! The rules it keeps:
//! - `delivered` is the newest offset handed to members; live messages at or
//!   below it are duplicates, a jump above `delivered + 1` is a gap, read from
//!   the history stream before anything later is delivered.
//! - Every member has its own `floor`: the offset its subscribe reply covered.
//!   It receives exactly the messages above its floor, so no member's
//!   subscription can move what another one receives.
//! - A joining connection gets a cut-off, the `delivered` of the moment it
//!   joined. Its reply holds the history after its `since` up to the cut-off;
//!   everything the sequencer delivers above the cut-off while that read is in
//!   flight is kept for it and queued right after the reply.
//! - While a gap or a resync is being read, later live messages are held back
//!   and delivered, in order, after what the read returned.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use chatcluster_protocol::frame::{
    ErrorCode, InboxPosition, LoginReply, ReplyData, RequestId, ServerFrame, Since, SubscribeReply,
};
use chatcluster_protocol::stream::{StreamId, StreamKind};

use crate::outbox::{ConnId, Outbox, Pushed, SharedFrame};
pub use crate::store::Position;

/// Live messages held back (behind a gap being filled) before the oldest are
/// dropped and recovered from history instead.
const HELD_LIMIT: usize = 8192;

/// A connection's presence member name (`<user>/<instance>/<conn>`) and user.
pub type PresenceMember = (Arc<str>, Arc<str>);

/// Where a history read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest message kept in the history stream.
    Start,
    /// The message right after this offset.
    After(u64),
}

/// A Redis read the sequencer needs, answered with [`Input::Fetched`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Matches the answer to the question.
    pub id: u64,
    /// History to read, in one atomic step with the position; `None`: the position only.
    pub range: Option<(ReadFrom, Option<u64>)>,
    /// Start a new epoch when the stream has none (first use after a wipe).
    pub start_epoch: bool,
}

/// What a [`Fetch`] found: the stream's position and the messages in the
/// range, read atomically, so every message above `position.top` is still to
/// come on the topic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// `None` when the stream has no valid epoch in Redis.
    pub position: Option<Position>,
    /// The messages in the range as pushes (channel messages or direct
    /// messages with their inbox offset), oldest first.
    pub messages: Vec<ServerFrame>,
}

/// Work for the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Subscribe the stream's topic; answer with [`Input::Subscribed`].
    Subscribe,
    /// Read from Redis; answer with [`Input::Fetched`].
    Fetch(Fetch),
}

/// What the reply to a join needs besides the sequencer's own answer.
#[derive(Debug)]
pub struct ReplyContext {
    /// The request id.
    pub id: Option<RequestId>,
    /// The request's Lamport time.
    pub clock: u64,
    /// Which reply.
    pub kind: ReplyKind,
}

/// How a join is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyKind {
    /// `subscribe` to a channel: the recovered messages are in the reply's `missed`.
    Subscribe {
        /// Users present in the channel.
        presence: Vec<String>,
    },
    /// `login` (the user's inbox): the reply says where the inbox stands, and
    /// the recovered direct messages follow it as pushes.
    Login {
        /// The user.
        user: String,
    },
    /// A connection logged in by its token (no request to answer): only the
    /// recovered direct messages, as pushes.
    Silent,
}

/// How a subscription started, for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Epoch of the stream.
    pub epoch: String,
    /// Offset the reply covered; pushes continue after it.
    pub offset: u64,
    /// Whether the reply held every message after `since`.
    pub recovered: bool,
}

/// Why a subscription could not start (the session answers with it; the
/// sequencer queued nothing for the connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinError {
    /// Error code for the reply.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

impl JoinError {
    fn unavailable(what: &str) -> Self {
        Self {
            code: ErrorCode::Unavailable,
            message: format!("{what}; retry later"),
        }
    }
}

/// A local connection asking to subscribe.
#[derive(Debug)]
pub struct JoinRequest {
    /// The connection's outbox.
    pub outbox: Outbox,
    /// Its presence member (channels only).
    pub presence: Option<PresenceMember>,
    /// The last message it saw, to recover from.
    pub since: Option<Since>,
    /// The rest of the reply.
    pub reply: ReplyContext,
    /// Answered once the reply is queued (or the join failed).
    pub done: oneshot::Sender<Result<Joined, JoinError>>,
}

/// An input of the sequencer.
#[derive(Debug)]
pub enum Input {
    /// A message read on the stream's topic.
    Live {
        /// Its offset.
        offset: u64,
        /// Its epoch.
        epoch: Arc<str>,
        /// The push.
        frame: Arc<SharedFrame>,
    },
    /// A presence event read on the channel topic.
    Presence(Arc<SharedFrame>),
    /// A connection subscribes.
    Join(JoinRequest),
    /// A connection unsubscribes or closes.
    Leave(ConnId),
    /// The answer to [`Effect::Subscribe`].
    Subscribed(Result<(), String>),
    /// The answer to a [`Fetch`].
    Fetched(u64, Result<Fetched, String>),
    /// Messages may have been missed (pub/sub reconnected, intake overflowed):
    /// catch up from history.
    Resync,
}

#[derive(Debug)]
struct Member {
    outbox: Outbox,
    presence: Option<PresenceMember>,
    floor: u64,
}

/// A join waiting for its history read.
#[derive(Debug)]
struct Joining {
    request: JoinRequest,
    fetch: u64,
    /// The epoch and offset the joiner's reply covers at least.
    epoch: Arc<str>,
    cut: u64,
    /// Frames delivered above `cut` while the read is in flight.
    kept: Vec<Arc<SharedFrame>>,
}

/// What a fill is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillKind {
    /// Between `delivered` and a newer live message.
    Gap,
    /// Everything after `delivered`.
    Resync,
    /// The whole history stream of a new epoch.
    NewEpoch,
}

/// A history read in flight for the stream itself.
#[derive(Debug, Clone, Copy)]
struct Fill {
    id: u64,
    kind: FillKind,
    /// The last offset the read covers (`None`: up to the newest).
    until: Option<u64>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the topic subscription.
    Subscribing,
    /// Subscribed; reading the stream's position.
    Starting { fetch: u64 },
    /// Delivering.
    Live {
        epoch: Arc<str>,
        delivered: u64,
        fill: Option<Fill>,
    },
}

/// A message or presence event held back behind a fill.
#[derive(Debug)]
enum Held {
    Message {
        offset: u64,
        epoch: Arc<str>,
        frame: Arc<SharedFrame>,
    },
    Presence(Arc<SharedFrame>),
}

/// Counters the dispatcher adds to the metrics in batches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Frames queued to members.
    pub frames_out: u64,
    /// Connections closed for not reading fast enough.
    pub slow_readers: u64,
    /// Messages read from history to fill gaps.
    pub gap_filled: u64,
    /// Offsets skipped because history no longer had them.
    pub lost: u64,
}

impl Tally {
    /// Counts one push to a member's outbox.
    fn count(&mut self, pushed: Pushed) {
        match pushed {
            Pushed::Queued => self.frames_out += 1,
            Pushed::Overflowed => self.slow_readers += 1,
            Pushed::Closed => {}
        }
    }
}

/// The sequencer of one channel or inbox on this gateway.
#[derive(Debug)]
pub struct Sequencer {
    stream: StreamId,
    phase: Phase,
    members: Vec<Member>,
    /// Joins waiting for the stream to start.
    waiting: Vec<JoinRequest>,
    joining: Vec<Joining>,
    held: VecDeque<Held>,
    resync_wanted: bool,
    idle_since: Option<Instant>,
    next_fetch: u64,
    /// Largest frames a member may have queued while joining.
    keep_limit: usize,
    /// The newest offset queued to at least one member, and its epoch.
    pushed: Option<(Arc<str>, u64)>,
    /// Counters since the dispatcher last took them.
    pub tally: Tally,
}

impl Sequencer {
    /// A sequencer for a stream not yet live on this gateway; the first
    /// effect is [`Effect::Subscribe`].
    pub fn new(stream: StreamId, keep_limit: usize, effects: &mut Vec<Effect>) -> Self {
        effects.push(Effect::Subscribe);
        Self {
            stream,
            phase: Phase::Subscribing,
            members: Vec::new(),
            waiting: Vec::new(),
            joining: Vec::new(),
            held: VecDeque::new(),
            resync_wanted: false,
            idle_since: None,
            next_fetch: 1,
            keep_limit,
            pushed: None,
            tally: Tally::default(),
        }
    }

    /// The channel or inbox.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// Presence members of local subscribers, joining ones included.
    pub fn presence_members(&self) -> impl Iterator<Item = &PresenceMember> {
        self.members
            .iter()
            .map(|m| &m.presence)
            .chain(self.joining.iter().map(|j| &j.request.presence))
            .chain(self.waiting.iter().map(|w| &w.presence))
            .flatten()
    }

    /// The newest offset queued to at least one member, with its epoch.
    pub fn pushed(&self) -> Option<&(Arc<str>, u64)> {
        self.pushed.as_ref()
    }

    /// Local connections subscribed or subscribing.
    pub fn len(&self) -> usize {
        self.members.len() + self.joining.len() + self.waiting.len()
    }

    /// Whether no local connection is subscribed or subscribing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Handles one input at time `now`.
    pub fn handle(&mut self, input: Input, now: Instant, effects: &mut Vec<Effect>) {
        match input {
            Input::Live {
                offset,
                epoch,
                frame,
            } => {
                self.held.push_back(Held::Message {
                    offset,
                    epoch,
                    frame,
                });
                self.bound_held();
                self.release_held(effects);
            }
            Input::Presence(frame) => {
                self.held.push_back(Held::Presence(frame));
                self.bound_held();
                self.release_held(effects);
            }
            Input::Join(request) => {
                self.idle_since = None;
                if matches!(self.phase, Phase::Live { .. }) {
                    self.admit(request, effects);
                } else {
                    self.waiting.push(request);
                }
            }
            Input::Leave(conn) => self.leave(conn, now),
            Input::Subscribed(result) => self.subscribed(result, effects),
            Input::Fetched(id, result) => self.fetched(id, result, effects),
            Input::Resync => {
                self.resync_wanted = true;
                self.start_resync(effects);
            }
        }
    }

    /// Periodic upkeep: retries a failed catch-up. Returns true when the
    /// sequencer has had no local connection for `linger`: it is finished and
    /// its topic can be released.
    pub fn tick(
        &mut self,
        now: Instant,
        linger: std::time::Duration,
        effects: &mut Vec<Effect>,
    ) -> bool {
        if self.is_empty() {
            let since = *self.idle_since.get_or_insert(now);
            if now.duration_since(since) >= linger {
                return true;
            }
        }
        self.start_resync(effects);
        false
    }

    fn fetch(
        &mut self,
        range: Option<(ReadFrom, Option<u64>)>,
        start_epoch: bool,
        effects: &mut Vec<Effect>,
    ) -> u64 {
        let id = self.next_fetch;
        self.next_fetch += 1;
        effects.push(Effect::Fetch(Fetch {
            id,
            range,
            start_epoch,
        }));
        id
    }

    fn subscribed(&mut self, result: Result<(), String>, effects: &mut Vec<Effect>) {
        if !matches!(self.phase, Phase::Subscribing) {
            return;
        }
        match result {
            Ok(()) => {
                let fetch = self.fetch(None, true, effects);
                self.phase = Phase::Starting { fetch };
            }
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "topic not subscribed");
                self.fail_all(&JoinError::unavailable("message store unavailable"));
            }
        }
    }

    /// Fails every join; the dispatcher drops a sequencer left empty.
    fn fail_all(&mut self, error: &JoinError) {
        for request in self.waiting.drain(..) {
            let _ = request.done.send(Err(error.clone()));
        }
        for joining in self.joining.drain(..) {
            let _ = joining.request.done.send(Err(error.clone()));
        }
    }

    /// Whether the sequencer failed to start and should be dropped.
    pub fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Subscribing | Phase::Starting { .. }) && self.is_empty()
    }

    fn leave(&mut self, conn: ConnId, now: Instant) {
        self.members.retain(|m| m.outbox.id() != conn);
        self.joining.retain(|j| j.request.outbox.id() != conn);
        self.waiting.retain(|w| w.outbox.id() != conn);
        if self.is_empty() {
            self.idle_since = Some(now);
        }
    }

    fn fetched(&mut self, id: u64, result: Result<Fetched, String>, effects: &mut Vec<Effect>) {
        if let Phase::Starting { fetch } = self.phase
            && fetch == id
        {
            return self.started(result, effects);
        }
        if let Phase::Live {
            fill: Some(fill), ..
        } = self.phase
            && fill.id == id
        {
            return self.filled(fill, result, effects);
        }
        if let Some(index) = self.joining.iter().position(|j| j.fetch == id) {
            let joining = self.joining.swap_remove(index);
            self.recovered(joining, result, effects);
            if self.joining.is_empty() {
                // Most sequencers (a user's inbox) are joined once, then idle
                // for hours: give back what the join needed.
                self.joining = Vec::new();
            }
        }
    }

    fn started(&mut self, result: Result<Fetched, String>, effects: &mut Vec<Effect>) {
        let position = match result {
            Ok(Fetched {
                position: Some(position),
                ..
            }) => position,
            // An inbox without an epoch yet: live with none; its first
            // message starts one and is read from history like a new epoch.
            Ok(Fetched { position: None, .. }) if self.stream.kind == StreamKind::Inbox => {
                Position {
                    epoch: String::new(),
                    top: 0,
                }
            }
            Ok(Fetched { position: None, .. }) => {
                self.fail_all(&JoinError::unavailable("no epoch could be started"));
                return;
            }
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "position unavailable");
                self.fail_all(&JoinError::unavailable("message store unavailable"));
                return;
            }
        };
        self.phase = Phase::Live {
            epoch: position.epoch.into(),
            delivered: position.top,
            fill: None,
        };
        for request in std::mem::take(&mut self.waiting) {
            self.admit(request, effects);
        }
        self.release_held(effects);
        self.start_resync(effects);
    }

    /// Admits a join while live: replies at once when nothing must be read,
    /// else reads the history after `since` up to the cut-off.
    fn admit(&mut self, request: JoinRequest, effects: &mut Vec<Effect>) {
        let Phase::Live {
            epoch, delivered, ..
        } = &self.phase
        else {
            self.waiting.push(request);
            return;
        };
        let (epoch, cut) = (epoch.clone(), *delivered);
        match &request.since {
            Some(since) if *since.epoch == *epoch && since.offset != cut => {
                let range = (ReadFrom::After(since.offset), Some(cut));
                let fetch = self.fetch(Some(range), false, effects);
                self.joining.push(Joining {
                    request,
                    fetch,
                    epoch,
                    cut,
                    kept: Vec::new(),
                });
            }
            Some(since) if *since.epoch == *epoch => {
                self.reply(request, &epoch, cut, true, Vec::new(), Vec::new());
            }
            _ => self.reply(request, &epoch, cut, false, Vec::new(), Vec::new()),
        }
    }

    /// Answers a join whose history read came back.
    fn recovered(
        &mut self,
        joining: Joining,
        result: Result<Fetched, String>,
        effects: &mut Vec<Effect>,
    ) {
        let Joining {
            request,
            epoch: cut_epoch,
            cut,
            kept,
            ..
        } = joining;
        let since = request.since.clone().unwrap_or(Since {
            offset: cut,
            epoch: String::new(),
        });
        let fetched = match result {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "recovery read failed");
                let _ = request
                    .done
                    .send(Err(JoinError::unavailable("message store unavailable")));
                return;
            }
        };
        let current = match &self.phase {
            Phase::Live { epoch, .. } => epoch.clone(),
            _ => cut_epoch.clone(),
        };
        match fetched.position {
            Some(position) if *position.epoch == *current && current == cut_epoch => {
                if since.offset >= cut {
                    // The client saw more than this gateway delivered yet: it
                    // continues after what it saw, if that exists.
                    let recovered = since.offset <= position.top;
                    let floor = if recovered { since.offset } else { cut };
                    let kept = kept.into_iter().filter(|f| offset_of(f) > floor).collect();
                    self.reply(request, &current, floor, recovered, Vec::new(), kept);
                } else {
                    let first = fetched.messages.first().map(offset_of_frame);
                    let last = fetched.messages.last().map(offset_of_frame);
                    let complete = first == Some(since.offset + 1)
                        && last == Some(cut)
                        && fetched.messages.len() as u64 == cut - since.offset;
                    let missed = if complete {
                        fetched.messages
                    } else {
                        Vec::new()
                    };
                    self.reply(request, &current, cut, complete, missed, kept);
                }
            }
            other => {
                // The channel's history was lost meanwhile: the client pages
                // history; this gateway catches up with the new epoch.
                let (epoch, floor) = match other {
                    Some(position) => (Arc::from(position.epoch), position.top),
                    None => (current, cut),
                };
                let kept = kept.into_iter().filter(|f| offset_of(f) > floor).collect();
                self.reply(request, &epoch, floor, false, Vec::new(), kept);
                self.resync_wanted = true;
                self.start_resync(effects);
            }
        }
    }

    /// Queues the reply (with the recovered messages in it, or followed by
    /// them), then what was kept for the joiner, and makes it a member with `floor`.
    fn reply(
        &mut self,
        request: JoinRequest,
        epoch: &str,
        floor: u64,
        recovered: bool,
        missed: Vec<ServerFrame>,
        kept: Vec<Arc<SharedFrame>>,
    ) {
        let JoinRequest {
            outbox,
            presence,
            reply,
            done,
            ..
        } = request;
        let (data, pushes) = match reply.kind {
            ReplyKind::Subscribe { presence } => {
                let missed = missed
                    .into_iter()
                    .filter_map(|frame| match frame {
                        ServerFrame::Message(message) => Some(message),
                        _ => None,
                    })
                    .collect();
                let data = ReplyData::Subscribe(SubscribeReply {
                    channel: self.stream.name.to_string(),
                    epoch: epoch.to_owned(),
                    offset: floor,
                    presence,
                    recovered,
                    missed,
                });
                (Some(data), Vec::new())
            }
            ReplyKind::Login { user } => {
                let inbox = Some(InboxPosition {
                    epoch: epoch.to_owned(),
                    offset: floor,
                    recovered,
                });
                (Some(ReplyData::Login(LoginReply { user, inbox })), missed)
            }
            ReplyKind::Silent => (None, missed),
        };
        let queued = match data {
            Some(data) => outbox.push_frame(&ServerFrame::Ok {
                id: reply.id,
                clock: reply.clock,
                data,
            }),
            None if outbox.is_closed() => Pushed::Closed,
            None => Pushed::Queued,
        };
        if queued != Pushed::Queued {
            let _ = done.send(Err(JoinError {
                code: ErrorCode::Unavailable,
                message: "connection closing".into(),
            }));
            return;
        }
        let mut newest = None;
        for frame in pushes.into_iter().map(SharedFrame::new).chain(kept) {
            let pushed = outbox.push_shared(&frame);
            if pushed == Pushed::Queued && offset_of(&frame) != u64::MAX {
                newest = Some(offset_of(&frame));
            }
            self.tally.count(pushed);
        }
        if let Some(offset) = newest
            && self
                .pushed
                .as_ref()
                .is_none_or(|(e, o)| **e != *epoch || *o < offset)
        {
            self.pushed = Some((epoch.into(), offset));
        }
        let _ = done.send(Ok(Joined {
            epoch: epoch.to_owned(),
            offset: floor,
            recovered,
        }));
        if self.members.len() == self.members.capacity() {
            // Grow from one member (an inbox usually has one), not four.
            self.members.reserve_exact(self.members.len().max(1));
        }
        self.members.push(Member {
            outbox,
            presence,
            floor,
        });
    }

    /// Queues `frame` to every member `wanted` picks; returns how many took
    /// it (counted in the sequencer's tally too).
    fn push_each(&mut self, frame: &Arc<SharedFrame>, wanted: impl Fn(&Member) -> bool) -> u64 {
        let mut tally = Tally::default();
        for member in self.members.iter().filter(|member| wanted(member)) {
            tally.count(member.outbox.push_shared(frame));
        }
        self.tally.frames_out += tally.frames_out;
        self.tally.slow_readers += tally.slow_readers;
        tally.frames_out
    }

    /// Queues a message to every member above whose floor it lies, and keeps
    /// it for joiners whose cut-off it passes.
    fn deliver(&mut self, offset: u64, frame: &Arc<SharedFrame>) {
        let queued = self.push_each(frame, |member| offset > member.floor);
        self.keep(|cut| offset > cut, frame);
        if let Phase::Live {
            delivered, epoch, ..
        } = &mut self.phase
        {
            *delivered = offset;
            if queued > 0 {
                self.pushed = Some((epoch.clone(), offset));
            }
        }
    }

    /// Queues a presence event to every member and keeps it for joiners.
    fn announce(&mut self, frame: &Arc<SharedFrame>) {
        self.push_each(frame, |_| true);
        self.keep(|_| true, frame);
    }

    fn keep(&mut self, passes: impl Fn(u64) -> bool, frame: &Arc<SharedFrame>) {
        let limit = self.keep_limit;
        for joining in &mut self.joining {
            if passes(joining.cut) {
                if joining.kept.len() >= limit {
                    joining
                        .request
                        .outbox
                        .close(crate::outbox::CloseReason::SlowReader);
                    continue;
                }
                joining.kept.push(frame.clone());
            }
        }
    }

    /// Drops the oldest held messages beyond the limit; a resync reads them back.
    fn bound_held(&mut self) {
        while self.held.len() > HELD_LIMIT {
            self.held.pop_front();
            self.resync_wanted = true;
        }
    }

    /// Delivers held messages in order while nothing is being filled; starts a
    /// fill at the first gap or epoch change.
    fn release_held(&mut self, effects: &mut Vec<Effect>) {
        loop {
            let Phase::Live {
                epoch,
                delivered,
                fill: None,
            } = &self.phase
            else {
                return;
            };
            let (current, delivered) = (epoch.clone(), *delivered);
            let Some(next) = self.held.pop_front() else {
                return;
            };
            match next {
                Held::Presence(frame) => self.announce(&frame),
                Held::Message {
                    offset,
                    epoch,
                    frame,
                } if *epoch == *current => {
                    if offset <= delivered {
                        continue;
                    }
                    if offset > delivered + 1 {
                        self.held.push_front(Held::Message {
                            offset,
                            epoch,
                            frame,
                        });
                        let until = Some(offset - 1);
                        self.start_fill(FillKind::Gap, ReadFrom::After(delivered), until, effects);
                        return;
                    }
                    self.deliver(offset, &frame);
                }
                Held::Message {
                    offset,
                    epoch,
                    frame,
                } => {
                    self.held.push_front(Held::Message {
                        offset,
                        epoch,
                        frame,
                    });
                    self.start_fill(FillKind::NewEpoch, ReadFrom::Start, None, effects);
                    return;
                }
            }
        }
    }

    fn start_fill(
        &mut self,
        kind: FillKind,
        from: ReadFrom,
        until: Option<u64>,
        effects: &mut Vec<Effect>,
    ) {
        let id = self.fetch(Some((from, until)), false, effects);
        if let Phase::Live { fill, .. } = &mut self.phase {
            *fill = Some(Fill { id, kind, until });
        }
    }

    /// Reads everything after `delivered` if a resync is wanted and possible now.
    fn start_resync(&mut self, effects: &mut Vec<Effect>) {
        if !self.resync_wanted {
            return;
        }
        if let Phase::Live {
            delivered,
            fill: None,
            ..
        } = self.phase
        {
            self.resync_wanted = false;
            self.start_fill(FillKind::Resync, ReadFrom::After(delivered), None, effects);
        }
    }

    fn filled(&mut self, fill: Fill, result: Result<Fetched, String>, effects: &mut Vec<Effect>) {
        let Phase::Live {
            epoch,
            delivered,
            fill: current_fill,
        } = &mut self.phase
        else {
            return;
        };
        *current_fill = None;
        let (mut current, mut delivered) = (epoch.clone(), *delivered);
        let fetched = match result {
            Ok(fetched) => fetched,
            Err(error) => {
                tracing::warn!(stream = %self.stream, %error, "history read failed; retrying");
                // Held messages wait; the next tick reads everything after `delivered`.
                self.resync_wanted = true;
                return;
            }
        };
        let Some(position) = fetched.position else {
            self.no_epoch(fill);
            self.release_held(effects);
            return;
        };
        if *position.epoch != *current {
            if fill.kind != FillKind::NewEpoch {
                self.start_fill(FillKind::NewEpoch, ReadFrom::Start, None, effects);
                return;
            }
            tracing::warn!(stream = %self.stream, epoch = %position.epoch, "history lost in Redis: new epoch");
            current = position.epoch.as_str().into();
            delivered = 0;
            self.adopt_epoch(current.clone(), delivered);
        }
        self.deliver_fetched(delivered, fetched.messages);
        match fill.kind {
            FillKind::Gap => self.advance_to(fill.until.unwrap_or(position.top)),
            FillKind::Resync | FillKind::NewEpoch => self.advance_to(position.top),
        }
        if fill.kind == FillKind::NewEpoch {
            // Held messages of another epoch are stale.
            self.held.retain(|h| match h {
                Held::Message { epoch, .. } => *epoch == current,
                Held::Presence(_) => true,
            });
        }
        self.release_held(effects);
        self.start_resync(effects);
    }

    /// A fill found no epoch in Redis (wiped, nobody published since): skip
    /// what the fill was for; a new epoch is taken from the next live message.
    fn no_epoch(&mut self, fill: Fill) {
        match fill.kind {
            FillKind::Gap => self.advance_to(fill.until.unwrap_or(0)),
            FillKind::Resync => {}
            FillKind::NewEpoch => {
                if let Some(Held::Message { offset, epoch, .. }) = self.held.front() {
                    let (epoch, delivered) = (epoch.clone(), offset.saturating_sub(1));
                    self.adopt_epoch(epoch, delivered);
                }
            }
        }
    }

    /// Continues in a new epoch: offsets of the old one mean nothing any more,
    /// so every member and joiner takes whatever the new epoch brings.
    fn adopt_epoch(&mut self, epoch: Arc<str>, delivered: u64) {
        self.phase = Phase::Live {
            epoch,
            delivered,
            fill: None,
        };
        for member in &mut self.members {
            member.floor = 0;
        }
        for joining in &mut self.joining {
            joining.cut = 0;
        }
    }

    /// Delivers fetched messages above `delivered`, counting what history no
    /// longer had.
    fn deliver_fetched(&mut self, mut delivered: u64, messages: Vec<ServerFrame>) {
        for message in messages {
            let offset = offset_of_frame(&message);
            if offset <= delivered {
                continue;
            }
            if delivered > 0 {
                self.tally.lost += offset - delivered - 1;
            }
            self.tally.gap_filled += 1;
            let frame = SharedFrame::new(message);
            self.deliver(offset, &frame);
            delivered = offset;
        }
    }

    /// Moves `delivered` up to `top`: offsets up to it that were not read are
    /// gone from history, and counted as lost.
    fn advance_to(&mut self, top: u64) {
        if let Phase::Live { delivered, .. } = &mut self.phase
            && top > *delivered
        {
            if *delivered > 0 {
                self.tally.lost += top - *delivered;
            }
            *delivered = top;
        }
    }
}

/// The offset of a sequenced push (`u64::MAX` for other pushes: presence
/// events kept for a joiner are always queued after its reply).
fn offset_of(frame: &SharedFrame) -> u64 {
    offset_of_frame(frame.frame())
}

fn offset_of_frame(frame: &ServerFrame) -> u64 {
    chatcluster_protocol::stream::offset_of(frame).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
