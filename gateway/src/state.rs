//! The state one gateway process shares between its connections, and the
//! operations both the WebSocket and the HTTP API perform.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chatcluster_protocol::LamportClock;
use chatcluster_protocol::entry::StoredMessage;
use chatcluster_protocol::frame::{
    ChannelMessage, ErrorCode, PresenceChange, PresenceEvent, PublishReply, ServerFrame,
};
use chatcluster_protocol::keys;
use chatcluster_protocol::stream::StreamId;
use chatcluster_protocol::validate::ValidationError;

use crate::auth::Authenticator;
use crate::blocks::Blocks;
use crate::budget::UserConnections;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::delivery::dispatcher::Context;
use crate::delivery::sequencer::JoinError;
use crate::epochs::{self, EpochError};
use crate::history::{History, HistoryError};
use crate::metrics::Metrics;
use crate::names::KnownNames;
use crate::pages;
use crate::pubsub::{Endpoint, Inbound, PubSub, PubSubError, PubSubSettings};
use crate::store::{
    Append, Appended, CreateLimits, Registration, Registry, Store, StoreError, StoreSettings,
};

/// An operation that failed, as the client will see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct OpError {
    /// The error code.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl OpError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ValidationError> for OpError {
    fn from(error: ValidationError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl From<StoreError> for OpError {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "redis request failed");
        Self::new(
            ErrorCode::Unavailable,
            "message store unavailable, retry later",
        )
    }
}

impl From<JoinError> for OpError {
    fn from(error: JoinError) -> Self {
        Self::new(error.code, error.message)
    }
}

impl From<EpochError> for OpError {
    /// The error of a write: when Redis may have carried it out without
    /// answering, the client is told to retry with the same idempotency key.
    fn from(error: EpochError) -> Self {
        match error {
            EpochError::Store(e) if e.outcome_unknown() => {
                tracing::warn!(error = %e, "redis did not answer a write");
                Self::new(
                    ErrorCode::UnknownOutcome,
                    "the message store did not answer: the message may or may not be stored; \
                     retry with the same idempotency_key",
                )
            }
            EpochError::Store(e) => e.into(),
            EpochError::Database(e) => e.into(),
            EpochError::Contended(stream) => {
                tracing::warn!(%stream, "write gave up: epoch or offset block kept changing");
                Self::new(
                    ErrorCode::Unavailable,
                    "message store busy, nothing was stored; retry later",
                )
            }
        }
    }
}

/// Why a gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid flag combination.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Invalid Redis URL.
    #[error("invalid REDIS_URL: {0}")]
    RedisUrl(#[source] redis::RedisError),
    /// Redis client setup failed.
    #[error("redis setup: {0}")]
    Store(#[from] StoreError),
    /// The subscriber connection cannot be set up for this URL.
    #[error("redis pub/sub setup: {0}")]
    PubSub(#[from] PubSubError),
    /// Invalid DATABASE_URL.
    #[error("invalid DATABASE_URL: {0}")]
    Database(#[from] HistoryError),
}

impl From<HistoryError> for OpError {
    fn from(error: HistoryError) -> Self {
        match error {
            HistoryError::NotConfigured => Self::new(ErrorCode::Unavailable, error.to_string()),
            HistoryError::Database(e) => {
                tracing::warn!(error = %e, "postgres request failed");
                Self::new(
                    ErrorCode::Unavailable,
                    "history database unavailable, retry later",
                )
            }
            HistoryError::NoSchema => {
                tracing::warn!("postgres has no chatcluster schema yet");
                Self::new(
                    ErrorCode::Unavailable,
                    "database not initialized yet (the worker migrates it at start); retry later",
                )
            }
        }
    }
}

/// Everything a gateway process shares.
#[derive(Debug)]
pub struct Gateway {
    /// Configuration.
    pub config: Config,
    /// Instance id used in presence members.
    pub instance: String,
    /// Redis requests.
    pub store: Store,
    /// PostgreSQL history reads.
    pub history: History,
    /// Offset blocks reserved in PostgreSQL.
    pub blocks: Blocks,
    /// The delivery core.
    pub delivery: Delivery,
    /// The subscriber connection.
    pub pubsub: PubSub,
    /// Names known to be registered in Redis.
    pub names: Arc<KnownNames>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Lamport clock.
    pub clock: Arc<LamportClock>,
    /// Token checks.
    pub auth: Authenticator,
    /// Open connection slots.
    pub connection_slots: Arc<Semaphore>,
    /// Open connections per user (`MAX_USER_CONNECTIONS`).
    pub user_connections: Arc<UserConnections>,
    /// Connection tasks, awaited at shutdown.
    pub connections: TaskTracker,
    /// Cancelled when open connections must close (end of drain).
    pub closing: CancellationToken,
    /// Cancelled on SIGTERM: readiness fails and upgrades are refused.
    pub draining: CancellationToken,
    redis_up: AtomicBool,
    next_conn: AtomicU64,
}

impl Gateway {
    /// Builds the shared state from the configuration and starts the
    /// delivery core and the subscriber connection, which stop when
    /// `background` is cancelled.
    pub fn start(config: Config, background: &CancellationToken) -> Result<Arc<Self>, StartError> {
        config.validate().map_err(StartError::Config)?;
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(StartError::RedisUrl)?;
        let endpoint = Endpoint::of(&client)?;
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(LamportClock::new());
        let store = Store::new(
            client,
            StoreSettings {
                shards: config.stream_shards,
                history_size: config.history_size,
                history_ttl: config.history_ttl,
                presence_ttl: config.presence_ttl,
                timeout: config.backend_timeout,
                idempotency_window: config.idempotency_window,
                offset_block: config.offset_block,
            },
        )?;
        let history = History::new(
            config.database_url.as_deref(),
            config.backend_timeout,
            config.history_query_timeout,
        )?;
        let blocks = Blocks::new(history.pool_handle(), config.offset_block);
        let (pubsub, subscriber) = PubSub::new(
            endpoint,
            PubSubSettings {
                timeout: config.backend_timeout,
                ping_interval: config.pubsub_ping_interval,
            },
            metrics.clone(),
        );
        let delivery = Delivery::start(
            config.dispatchers(),
            Context {
                store: store.clone(),
                blocks: blocks.clone(),
                pubsub: pubsub.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
                keep_limit: config.outbound_queue as usize,
                linger: config.topic_linger,
            },
        );
        let names = Arc::new(KnownNames::default());
        let intake = Intake {
            delivery: delivery.clone(),
            names: names.clone(),
            store: store.clone(),
        };
        subscriber.spawn(Arc::new(intake), background.clone());
        Ok(Arc::new(Self {
            instance: config.instance(),
            auth: Authenticator::new(
                config.auth_mode,
                config.jwt_secret.as_deref(),
                config.jwt_leeway,
            )
            .with_api_key(config.api_key.clone()),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            user_connections: UserConnections::new(config.max_user_connections),
            config,
            store,
            history,
            blocks,
            delivery,
            pubsub,
            names,
            metrics,
            clock,
            connections: TaskTracker::new(),
            closing: CancellationToken::new(),
            draining: CancellationToken::new(),
            redis_up: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        }))
    }

    /// A new connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Records the outcome of the last Redis health check.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.store(up, Ordering::Release);
    }

    /// Whether the last Redis health check succeeded.
    pub fn is_redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }

    /// Ready: Redis reachable (commands and pub/sub) and not draining.
    pub fn is_ready(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
            && self.pubsub.is_connected()
            && !self.draining.is_cancelled()
    }

    /// Registers a channel name once (persisted the first time), created by
    /// `creator` within `MAX_CHANNELS` and `CHANNEL_CREATE_LIMIT`; returns
    /// whether it was new.
    pub async fn ensure_channel(&self, channel: &str, creator: &str) -> Result<bool, OpError> {
        if self.names.channels.contains(channel) {
            return Ok(false);
        }
        let config = &self.config;
        let limits = CreateLimits {
            max_total: config.max_channels,
            per_creator: config.channel_create_limit,
            window: config.channel_create_window,
        };
        let created = match self
            .store
            .register_limited(Registry::Channels, channel, Some((creator, limits)))
            .await?
        {
            Registration::Created => true,
            Registration::Existed => false,
            Registration::Full => {
                return Err(OpError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the cluster has {} channels, its limit (MAX_CHANNELS); use an existing channel",
                        config.max_channels
                    ),
                ));
            }
            Registration::QuotaSpent => {
                return Err(OpError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "you created {} channels in the last {:?} (CHANNEL_CREATE_LIMIT); retry later",
                        config.channel_create_limit, config.channel_create_window
                    ),
                ));
            }
        };
        self.names.channels.insert(channel);
        Ok(created)
    }

    /// Registers a user name once (persisted the first time).
    pub async fn ensure_user(&self, user: &str) -> Result<(), OpError> {
        if !self.names.users.contains(user) {
            self.store.register(Registry::Users, user).await?;
            self.names.users.insert(user);
        }
        Ok(())
    }

    /// Whether a user was ever registered.
    pub async fn user_exists(&self, user: &str) -> Result<bool, OpError> {
        if self.names.users.contains(user) {
            return Ok(true);
        }
        let exists = self.store.exists(Registry::Users, user).await?;
        if exists {
            self.names.users.insert(user);
        }
        Ok(exists)
    }

    /// Publishes a channel message from `user`; `clock` is the Lamport time
    /// of the request. With an idempotency `key`, a retry within the window
    /// returns the first call's result and stores nothing.
    pub async fn publish(
        &self,
        channel: &str,
        user: &str,
        text: String,
        clock: u64,
        key: Option<&str>,
    ) -> Result<PublishReply, OpError> {
        self.ensure_channel(channel, user).await?;
        let message = StoredMessage {
            channel: channel.to_owned(),
            msg_id: uuid::Uuid::new_v4(),
            user: user.to_owned(),
            text,
            ts: chrono::Utc::now().timestamp_millis(),
            clock,
        };
        let shards = self.config.stream_shards;
        let stream = StreamId::channel(channel);
        let append = Append {
            stream: &stream,
            payload: message.encode(),
            msg_id: message.msg_id,
            record: key.map(|key| keys::publish_record_key(channel, user, key, shards)),
        };
        let appended = self.append(&append).await?;
        if !appended.replayed {
            self.metrics.messages_in_total.inc();
        }
        Ok(PublishReply {
            channel: message.channel,
            offset: appended.offset,
            msg_id: appended.msg_id,
        })
    }

    /// Appends to a channel or inbox, with the latency and error metrics of a write.
    pub async fn append(&self, append: &Append<'_>) -> Result<Appended, OpError> {
        let started = Instant::now();
        let appended = epochs::append(&self.store, &self.blocks, &self.metrics, append)
            .await
            .map_err(|error| {
                self.metrics.redis_errors_total.inc();
                let error = OpError::from(error);
                if error.code == ErrorCode::UnknownOutcome {
                    self.metrics.unknown_outcomes_total.inc();
                }
                error
            })?;
        self.metrics
            .publish_latency
            .observe(started.elapsed().as_secs_f64());
        Ok(appended)
    }

    /// Announces a presence change (best effort: a failure is logged).
    pub async fn announce(&self, channel: &str, user: &str, event: PresenceChange) {
        let event = PresenceEvent {
            channel: channel.to_owned(),
            event,
            user: user.to_owned(),
            clock: self.clock.tick(None),
        };
        if let Err(error) = self.store.publish_presence(event).await {
            self.metrics.redis_errors_total.inc();
            tracing::warn!(%channel, %user, %error, "presence announcement failed");
        }
    }

    /// A page of a channel's history, complete up to now: the Redis history
    /// stream for the recent window, PostgreSQL below it (see [`pages`]).
    /// `not_found` for a channel that neither Redis nor PostgreSQL knows
    /// (PostgreSQL still has the history of a channel a wiped Redis forgot).
    pub async fn read_history(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelMessage>, OpError> {
        let known = self.store.exists(Registry::Channels, channel).await?;
        let page = self
            .store
            .read_page(&StreamId::channel(channel), before, u64::from(limit))
            .await?;
        let entries = page
            .entries
            .into_iter()
            .filter_map(|frame| match frame {
                ServerFrame::Message(message) => Some(message),
                _ => None,
            })
            .collect();
        let limit = limit as usize;
        let split = pages::split(entries, |m| m.offset, page.base, before, limit, |_| true);
        if split.complete {
            return Ok(pages::complete(split, Vec::new(), |m| m.offset, limit));
        }
        let stored = match self.history.page(channel, split.below, limit as u32).await {
            Ok(stored) => stored,
            Err(HistoryError::NotConfigured) => Vec::new(),
            Err(error) => return Err(error.into()),
        };
        let messages = pages::complete(split, stored, |m| m.offset, limit);
        if messages.is_empty() && !known {
            return Err(OpError::new(
                ErrorCode::NotFound,
                format!("no channel {channel:?}"),
            ));
        }
        Ok(messages)
    }
}

/// What the subscriber connection reads goes to the delivery core; after a
/// reconnect (Redis may have restarted empty) remembered names are forgotten
/// and the users connected here are registered again.
struct Intake {
    delivery: Delivery,
    names: Arc<KnownNames>,
    store: Store,
}

impl Inbound for Intake {
    fn message(&self, topic: &[u8], payload: Bytes) {
        self.delivery.message(topic, payload);
    }

    fn resubscribed(&self) {
        self.delivery.resubscribed();
        self.names.forget_all();
        let (delivery, names, store) = (
            self.delivery.clone(),
            self.names.clone(),
            self.store.clone(),
        );
        tokio::spawn(async move {
            for user in delivery.online_users().await {
                match store.register(Registry::Users, &user).await {
                    Ok(_) => names.users.insert(&user),
                    Err(error) => tracing::warn!(%user, %error, "could not register user again"),
                }
            }
        });
    }
}
