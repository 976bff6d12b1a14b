//! One client's session: its identity, subscriptions and rate limit, and the
//! handling of every protocol operation.
//!
//! A `subscribe` is answered by the channel's sequencer (see
//! [`crate::delivery`]), and the first `login` by the sequencer of the user's
//! inbox, which queue the reply themselves so that it comes before every push
//! above the reply's offset; every other reply is queued by the connection
//! from what [`Session::handle`] returns.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chatcluster_protocol::frame::{
    ChannelOnly, ChannelReply, ChannelsReply, ConversationsReply, DmHistoryReply, Empty, ErrorCode,
    HistoryReply, InboxPosition, LoginReply, Op, PresenceChange, PresenceReply, ReplyData, Request,
    RequestId, ServerFrame, Since, UsersReply,
};
use chatcluster_protocol::stream::StreamId;
use chatcluster_protocol::validate;

use crate::auth::Identity;
use crate::config::AuthMode;
use crate::delivery::sequencer::{PresenceMember, ReplyContext, ReplyKind};
use crate::inbox;
use crate::outbox::Outbox;
use crate::ratelimit::TokenBucket;
use crate::state::{Gateway, OpError};
use crate::store::Registry;

/// What an operation produced: reply data, or a reply already queued.
enum Done {
    Reply(ReplyData),
    Queued,
}

/// A `publish` or `message` whose checks are done: what is left needs only the
/// shared gateway, so it can run while the connection reads the next request.
pub type Pending = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;

/// The Redis work of a checked `publish` or `message`.
enum Work {
    Publish {
        channel: String,
        user: String,
        text: String,
        key: Option<String>,
    },
    Direct {
        from: String,
        to: String,
        text: String,
        key: Option<String>,
    },
}

impl Work {
    async fn run(self, gateway: &Gateway, clock: u64) -> Result<ReplyData, OpError> {
        match self {
            Self::Publish {
                channel,
                user,
                text,
                key,
            } => {
                let reply = gateway
                    .publish(&channel, &user, text, clock, key.as_deref())
                    .await?;
                Ok(ReplyData::Publish(reply))
            }
            Self::Direct {
                from,
                to,
                text,
                key,
            } => {
                let reply = inbox::send(gateway, &from, &to, text, clock, key.as_deref()).await?;
                Ok(ReplyData::Direct(reply))
            }
        }
    }
}

/// The reply frame of an operation's result, counting errors by code.
fn reply_frame(
    gateway: &Gateway,
    id: Option<RequestId>,
    clock: u64,
    result: Result<ReplyData, OpError>,
) -> ServerFrame {
    match result {
        Ok(data) => ServerFrame::Ok { id, clock, data },
        Err(error) => {
            gateway
                .metrics
                .errors_total
                .get_or_create(&[("code", error.code.as_str())])
                .inc();
            ServerFrame::Error {
                id,
                clock,
                code: error.code,
                message: error.message,
            }
        }
    }
}

/// State of one connection's session.
#[derive(Debug)]
pub struct Session {
    gateway: Arc<Gateway>,
    outbox: Outbox,
    identity: Option<Identity>,
    /// Presence member name and user, set at login.
    presence: Option<PresenceMember>,
    /// Where the user's inbox stood when this connection joined it.
    inbox: Option<InboxPosition>,
    subscriptions: HashSet<String>,
    bucket: TokenBucket,
}

fn not_logged_in() -> OpError {
    OpError::new(
        ErrorCode::Unauthorized,
        "log in first: send {\"op\":\"login\",\"user\":\"<name>\"}",
    )
}

impl Session {
    /// A session for a new connection; with a verified identity (JWT mode)
    /// the user is logged in at once.
    pub async fn start(
        gateway: Arc<Gateway>,
        outbox: Outbox,
        identity: Option<Identity>,
    ) -> Result<Self, OpError> {
        let bucket = TokenBucket::new(gateway.config.publish_rate, gateway.config.publish_burst);
        let mut session = Self {
            gateway,
            outbox,
            identity: None,
            presence: None,
            inbox: None,
            subscriptions: HashSet::new(),
            bucket,
        };
        if let Some(identity) = identity {
            let reply = ReplyContext {
                id: None,
                clock: session.gateway.clock.tick(None),
                kind: ReplyKind::Silent,
            };
            session.bind(identity, None, reply).await?;
        }
        Ok(session)
    }

    /// Starts a `publish` or `message`: its checks (login, names, size, rate)
    /// run now, in request order, and its Redis work in the returned future,
    /// which may overlap with the requests after it; their replies must still
    /// be queued in request order. Any other request is given back.
    pub fn start_pipelined(&mut self, request: Request) -> Result<Pending, Request> {
        if !matches!(request.op, Op::Publish { .. } | Op::Message { .. }) {
            return Err(request);
        }
        let clock = self.count(&request);
        let work = match request.op {
            Op::Publish {
                channel,
                text,
                idempotency_key,
            } => self.check_publish(channel, text, idempotency_key),
            Op::Message {
                to,
                text,
                idempotency_key,
            } => self.check_direct(to, text, idempotency_key),
            _ => return Err(request),
        };
        let (gateway, id) = (self.gateway.clone(), request.id);
        Ok(Box::pin(async move {
            let result = match work {
                Ok(work) => work.run(&gateway, clock).await,
                Err(error) => Err(error),
            };
            reply_frame(&gateway, id, clock, result)
        }))
    }

    /// Ticks the clock for a request and counts it; returns its Lamport time.
    fn count(&self, request: &Request) -> u64 {
        self.gateway
            .metrics
            .requests_total
            .get_or_create(&[("op", request.op.name())])
            .inc();
        self.gateway.clock.tick(request.clock)
    }

    /// Handles one request; returns the reply to queue, or `None` when the
    /// reply is already queued (a successful `subscribe` or first `login`).
    pub async fn handle(&mut self, request: Request) -> Option<ServerFrame> {
        let request = match self.start_pipelined(request) {
            Ok(pending) => return Some(pending.await),
            Err(request) => request,
        };
        let clock = self.count(&request);
        let id = request.id;
        let result = match request.op {
            Op::Login { user, since } => self.login(user, since, (id.clone(), clock)).await,
            Op::Users => self
                .list(Registry::Users)
                .await
                .map(|users| Done::Reply(ReplyData::Users(UsersReply { users }))),
            Op::Channel { channel } => self.create_channel(channel).await.map(Done::Reply),
            Op::Channels => self
                .list(Registry::Channels)
                .await
                .map(|channels| Done::Reply(ReplyData::Channels(ChannelsReply { channels }))),
            Op::Subscribe { channel, since } => self
                .subscribe(channel, since, (id.clone(), clock))
                .await
                .map(|()| Done::Queued),
            Op::Unsubscribe { channel } => self.unsubscribe(channel).await.map(Done::Reply),
            Op::Presence { channel } => self.presence(channel).await.map(Done::Reply),
            Op::History {
                channel,
                before,
                limit,
            } => self.history(channel, before, limit).await.map(Done::Reply),
            Op::Conversations { before, limit } => {
                self.conversations(before, limit).await.map(Done::Reply)
            }
            Op::DmHistory {
                with,
                before,
                limit,
            } => self.dm_history(with, before, limit).await.map(Done::Reply),
            Op::Ping => Ok(Done::Reply(ReplyData::Pong(Empty {}))),
            Op::Publish { .. } | Op::Message { .. } => Err(OpError::new(
                ErrorCode::Internal,
                "publish and message are started with start_pipelined",
            )),
        };
        match result {
            Ok(Done::Queued) => None,
            Ok(Done::Reply(data)) => Some(reply_frame(&self.gateway, id, clock, Ok(data))),
            Err(error) => Some(reply_frame(&self.gateway, id, clock, Err(error))),
        }
    }

    fn user(&self) -> Result<&Identity, OpError> {
        self.identity.as_ref().ok_or_else(not_logged_in)
    }

    /// A valid channel the logged-in user may use (create, subscribe, publish).
    fn check_channel(&self, channel: &str) -> Result<(), OpError> {
        self.user()?;
        self.check_readable(channel)
    }

    /// A valid channel that is not outside the token's `channels` claim (read
    /// operations need no login).
    fn check_readable(&self, channel: &str) -> Result<(), OpError> {
        validate::channel_name(channel)?;
        match &self.identity {
            Some(identity) if !identity.may_use(channel) => Err(OpError::new(
                ErrorCode::Forbidden,
                format!("your token does not allow channel {channel:?}"),
            )),
            _ => Ok(()),
        }
    }

    async fn list(&self, registry: Registry) -> Result<Vec<String>, OpError> {
        Ok(self.gateway.store.list(registry).await?)
    }

    fn take_token(&mut self) -> Result<(), OpError> {
        if self.bucket.try_take() {
            Ok(())
        } else {
            Err(OpError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second; slow down",
                    self.gateway.config.publish_rate
                ),
            ))
        }
    }

    /// Binds the connection to a user: registers it and joins the user's
    /// inbox, recovering after `since` (or after what was last pushed to the
    /// user); the inbox's sequencer queues `reply` and the recovered direct
    /// messages.
    async fn bind(
        &mut self,
        identity: Identity,
        since: Option<Since>,
        reply: ReplyContext,
    ) -> Result<(), OpError> {
        let gateway = self.gateway.clone();
        gateway.ensure_user(&identity.user).await?;
        let since = match since {
            Some(since) => Some(since),
            None => gateway.store.inbox_cursor(&identity.user).await?,
        };
        let joined = gateway
            .delivery
            .join(
                StreamId::inbox(&identity.user),
                self.outbox.clone(),
                None,
                since,
                reply,
            )
            .await?;
        self.inbox = Some(InboxPosition {
            epoch: joined.epoch,
            offset: joined.offset,
            recovered: joined.recovered,
        });
        let member = format!(
            "{}/{}/{}",
            identity.user,
            gateway.instance,
            self.outbox.id()
        );
        self.presence = Some((member.into(), identity.user.as_str().into()));
        self.identity = Some(identity);
        Ok(())
    }

    async fn login(
        &mut self,
        user: String,
        since: Option<Since>,
        (id, clock): (Option<RequestId>, u64),
    ) -> Result<Done, OpError> {
        validate::user_name(&user)?;
        match &self.identity {
            Some(identity) if identity.user == user => {}
            Some(identity) if self.gateway.auth.mode() == AuthMode::Jwt => {
                return Err(OpError::new(
                    ErrorCode::Forbidden,
                    format!("your token is for user {:?}", identity.user),
                ));
            }
            Some(identity) => {
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "already logged in as {:?}; open a new connection to change user",
                        identity.user
                    ),
                ));
            }
            None => {
                let reply = ReplyContext {
                    id,
                    clock,
                    kind: ReplyKind::Login { user: user.clone() },
                };
                self.bind(Identity::unrestricted(user), since, reply)
                    .await?;
                return Ok(Done::Queued);
            }
        }
        Ok(Done::Reply(ReplyData::Login(LoginReply {
            user,
            inbox: self.inbox.clone(),
        })))
    }

    async fn create_channel(&mut self, channel: String) -> Result<ReplyData, OpError> {
        self.check_channel(&channel)?;
        let created = self
            .gateway
            .store
            .register(Registry::Channels, &channel)
            .await?;
        Ok(ReplyData::Channel(ChannelReply { channel, created }))
    }

    /// Joins presence, then asks the channel's sequencer for the subscription;
    /// the sequencer queues the reply.
    async fn subscribe(
        &mut self,
        channel: String,
        since: Option<Since>,
        (id, clock): (Option<RequestId>, u64),
    ) -> Result<(), OpError> {
        self.check_channel(&channel)?;
        if self.subscriptions.contains(&channel) {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!("already subscribed to {channel:?}"),
            ));
        }
        if self.subscriptions.len() >= self.gateway.config.max_subscriptions {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                format!(
                    "at most {} subscriptions per connection",
                    self.gateway.config.max_subscriptions
                ),
            ));
        }
        let gateway = self.gateway.clone();
        gateway.ensure_channel(&channel).await?;
        let Some((member, user)) = self.presence.clone() else {
            return Err(not_logged_in());
        };
        if gateway
            .store
            .presence_join(&channel, &member, &user)
            .await?
        {
            gateway
                .announce(&channel, &user, PresenceChange::Join)
                .await;
        }
        // Counted before the reply can reach the client.
        gateway.metrics.subscriptions.inc();
        let joined = async {
            let presence = gateway.store.presence_users(&channel).await?;
            let reply = ReplyContext {
                id,
                clock,
                kind: ReplyKind::Subscribe { presence },
            };
            let outbox = self.outbox.clone();
            let stream = StreamId::channel(&channel);
            gateway
                .delivery
                .join(stream, outbox, Some((member, user)), since, reply)
                .await
                .map_err(OpError::from)
        }
        .await;
        match joined {
            Ok(_) => {
                self.subscriptions.insert(channel);
                Ok(())
            }
            Err(error) => {
                gateway.metrics.subscriptions.dec();
                self.leave_presence(&channel).await;
                Err(error)
            }
        }
    }

    async fn unsubscribe(&mut self, channel: String) -> Result<ReplyData, OpError> {
        validate::channel_name(&channel)?;
        if !self.subscriptions.remove(&channel) {
            return Err(OpError::new(
                ErrorCode::NotFound,
                format!("not subscribed to {channel:?}"),
            ));
        }
        self.leave(&channel).await;
        Ok(ReplyData::Unsubscribe(ChannelOnly { channel }))
    }

    /// Removes the subscription and leaves presence.
    async fn leave(&self, channel: &str) {
        let gateway = &self.gateway;
        gateway
            .delivery
            .leave(StreamId::channel(channel), self.outbox.id())
            .await;
        gateway.metrics.subscriptions.dec();
        self.leave_presence(channel).await;
    }

    /// Removes this connection's presence member, announcing the user's leave
    /// when it was the user's last connection in the channel.
    async fn leave_presence(&self, channel: &str) {
        let gateway = &self.gateway;
        if let Some((member, user)) = &self.presence {
            match gateway.store.presence_leave(channel, member, user).await {
                Ok(true) => gateway.announce(channel, user, PresenceChange::Leave).await,
                Ok(false) => {}
                // The member expires and is swept by a live gateway.
                Err(error) => tracing::warn!(%channel, %error, "presence leave failed"),
            }
        }
    }

    fn check_publish(
        &mut self,
        channel: String,
        text: String,
        key: Option<String>,
    ) -> Result<Work, OpError> {
        self.check_channel(&channel)?;
        validate::text(&text, self.gateway.config.max_text_bytes)?;
        self.take_token()?;
        let user = self.user()?.user.clone();
        Ok(Work::Publish {
            channel,
            user,
            text,
            key,
        })
    }

    fn check_direct(
        &mut self,
        to: String,
        text: String,
        key: Option<String>,
    ) -> Result<Work, OpError> {
        validate::user_name(&to)?;
        validate::text(&text, self.gateway.config.max_text_bytes)?;
        let from = self.user()?.user.clone();
        self.take_token()?;
        Ok(Work::Direct {
            from,
            to,
            text,
            key,
        })
    }

    async fn conversations(
        &self,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<ReplyData, OpError> {
        let user = &self.user()?.user;
        let limit = validate::history_limit(limit)?;
        let conversations = inbox::conversations(&self.gateway, user, before, limit).await?;
        Ok(ReplyData::Conversations(ConversationsReply {
            conversations,
        }))
    }

    async fn dm_history(
        &self,
        with: String,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<ReplyData, OpError> {
        validate::user_name(&with)?;
        let user = &self.user()?.user;
        let limit = validate::history_limit(limit)?;
        let messages = inbox::history(&self.gateway, user, &with, before, limit).await?;
        Ok(ReplyData::DmHistory(DmHistoryReply { with, messages }))
    }

    async fn presence(&self, channel: String) -> Result<ReplyData, OpError> {
        self.check_readable(&channel)?;
        let users = self.gateway.store.presence_users(&channel).await?;
        Ok(ReplyData::Presence(PresenceReply { channel, users }))
    }

    async fn history(
        &self,
        channel: String,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<ReplyData, OpError> {
        self.check_readable(&channel)?;
        let limit = validate::history_limit(limit)?;
        let messages = self.gateway.read_history(&channel, before, limit).await?;
        Ok(ReplyData::History(HistoryReply { channel, messages }))
    }

    /// Ends the session: leaves every channel and stops receiving direct messages.
    pub async fn close(mut self) {
        for channel in std::mem::take(&mut self.subscriptions) {
            self.leave(&channel).await;
        }
        if let Some(identity) = &self.identity {
            self.gateway
                .delivery
                .leave(StreamId::inbox(&identity.user), self.outbox.id())
                .await;
        }
    }
}
