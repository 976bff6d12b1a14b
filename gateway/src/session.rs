//! One client's session: its identity, subscriptions and budgets, and the
//! handling of every protocol operation.
//!
//! Before an op runs it is paid for from the connection's op budget (see
//! [`crate::budget`]): it waits for the budget to refill (up to `OP_WAIT`),
//! or is answered `rate_limited` without touching a backend. In JWT mode the session ends
//! when its token expires ([`Session::expiry`]) unless `refresh` replaced it.
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
use std::time::Duration;

use chatcluster_protocol::frame::{
    ChannelOnly, ChannelReply, ChannelsReply, ConversationsReply, DmHistoryReply, Empty, ErrorCode,
    HistoryReply, InboxPosition, LoginReply, Op, PresenceChange, PresenceReply, RefreshReply,
    ReplyData, Request, RequestId, ServerFrame, Since, Token, UsersReply,
};
use chatcluster_protocol::stream::StreamId;
use chatcluster_protocol::validate;

use crate::auth::{AuthError, Identity};
use crate::budget::{self, UserSlot};
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
    /// The message bucket (`publish`, `message`).
    bucket: TokenBucket,
    /// The op budget (every other op, weighted by cost).
    budget: TokenBucket,
    /// This connection's place among its user's connections.
    slot: Option<UserSlot>,
}

/// A connection slot of `user`, or `limit_exceeded` at `MAX_USER_CONNECTIONS`.
pub fn user_slot(gateway: &Gateway, user: &str) -> Result<UserSlot, OpError> {
    gateway.user_connections.acquire(user).ok_or_else(|| {
        OpError::new(
            ErrorCode::LimitExceeded,
            format!(
                "user {user:?} has {} connections open here, the limit (MAX_USER_CONNECTIONS); close one",
                gateway.user_connections.max()
            ),
        )
    })
}

fn not_logged_in() -> OpError {
    OpError::new(
        ErrorCode::Unauthorized,
        "log in first: send {\"op\":\"login\",\"user\":\"<name>\"}",
    )
}

impl Session {
    /// A session for a new connection; with a verified identity (JWT mode,
    /// with the user's connection slot taken at the upgrade) the user is
    /// logged in at once.
    pub async fn start(
        gateway: Arc<Gateway>,
        outbox: Outbox,
        identity: Option<(Identity, UserSlot)>,
    ) -> Result<Self, OpError> {
        let config = &gateway.config;
        let bucket = TokenBucket::new(config.publish_rate, config.publish_burst);
        let budget = TokenBucket::new(config.op_rate, config.op_burst);
        let mut session = Self {
            gateway,
            outbox,
            identity: None,
            presence: None,
            inbox: None,
            subscriptions: HashSet::new(),
            bucket,
            budget,
            slot: None,
        };
        if let Some((identity, slot)) = identity {
            session.slot = Some(slot);
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
    /// be queued in request order. Any other request is given back. A request
    /// refused by its checks costs one unit of the op budget, like every
    /// refused request.
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
        if work.is_err() {
            self.budget.charge(budget::REFUSAL_COST);
        }
        let (gateway, id) = (self.gateway.clone(), request.id);
        Ok(Box::pin(async move {
            let result = match work {
                Ok(work) => work.run(&gateway, clock).await,
                Err(error) => Err(error),
            };
            reply_frame(&gateway, id, clock, result)
        }))
    }

    /// When the session's token runs out (its `exp` plus `JWT_LEEWAY`), as a
    /// Unix time in seconds; `None` for sessions without an expiring token.
    pub fn expiry(&self) -> Option<u64> {
        let expires = self.identity.as_ref()?.expires?;
        Some(expires.saturating_add(self.gateway.auth.leeway().as_secs()))
    }

    /// Charges the op budget for a request that was refused before it ran
    /// (a malformed frame).
    pub fn charge_refusal(&mut self) {
        self.budget.charge(budget::REFUSAL_COST);
    }

    /// How long the connection must stop reading until its op budget is out
    /// of debt (zero when it is not in debt).
    pub fn debt_wait(&mut self) -> Duration {
        self.budget.debt_wait()
    }

    /// Pays for `op` from the op budget, waiting for it to refill when that
    /// takes at most `OP_WAIT` (the connection is not read meanwhile);
    /// `rate_limited` (and one unit charged) when it would take longer.
    async fn pay(&mut self, op: &Op) -> Result<(), OpError> {
        let Some(cost) = budget::cost(op) else {
            return Ok(());
        };
        let config = &self.gateway.config;
        let wait = self.budget.wait_for(cost);
        if wait > config.op_wait {
            self.budget.charge(budget::REFUSAL_COST);
            return Err(OpError::new(
                ErrorCode::RateLimited,
                format!(
                    "over this connection's op budget ({} units/s, burst {}; {} costs {cost}); slow down",
                    config.op_rate,
                    config.op_burst,
                    op.name()
                ),
            ));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.budget.charge(cost);
        Ok(())
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
        // Ops paid from the message bucket cost the op budget only when refused.
        let unpaid = budget::cost(&request.op).is_none();
        if let Err(error) = self.pay(&request.op).await {
            return Some(reply_frame(&self.gateway, id, clock, Err(error)));
        }
        let result = match request.op {
            Op::Login { user, since } => self.login(user, since, (id.clone(), clock)).await,
            Op::Users { cursor, limit } => self
                .list(Registry::Users, cursor, limit)
                .await
                .map(|(users, cursor)| Done::Reply(ReplyData::Users(UsersReply { users, cursor }))),
            Op::Channel { channel } => self.create_channel(channel).await.map(Done::Reply),
            Op::Channels { cursor, limit } => self
                .list(Registry::Channels, cursor, limit)
                .await
                .map(|(channels, cursor)| {
                    Done::Reply(ReplyData::Channels(ChannelsReply { channels, cursor }))
                }),
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
            Op::Refresh { token } => self.refresh(token).map(Done::Reply),
            Op::Publish { .. } | Op::Message { .. } => Err(OpError::new(
                ErrorCode::Internal,
                "publish and message are started with start_pipelined",
            )),
        };
        match result {
            Ok(Done::Queued) => None,
            Ok(Done::Reply(data)) => Some(reply_frame(&self.gateway, id, clock, Ok(data))),
            Err(error) => {
                if unpaid {
                    self.budget.charge(budget::REFUSAL_COST);
                }
                Some(reply_frame(&self.gateway, id, clock, Err(error)))
            }
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

    async fn list(
        &self,
        registry: Registry,
        cursor: Option<String>,
        limit: Option<u32>,
    ) -> Result<crate::store::NamePage, OpError> {
        self.gateway
            .list_page(registry, cursor.as_deref(), limit, self.identity.as_ref())
            .await
    }

    fn take_token(&mut self) -> Result<(), OpError> {
        if self.bucket.try_take(1.0) {
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
        if self.slot.is_none() {
            self.slot = Some(user_slot(&gateway, &identity.user)?);
        }
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
                let bound = self.bind(Identity::unrestricted(user), since, reply).await;
                if bound.is_err() {
                    self.slot = None;
                }
                bound?;
                return Ok(Done::Queued);
            }
        }
        Ok(Done::Reply(ReplyData::Login(LoginReply {
            user,
            inbox: self.inbox.clone(),
        })))
    }

    /// Replaces the session's token with a newer one for the same user. The
    /// new `channels` claim must allow every channel subscribed to.
    fn refresh(&mut self, token: Token) -> Result<ReplyData, OpError> {
        let auth = &self.gateway.auth;
        if auth.mode() != AuthMode::Jwt {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                AuthError::NotJwt.to_string(),
            ));
        }
        let current = self.user()?;
        let identity = auth.refresh(current, &token.0).map_err(|error| {
            let code = match error {
                AuthError::OtherUser { .. } => ErrorCode::Forbidden,
                _ => ErrorCode::Unauthorized,
            };
            OpError::new(code, error.to_string())
        })?;
        let mut outside: Vec<&String> = self
            .subscriptions
            .iter()
            .filter(|channel| !identity.may_use(channel))
            .collect();
        if !outside.is_empty() {
            outside.sort();
            return Err(OpError::new(
                ErrorCode::Forbidden,
                format!("the new token does not allow {outside:?}; unsubscribe first"),
            ));
        }
        let reply = RefreshReply {
            user: identity.user.clone(),
            expires: identity.expires,
        };
        self.identity = Some(identity);
        Ok(ReplyData::Refresh(reply))
    }

    async fn create_channel(&mut self, channel: String) -> Result<ReplyData, OpError> {
        self.check_channel(&channel)?;
        let creator = self.user()?.user.clone();
        let created = self.gateway.ensure_channel(&channel, &creator).await?;
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
        let creator = self.user()?.user.clone();
        gateway.ensure_channel(&channel, &creator).await?;
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
