//! A logged-in session that survives disconnects.
//!
//! One task owns the WebSocket. Callers send requests through a [`SessionHandle`] and get the
//! reply's `data`; pushes arrive as [`Event`]s. The task remembers, per subscribed channel,
//! the epoch and the last offset it handed out. After a disconnect it reconnects with
//! jittered backoff, logs in again and subscribes with `since`; missed messages are handed
//! out in order, each once (a duplicate offset is dropped), and when the gateway cannot
//! recover from Redis the gap is paged from `history`. Likewise it keeps its place in the
//! user's inbox and logs in again with `since`, so each direct message is handed out once.
//! `publish` and `message` carry an idempotency key and are retried with it (see
//! [`super::retry`]); `users` and `channels` walk every page.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use chatcluster_protocol::Encoding;
use chatcluster_protocol::codec;
use chatcluster_protocol::frame::{
    ChannelMessage, ChannelsReply, Conversation, ConversationsReply, DirectMessage, DirectReply,
    DmHistoryReply, HistoryReply, InboxPosition, LoginReply, PresenceEvent, PublishReply,
    RawRequest, RequestId, ServerFrame, Since, SubscribeReply, UsersReply,
};
use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::paging::collect_pages;
use super::retry::{RetryPolicy, new_key, with_retry};
use super::transport::{ConnectOptions, Target, Ws, connect};
use super::{ClientError, payload, request_message};

/// Who the session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `AUTH_MODE=none`: log in under this name.
    User(String),
    /// `AUTH_MODE=jwt`: present this token; its `sub` is the user.
    Token(String),
}

/// How to run a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Where to connect.
    pub target: Target,
    /// Frame encoding.
    pub encoding: Encoding,
    /// Who to be.
    pub identity: Identity,
    /// Local source address (TCP).
    pub source: Option<IpAddr>,
    /// Reconnect after a disconnect (otherwise the session ends).
    pub reconnect: bool,
    /// How long a request waits for its reply.
    pub request_timeout: Duration,
    /// How `publish` and `message` are retried (with their idempotency key).
    pub retry: RetryPolicy,
}

impl SessionConfig {
    /// A reconnecting session with a 15 s request timeout and the default retry policy.
    pub fn new(target: Target, encoding: Encoding, identity: Identity) -> Self {
        Self {
            target,
            encoding,
            identity,
            source: None,
            reconnect: true,
            request_timeout: Duration::from_secs(15),
            retry: RetryPolicy::default(),
        }
    }
}

/// How one channel came back after a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The channel.
    pub channel: String,
    /// Messages handed out that were published while disconnected.
    pub missed: usize,
    /// Whether Redis still had them all (`false`: paged from `history`).
    pub recovered: bool,
}

/// What the session reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A channel message, in offset order, each once.
    Message(ChannelMessage),
    /// A direct message.
    Direct(DirectMessage),
    /// Someone joined or left a channel.
    Presence(PresenceEvent),
    /// The connection dropped; reconnecting.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The login after a reconnect could not recover every direct message missed meanwhile
    /// (the inbox's epoch changed, or the gap is older than Redis keeps): `conversations`
    /// and `dm_history` still have them.
    InboxNotRecovered,
    /// Connected again; every channel resubscribed.
    Reconnected {
        /// Per channel.
        channels: Vec<Recovery>,
    },
    /// Messages with offsets strictly between `after` and `before` could not be delivered.
    Gap {
        /// The channel.
        channel: String,
        /// Last offset delivered before the gap.
        after: u64,
        /// First offset delivered after it.
        before: u64,
    },
}

struct Command {
    request: RawRequest,
    reply: oneshot::Sender<Result<Value, ClientError>>,
}

/// Sends requests to a session. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    commands: mpsc::Sender<Command>,
    timeout: Duration,
    retry: RetryPolicy,
}

/// A running session: its handle, its events and the user it is.
#[derive(Debug)]
pub struct Session {
    /// Sends requests.
    pub handle: SessionHandle,
    /// Pushes and connection changes. The session ends when every handle is dropped.
    pub events: mpsc::Receiver<Event>,
    /// The logged-in user.
    pub user: String,
}

fn request(op: &str) -> RawRequest {
    RawRequest {
        op: Some(op.to_owned()),
        ..RawRequest::default()
    }
}

fn decode_data<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ClientError> {
    serde_json::from_value(value).map_err(|e| ClientError::Decode(e.to_string()))
}

impl SessionHandle {
    /// Sends `request` and returns the reply's `data` (an error reply is an error).
    pub async fn request(&self, request: RawRequest) -> Result<Value, ClientError> {
        let op = request.op.clone().unwrap_or_default();
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command { request, reply })
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(op)),
        }
    }

    /// `users`, every page.
    pub async fn users(&self) -> Result<Vec<String>, ClientError> {
        collect_pages(|cursor| async move {
            let data = self.request(RawRequest {
                cursor,
                ..request("users")
            });
            let reply: UsersReply = decode_data(data.await?)?;
            Ok((reply.users, reply.cursor))
        })
        .await
    }

    /// `channels`, every page.
    pub async fn channels(&self) -> Result<Vec<String>, ClientError> {
        collect_pages(|cursor| async move {
            let data = self.request(RawRequest {
                cursor,
                ..request("channels")
            });
            let reply: ChannelsReply = decode_data(data.await?)?;
            Ok((reply.channels, reply.cursor))
        })
        .await
    }

    /// `channel`: creates it; returns whether this call did.
    pub async fn create_channel(&self, channel: &str) -> Result<bool, ClientError> {
        let data = self
            .request(RawRequest {
                channel: Some(channel.to_owned()),
                ..request("channel")
            })
            .await?;
        Ok(decode_data::<chatcluster_protocol::frame::ChannelReply>(data)?.created)
    }

    /// `subscribe` (the session recovers it after reconnects).
    pub async fn subscribe(
        &self,
        channel: &str,
        since: Option<Since>,
    ) -> Result<SubscribeReply, ClientError> {
        let data = self
            .request(RawRequest {
                channel: Some(channel.to_owned()),
                since,
                ..request("subscribe")
            })
            .await?;
        decode_data(data)
    }

    /// `unsubscribe`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        self.request(RawRequest {
            channel: Some(channel.to_owned()),
            ..request("unsubscribe")
        })
        .await
        .map(drop)
    }

    /// Sends a keyed write, again with the same key while its outcome is unknown (see
    /// [`super::retry`]), and decodes its reply.
    async fn keyed_write<T: serde::de::DeserializeOwned>(
        &self,
        write: RawRequest,
    ) -> Result<T, ClientError> {
        let write = RawRequest {
            idempotency_key: Some(new_key()),
            ..write
        };
        let data = with_retry(self.retry, || self.request(write.clone())).await?;
        decode_data(data)
    }

    /// `publish`, stored once even when retried.
    pub async fn publish(&self, channel: &str, text: &str) -> Result<PublishReply, ClientError> {
        self.keyed_write(RawRequest {
            channel: Some(channel.to_owned()),
            text: Some(text.to_owned()),
            ..request("publish")
        })
        .await
    }

    /// `message` (a direct message), stored once even when retried.
    pub async fn message(&self, to: &str, text: &str) -> Result<DirectReply, ClientError> {
        self.keyed_write(RawRequest {
            to: Some(to.to_owned()),
            text: Some(text.to_owned()),
            ..request("message")
        })
        .await
    }

    /// `conversations`: one page of the user's conversations, the newest first.
    pub async fn conversations(
        &self,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<Conversation>, ClientError> {
        let data = self
            .request(RawRequest {
                before,
                limit,
                ..request("conversations")
            })
            .await?;
        Ok(decode_data::<ConversationsReply>(data)?.conversations)
    }

    /// `dm_history`: direct messages with `with` before inbox offset `before` (newest last).
    pub async fn dm_history(
        &self,
        with: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<DirectMessage>, ClientError> {
        let data = self
            .request(RawRequest {
                with: Some(with.to_owned()),
                before,
                limit,
                ..request("dm_history")
            })
            .await?;
        Ok(decode_data::<DmHistoryReply>(data)?.messages)
    }

    /// `presence`.
    pub async fn presence(&self, channel: &str) -> Result<Vec<String>, ClientError> {
        let data = self
            .request(RawRequest {
                channel: Some(channel.to_owned()),
                ..request("presence")
            })
            .await?;
        Ok(decode_data::<chatcluster_protocol::frame::PresenceReply>(data)?.users)
    }

    /// `history`: messages before `before` (newest last).
    pub async fn history(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<ChannelMessage>, ClientError> {
        let data = self
            .request(RawRequest {
                channel: Some(channel.to_owned()),
                before,
                limit,
                ..request("history")
            })
            .await?;
        Ok(decode_data::<HistoryReply>(data)?.messages)
    }
}

/// Where the session stands in one channel.
#[derive(Debug, Clone)]
struct Position {
    epoch: String,
    last: u64,
}

/// Where the session stands in the user's inbox: the `since` of its next login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Inbox {
    /// The epoch of the last login reply.
    epoch: Option<String>,
    /// The inbox offset of the last direct message handed out.
    last: Option<u64>,
}

impl Inbox {
    /// The login's `since`, once a login answered and a direct message came.
    fn since(&self) -> Option<Since> {
        Some(Since {
            offset: self.last?,
            epoch: self.epoch.clone()?,
        })
    }

    /// Takes a login reply to `since`; `false` when `since` was not recovered (the missed
    /// messages are not pushed, and pushes continue after the reply's offset).
    fn on_login(&mut self, since: Option<&Since>, reply: &InboxPosition) -> bool {
        self.epoch = Some(reply.epoch.clone());
        if reply.recovered {
            // The missed messages follow as pushes and move `last` themselves.
            return true;
        }
        self.last = Some(reply.offset);
        since.is_none()
    }

    /// Takes a direct push at inbox `offset`; `false` when it was handed out already.
    fn on_push(&mut self, offset: Option<u64>) -> bool {
        let Some(offset) = offset else { return true };
        if self.last.is_some_and(|last| offset <= last) {
            return false;
        }
        self.last = Some(offset);
        true
    }
}

enum Pending {
    Caller(oneshot::Sender<Result<Value, ClientError>>),
    Subscribe {
        channel: String,
        since: Option<u64>,
        reply: oneshot::Sender<Result<Value, ClientError>>,
    },
    Unsubscribe {
        channel: String,
        reply: oneshot::Sender<Result<Value, ClientError>>,
    },
}

/// Pages of `history` read when filling one gap, at most.
const GAP_PAGES: usize = 50;
/// The server's largest `history` page.
const PAGE: u32 = 100;

struct Driver {
    config: SessionConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    channels: BTreeMap<String, Position>,
    inbox: Inbox,
    pending: HashMap<i64, Pending>,
    clock: u64,
    next_id: i64,
}

impl Session {
    /// Connects and logs in; fails if that first connection fails. Then runs in the
    /// background until every [`SessionHandle`] is dropped.
    pub async fn start(config: SessionConfig) -> Result<Session, ClientError> {
        let (commands_tx, commands) = mpsc::channel(256);
        let (events_tx, events) = mpsc::channel(4096);
        let timeout = config.request_timeout;
        let retry = config.retry;
        let mut driver = Driver {
            config,
            commands,
            events: events_tx,
            channels: BTreeMap::new(),
            inbox: Inbox::default(),
            pending: HashMap::new(),
            clock: 0,
            next_id: 1,
        };
        let mut ws = driver.open().await?;
        let mut backlog = Vec::new();
        let user = driver.login(&mut ws, &mut backlog).await?;
        tokio::spawn(driver.run(ws, backlog));
        Ok(Session {
            handle: SessionHandle {
                commands: commands_tx,
                timeout,
                retry,
            },
            events,
            user,
        })
    }
}

/// Delay before reconnect attempt `attempt`: 250 ms doubling to 5 s, jittered to 50–100 %.
pub fn reconnect_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1 << attempt.min(5));
    let capped = base.min(Duration::from_secs(5));
    capped.mul_f64(rand::rng().random_range(0.5..=1.0))
}

impl Driver {
    async fn open(&self) -> Result<Ws, ClientError> {
        let options = ConnectOptions {
            token: match &self.config.identity {
                Identity::Token(token) => Some(token.clone()),
                Identity::User(_) => None,
            },
            source: self.config.source,
        };
        connect(&self.config.target, self.config.encoding, &options).await
    }

    fn stamp(&mut self, mut request: RawRequest) -> (i64, RawRequest) {
        let id = self.next_id;
        self.next_id += 1;
        self.clock += 1;
        request.id = Some(RequestId::Int(id));
        request.clock = Some(self.clock);
        (id, request)
    }

    fn decode(&mut self, bytes: &[u8]) -> Result<ServerFrame<Value>, ClientError> {
        let frame: ServerFrame<Value> = codec::decode(self.config.encoding, bytes)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let clock = match &frame {
            ServerFrame::Ok { clock, .. } | ServerFrame::Error { clock, .. } => *clock,
            ServerFrame::Message(m) => m.clock,
            ServerFrame::Direct(d) => d.clock,
            ServerFrame::Presence(p) => p.clock,
        };
        self.clock = self.clock.max(clock);
        Ok(frame)
    }

    /// One request and its reply, outside the main loop (login and resubscription); pushes
    /// that arrive meanwhile are kept in `backlog`.
    async fn call(
        &mut self,
        ws: &mut Ws,
        request: RawRequest,
        backlog: &mut Vec<ServerFrame<Value>>,
    ) -> Result<Value, ClientError> {
        let op = request.op.clone().unwrap_or_default();
        let (id, request) = self.stamp(request);
        let lost = |e: &dyn std::fmt::Display| ClientError::Disconnected(e.to_string());
        let timeout = self.config.request_timeout;
        ws.send(request_message(self.config.encoding, &request))
            .await
            .map_err(|e| lost(&e))?;
        let wait = async {
            loop {
                let message = match ws.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return Err(lost(&e)),
                    None => return Err(lost(&"connection closed")),
                };
                if let Message::Close(frame) = &message {
                    return Err(lost(&close_reason(frame.as_ref())));
                }
                let Some(bytes) = payload(&message) else {
                    continue;
                };
                match self.decode(bytes)? {
                    ServerFrame::Ok {
                        id: Some(RequestId::Int(got)),
                        data,
                        ..
                    } if got == id => return Ok(data),
                    ServerFrame::Error {
                        id: Some(RequestId::Int(got)),
                        code,
                        message,
                        ..
                    } if got == id => {
                        return Err(ClientError::Server {
                            code: code.to_string(),
                            message,
                        });
                    }
                    push @ (ServerFrame::Message(_)
                    | ServerFrame::Direct(_)
                    | ServerFrame::Presence(_)) => {
                        backlog.push(push);
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout(op))?
    }

    /// Logs in (named user) from the inbox position reached so far and returns the user;
    /// reports an inbox that could not be recovered.
    async fn login(
        &mut self,
        ws: &mut Ws,
        backlog: &mut Vec<ServerFrame<Value>>,
    ) -> Result<String, ClientError> {
        match self.config.identity.clone() {
            Identity::User(user) => {
                let since = self.inbox.since();
                let data = self
                    .call(
                        ws,
                        RawRequest {
                            user: Some(user.clone()),
                            since: since.clone(),
                            ..request("login")
                        },
                        backlog,
                    )
                    .await?;
                let reply: LoginReply = decode_data(data)?;
                let recovered = reply
                    .inbox
                    .as_ref()
                    .is_none_or(|inbox| self.inbox.on_login(since.as_ref(), inbox));
                if !recovered {
                    self.emit(Event::InboxNotRecovered).await;
                }
                Ok(reply.user)
            }
            Identity::Token(token) => {
                Ok(crate::token::subject(&token).unwrap_or_else(|| "(token)".to_owned()))
            }
        }
    }

    async fn emit(&self, event: Event) {
        // The receiver gone means nobody listens any more; requests still work.
        let _ = self.events.send(event).await;
    }

    /// Hands out a channel message unless it is a duplicate; reports a jump as a gap.
    async fn deliver(&mut self, message: ChannelMessage) {
        let Some(position) = self.channels.get_mut(&message.channel) else {
            return;
        };
        if message.offset <= position.last {
            return;
        }
        let gap = (message.offset > position.last + 1).then(|| Event::Gap {
            channel: message.channel.clone(),
            after: position.last,
            before: message.offset,
        });
        position.last = message.offset;
        if let Some(gap) = gap {
            self.emit(gap).await;
        }
        self.emit(Event::Message(message)).await;
    }

    async fn on_frame(&mut self, frame: ServerFrame<Value>) {
        match frame {
            ServerFrame::Message(message) => self.deliver(message).await,
            ServerFrame::Direct(direct) => {
                if self.inbox.on_push(direct.offset) {
                    self.emit(Event::Direct(direct)).await;
                }
            }
            ServerFrame::Presence(presence) => self.emit(Event::Presence(presence)).await,
            ServerFrame::Ok { id, data, .. } => self.on_reply(id, Ok(data)).await,
            ServerFrame::Error {
                id, code, message, ..
            } => {
                let error = ClientError::Server {
                    code: code.to_string(),
                    message,
                };
                self.on_reply(id, Err(error)).await;
            }
        }
    }

    async fn on_reply(&mut self, id: Option<RequestId>, result: Result<Value, ClientError>) {
        let Some(RequestId::Int(id)) = id else { return };
        match self.pending.remove(&id) {
            Some(Pending::Caller(reply)) => {
                let _ = reply.send(result);
            }
            Some(Pending::Subscribe {
                channel,
                since,
                reply,
            }) => {
                if let Ok(data) = &result {
                    match serde_json::from_value::<SubscribeReply>(data.clone()) {
                        Ok(subscribed) => {
                            // `missed` follows the caller's `since`; live pushes follow `offset`.
                            self.channels.insert(
                                channel.clone(),
                                Position {
                                    epoch: subscribed.epoch.clone(),
                                    last: since.unwrap_or(subscribed.offset).min(subscribed.offset),
                                },
                            );
                            for message in subscribed.missed {
                                self.deliver(message).await;
                            }
                            if let Some(position) = self.channels.get_mut(&channel) {
                                position.last = position.last.max(subscribed.offset);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable subscribe reply"),
                    }
                }
                let _ = reply.send(result);
            }
            Some(Pending::Unsubscribe { channel, reply }) => {
                if result.is_ok() {
                    self.channels.remove(&channel);
                }
                let _ = reply.send(result);
            }
            None => {}
        }
    }

    /// Sends a caller's request, remembering how to route its reply.
    async fn send(&mut self, ws: &mut Ws, command: Command) -> Result<(), String> {
        let op = command.request.op.clone().unwrap_or_default();
        let channel = command.request.channel.clone().unwrap_or_default();
        let since = command.request.since.as_ref().map(|s| s.offset);
        let (id, request) = self.stamp(command.request);
        let pending = match op.as_str() {
            "subscribe" => Pending::Subscribe {
                channel,
                since,
                reply: command.reply,
            },
            "unsubscribe" => Pending::Unsubscribe {
                channel,
                reply: command.reply,
            },
            _ => Pending::Caller(command.reply),
        };
        self.pending.insert(id, pending);
        ws.send(request_message(self.config.encoding, &request))
            .await
            .map_err(|e| e.to_string())
    }

    /// Serves until the connection drops (`Err(reason)`) or every handle is gone (`Ok`).
    async fn serve(&mut self, ws: &mut Ws) -> Result<(), String> {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.send(ws, command).await?,
                    None => {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                },
                message = ws.next() => match message {
                    None => return Err("connection closed".to_owned()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(Message::Close(frame))) => return Err(close_reason(frame.as_ref())),
                    Some(Ok(message)) => {
                        let Some(bytes) = payload(&message) else { continue };
                        match self.decode(bytes) {
                            Ok(frame) => self.on_frame(frame).await,
                            Err(e) => tracing::warn!(error = %e, "ignored a frame"),
                        }
                    }
                },
            }
        }
    }

    /// Fails every request in flight: their replies will never come.
    fn fail_pending(&mut self, reason: &str) {
        for (_, pending) in self.pending.drain() {
            let reply = match pending {
                Pending::Caller(reply)
                | Pending::Subscribe { reply, .. }
                | Pending::Unsubscribe { reply, .. } => reply,
            };
            let _ = reply.send(Err(ClientError::Disconnected(reason.to_owned())));
        }
    }

    async fn run(mut self, mut ws: Ws, backlog: Vec<ServerFrame<Value>>) {
        for frame in backlog {
            self.on_frame(frame).await;
        }
        loop {
            let reason = match self.serve(&mut ws).await {
                Ok(()) => return,
                Err(reason) => reason,
            };
            self.fail_pending(&reason);
            self.emit(Event::Disconnected {
                reason: reason.clone(),
            })
            .await;
            if !self.config.reconnect {
                return;
            }
            match self.reconnect(&reason).await {
                Some((next, backlog)) => {
                    ws = next;
                    for frame in backlog {
                        self.on_frame(frame).await;
                    }
                }
                None => return,
            }
        }
    }

    /// Reconnects with backoff; meanwhile requests fail at once. `None` when every handle is
    /// gone.
    async fn reconnect(&mut self, reason: &str) -> Option<(Ws, Vec<ServerFrame<Value>>)> {
        let mut attempt = 0;
        loop {
            let wait = tokio::time::sleep(reconnect_delay(attempt));
            tokio::pin!(wait);
            attempt += 1;
            loop {
                tokio::select! {
                    () = &mut wait => break,
                    command = self.commands.recv() => match command {
                        Some(command) => {
                            let _ = command.reply.send(Err(ClientError::Disconnected(reason.to_owned())));
                        }
                        None => return None,
                    },
                }
            }
            let Ok(mut ws) = self.open().await else {
                continue;
            };
            match self.resume(&mut ws).await {
                Ok(backlog) => return Some((ws, backlog)),
                Err(e) => tracing::debug!(error = %e, "resume failed; retrying"),
            }
        }
    }

    /// Logs in again and resubscribes every channel with `since`, handing out what was missed.
    async fn resume(&mut self, ws: &mut Ws) -> Result<Vec<ServerFrame<Value>>, ClientError> {
        let mut backlog = Vec::new();
        self.login(ws, &mut backlog).await?;
        let mut recoveries = Vec::new();
        let channels: Vec<(String, Position)> = self
            .channels
            .iter()
            .map(|(c, p)| (c.clone(), p.clone()))
            .collect();
        for (channel, position) in channels {
            let data = self
                .call(
                    ws,
                    RawRequest {
                        channel: Some(channel.clone()),
                        since: Some(Since {
                            offset: position.last,
                            epoch: position.epoch.clone(),
                        }),
                        ..request("subscribe")
                    },
                    &mut backlog,
                )
                .await?;
            let reply: SubscribeReply = decode_data(data)?;
            let before = position.last;
            let missed = if reply.recovered {
                reply.missed
            } else {
                self.page_history(ws, &channel, before, reply.offset, &mut backlog)
                    .await
            };
            let count = missed.iter().filter(|m| m.offset > before).count();
            for message in missed {
                self.deliver(message).await;
            }
            if let Some(position) = self.channels.get_mut(&channel) {
                if position.last < reply.offset {
                    self.events
                        .send(Event::Gap {
                            channel: channel.clone(),
                            after: position.last,
                            before: reply.offset + 1,
                        })
                        .await
                        .ok();
                    position.last = reply.offset;
                }
                position.epoch = reply.epoch;
            }
            recoveries.push(Recovery {
                channel,
                missed: count,
                recovered: reply.recovered,
            });
        }
        self.emit(Event::Reconnected {
            channels: recoveries,
        })
        .await;
        Ok(backlog)
    }

    /// Messages `(after, upto]` from `history`, oldest first (as many as PostgreSQL has).
    async fn page_history(
        &mut self,
        ws: &mut Ws,
        channel: &str,
        after: u64,
        upto: u64,
        backlog: &mut Vec<ServerFrame<Value>>,
    ) -> Vec<ChannelMessage> {
        let mut found = Vec::new();
        let mut before = upto + 1;
        for _ in 0..GAP_PAGES {
            if before <= after + 1 {
                break;
            }
            let page = RawRequest {
                channel: Some(channel.to_owned()),
                before: Some(before),
                limit: Some(PAGE),
                ..request("history")
            };
            let Ok(data) = self.call(ws, page, backlog).await else {
                break;
            };
            let Ok(reply) = decode_data::<HistoryReply>(data) else {
                break;
            };
            let Some(oldest) = reply.messages.first().map(|m| m.offset) else {
                break;
            };
            let full = reply.messages.len() == PAGE as usize;
            found.extend(reply.messages.into_iter().filter(|m| m.offset > after));
            if !full || oldest >= before {
                break;
            }
            before = oldest;
        }
        found.sort_by_key(|m| m.offset);
        found.dedup_by_key(|m| m.offset);
        found
    }
}

/// A close frame for people: `1001 server shutting down`.
fn close_reason(frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) => format!(
            "closed by the server ({} {})",
            u16::from(frame.code),
            frame.reason
        ),
        None => "closed by the server".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_are_jittered_and_capped() {
        for attempt in 0..20 {
            let delay = reconnect_delay(attempt);
            assert!(delay <= Duration::from_secs(5), "{delay:?}");
            assert!(delay >= Duration::from_millis(125), "{delay:?}");
        }
        assert!(reconnect_delay(0) <= Duration::from_millis(250));
    }

    fn position(offset: u64, recovered: bool) -> InboxPosition {
        InboxPosition {
            epoch: "e1".into(),
            offset,
            recovered,
        }
    }

    #[test]
    fn the_inbox_position_moves_with_pushes_and_drops_repeats() {
        let mut inbox = Inbox::default();
        assert!(inbox.on_login(None, &position(7, true)));
        // Nothing handed out yet: the next login lets the server say where we are.
        assert_eq!(inbox.since(), None);
        assert!(inbox.on_push(Some(6)));
        assert!(inbox.on_push(Some(7)));
        assert!(
            !inbox.on_push(Some(7)),
            "a repeated push is handed out twice"
        );
        assert!(!inbox.on_push(Some(5)));
        assert!(inbox.on_push(None), "a push without an offset is dropped");
        assert_eq!(
            inbox.since(),
            Some(Since {
                offset: 7,
                epoch: "e1".into()
            })
        );
    }

    #[test]
    fn a_recovered_login_keeps_the_position_until_the_missed_pushes_come() {
        let mut inbox = Inbox::default();
        inbox.on_login(None, &position(3, true));
        inbox.on_push(Some(3));
        let since = inbox.since();
        assert!(inbox.on_login(since.as_ref(), &position(9, true)));
        assert_eq!(
            inbox.last,
            Some(3),
            "the missed 4..=9 must still be handed out"
        );
        assert!(inbox.on_push(Some(4)));
    }

    #[test]
    fn an_unrecovered_login_continues_after_the_reply_and_says_so() {
        let mut inbox = Inbox::default();
        inbox.on_login(None, &position(3, true));
        inbox.on_push(Some(3));
        let since = inbox.since();
        let mut reply = position(40, false);
        reply.epoch = "e2".into();
        assert!(!inbox.on_login(since.as_ref(), &reply));
        assert_eq!(
            inbox.since(),
            Some(Since {
                offset: 40,
                epoch: "e2".into()
            })
        );
        assert!(!inbox.on_push(Some(40)));
        assert!(inbox.on_push(Some(41)));
    }
}
