//! One client's session: its identity, subscriptions and rate limit, and the
//! handling of every protocol operation.

use std::collections::HashSet;
use std::sync::Arc;

use chatcluster_protocol::entry::StoredDirect;
use chatcluster_protocol::frame::{
    ChannelOnly, ChannelReply, ChannelsReply, DirectReply, Empty, ErrorCode, HistoryReply,
    LoginReply, Op, PresenceChange, PresenceReply, ReplyData, Request, ServerFrame, Since,
    SubscribeReply, UsersReply,
};
use chatcluster_protocol::{keys, validate};

use crate::auth::Identity;
use crate::config::AuthMode;
use crate::history::HistoryError;
use crate::hub::PresenceMember;
use crate::outbox::Outbox;
use crate::ratelimit::TokenBucket;
use crate::state::{Gateway, OpError};
use crate::store::Registry;

/// Work to do once a reply is queued: a subscriber switches from buffering to live.
#[derive(Debug)]
pub struct Activation {
    channel: String,
    epoch: String,
    offset: u64,
}

/// A reply and what to do once it is queued.
#[derive(Debug)]
pub struct Outcome {
    /// The reply frame.
    pub reply: ServerFrame,
    /// Set by a successful `subscribe`.
    pub activation: Option<Activation>,
}

/// State of one connection's session.
#[derive(Debug)]
pub struct Session {
    gateway: Arc<Gateway>,
    outbox: Outbox,
    identity: Option<Identity>,
    /// Presence member name and user, set at login.
    presence: Option<PresenceMember>,
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
            subscriptions: HashSet::new(),
            bucket,
        };
        if let Some(identity) = identity {
            session.bind(identity).await?;
        }
        Ok(session)
    }

    /// Handles one request.
    pub async fn handle(&mut self, request: Request) -> Outcome {
        let clock = self.gateway.clock.tick(request.clock);
        let op_name = request.op.name();
        self.gateway
            .metrics
            .requests_total
            .get_or_create(&[("op", op_name)])
            .inc();
        let mut activation = None;
        let result = match request.op {
            Op::Login { user } => self.login(user).await,
            Op::Users => self
                .list(Registry::Users)
                .await
                .map(|users| ReplyData::Users(UsersReply { users })),
            Op::Channel { channel } => self.create_channel(channel).await,
            Op::Channels => self
                .list(Registry::Channels)
                .await
                .map(|channels| ReplyData::Channels(ChannelsReply { channels })),
            Op::Subscribe { channel, since } => {
                self.subscribe(channel, since).await.map(|(reply, next)| {
                    activation = Some(next);
                    reply
                })
            }
            Op::Unsubscribe { channel } => self.unsubscribe(channel).await,
            Op::Publish { channel, text } => self.publish(channel, text, clock).await,
            Op::Message { to, text } => self.direct(to, text, clock).await,
            Op::Presence { channel } => self.presence(channel).await,
            Op::History {
                channel,
                before,
                limit,
            } => self.history(channel, before, limit).await,
            Op::Ping => Ok(ReplyData::Pong(Empty {})),
        };
        let reply = match result {
            Ok(data) => ServerFrame::Ok {
                id: request.id,
                clock,
                data,
            },
            Err(error) => {
                self.gateway
                    .metrics
                    .errors_total
                    .get_or_create(&[("code", error.code.as_str())])
                    .inc();
                ServerFrame::Error {
                    id: request.id,
                    clock,
                    code: error.code,
                    message: error.message,
                }
            }
        };
        Outcome { reply, activation }
    }

    /// Switches a new subscriber from buffering to live delivery (its reply is queued).
    pub fn activate(&self, activation: Activation) {
        self.gateway.hub.activate(
            &activation.channel,
            self.outbox.id(),
            &activation.epoch,
            activation.offset,
        );
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

    /// Binds the connection to a user: registers it and receives its direct messages.
    async fn bind(&mut self, identity: Identity) -> Result<(), OpError> {
        let gateway = self.gateway.clone();
        gateway.ensure_user(&identity.user).await?;
        gateway
            .topics
            .acquire(keys::user_topic(&identity.user))
            .await?;
        gateway.hub.add_user(&identity.user, self.outbox.clone());
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

    async fn login(&mut self, user: String) -> Result<ReplyData, OpError> {
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
            None => self.bind(Identity::unrestricted(user.clone())).await?,
        }
        Ok(ReplyData::Login(LoginReply { user }))
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

    async fn subscribe(
        &mut self,
        channel: String,
        since: Option<Since>,
    ) -> Result<(ReplyData, Activation), OpError> {
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
        let Some(presence) = self.presence.clone() else {
            return Err(not_logged_in());
        };
        let limit = gateway.config.outbound_queue as usize;
        gateway
            .hub
            .add_member(&channel, self.outbox.clone(), presence.clone(), limit);
        let topic = keys::channel_topic(&channel);
        if let Err(error) = gateway.topics.acquire(topic.clone()).await {
            gateway.hub.remove_member(&channel, self.outbox.id());
            return Err(error.into());
        }
        match self.catch_up(&channel, since, &presence).await {
            Ok(result) => {
                self.subscriptions.insert(channel);
                Ok(result)
            }
            Err(error) => {
                gateway.hub.remove_member(&channel, self.outbox.id());
                gateway.topics.release(topic).await;
                Err(error)
            }
        }
    }

    /// Reads the channel's position and what the client missed, and joins presence.
    async fn catch_up(
        &self,
        channel: &str,
        since: Option<Since>,
        (member, user): &PresenceMember,
    ) -> Result<(ReplyData, Activation), OpError> {
        let gateway = &self.gateway;
        let position = gateway.position(channel).await?;
        let (recovered, missed) = match since {
            Some(since) if since.epoch == position.epoch && since.offset <= position.top => {
                let missed = gateway
                    .store
                    .history_range(
                        channel,
                        since.offset + 1,
                        None,
                        gateway.config.history_size as usize,
                    )
                    .await?;
                // Recovered only when `missed` runs from right after `since` up
                // to at least the channel's top: nothing trimmed at either end.
                let complete = match (missed.first(), missed.last()) {
                    (Some(first), Some(last)) => {
                        first.offset == since.offset + 1 && last.offset >= position.top
                    }
                    _ => since.offset == position.top,
                };
                if complete {
                    (true, missed)
                } else {
                    (false, Vec::new())
                }
            }
            _ => (false, Vec::new()),
        };
        let offset = missed
            .last()
            .map_or(position.top, |m| m.offset.max(position.top));
        if gateway.store.presence_join(channel, member, user).await? {
            gateway.announce(channel, user, PresenceChange::Join).await;
        }
        let presence = gateway.store.presence_users(channel).await?;
        let reply = ReplyData::Subscribe(SubscribeReply {
            channel: channel.to_owned(),
            epoch: position.epoch.clone(),
            offset,
            presence,
            recovered,
            missed,
        });
        Ok((
            reply,
            Activation {
                channel: channel.to_owned(),
                epoch: position.epoch,
                offset,
            },
        ))
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

    /// Removes the subscription locally, releases the topic and leaves presence.
    async fn leave(&self, channel: &str) {
        let gateway = &self.gateway;
        gateway.hub.remove_member(channel, self.outbox.id());
        gateway.topics.release(keys::channel_topic(channel)).await;
        if let Some((member, user)) = &self.presence {
            match gateway.store.presence_leave(channel, member, user).await {
                Ok(true) => gateway.announce(channel, user, PresenceChange::Leave).await,
                Ok(false) => {}
                // The member expires and is swept by a live gateway.
                Err(error) => tracing::warn!(%channel, %error, "presence leave failed"),
            }
        }
    }

    async fn publish(
        &mut self,
        channel: String,
        text: String,
        clock: u64,
    ) -> Result<ReplyData, OpError> {
        self.check_channel(&channel)?;
        validate::text(&text, self.gateway.config.max_text_bytes)?;
        self.take_token()?;
        let user = self.user()?.user.clone();
        let reply = self.gateway.publish(&channel, &user, text, clock).await?;
        Ok(ReplyData::Publish(reply))
    }

    async fn direct(&mut self, to: String, text: String, clock: u64) -> Result<ReplyData, OpError> {
        validate::user_name(&to)?;
        validate::text(&text, self.gateway.config.max_text_bytes)?;
        let from = self.user()?.user.clone();
        self.take_token()?;
        if !self.gateway.user_exists(&to).await? {
            return Err(OpError::new(ErrorCode::NotFound, format!("no user {to:?}")));
        }
        let direct = StoredDirect {
            msg_id: uuid::Uuid::new_v4(),
            from,
            to,
            text,
            ts: chrono::Utc::now().timestamp_millis(),
            clock,
        };
        self.gateway.store.send_direct(&direct).await?;
        self.gateway.metrics.messages_in_total.inc();
        Ok(ReplyData::Direct(DirectReply {
            msg_id: direct.msg_id,
        }))
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
        let messages = read_history(&self.gateway, &channel, before, limit).await?;
        Ok(ReplyData::History(HistoryReply { channel, messages }))
    }

    /// Ends the session: leaves every channel and stops receiving direct messages.
    pub async fn close(mut self) {
        for channel in std::mem::take(&mut self.subscriptions) {
            self.leave(&channel).await;
        }
        if let Some(identity) = &self.identity {
            self.gateway
                .hub
                .remove_user(&identity.user, self.outbox.id());
            self.gateway
                .topics
                .release(keys::user_topic(&identity.user))
                .await;
        }
    }
}

/// A page of a channel's permanent history. `not_found` for a channel that
/// neither Redis nor PostgreSQL knows (PostgreSQL still has the history of a
/// channel a wiped Redis forgot).
pub async fn read_history(
    gateway: &Gateway,
    channel: &str,
    before: Option<u64>,
    limit: u32,
) -> Result<Vec<chatcluster_protocol::frame::ChannelMessage>, OpError> {
    let known = gateway.store.exists(Registry::Channels, channel).await?;
    let not_found = || OpError::new(ErrorCode::NotFound, format!("no channel {channel:?}"));
    match gateway.history.page(channel, before, limit).await {
        Ok(messages) if known || !messages.is_empty() => Ok(messages),
        Ok(_) | Err(HistoryError::NotConfigured) if !known => Err(not_found()),
        Ok(messages) => Ok(messages),
        Err(error) => Err(error.into()),
    }
}
