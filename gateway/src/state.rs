//! The state one gateway process shares between its connections, and the
//! operations both the WebSocket and the HTTP API perform.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use chatcluster_protocol::LamportClock;
use chatcluster_protocol::entry::StoredMessage;
use chatcluster_protocol::frame::{ErrorCode, PresenceChange, PresenceEvent, PublishReply};
use chatcluster_protocol::validate::ValidationError;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::history::{History, HistoryError};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::server::ServeError;
use crate::store::{Position, Registry, Store, StoreError, StoreSettings};
use crate::topics::{TopicError, Topics};

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

impl From<TopicError> for OpError {
    fn from(error: TopicError) -> Self {
        tracing::warn!(%error, "pub/sub request failed");
        Self::new(
            ErrorCode::Unavailable,
            "message store unavailable, retry later",
        )
    }
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
    /// Local routing.
    pub hub: Arc<Hub>,
    /// Pub/sub subscriptions.
    pub topics: Topics,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Lamport clock.
    pub clock: Arc<LamportClock>,
    /// Token checks.
    pub auth: Authenticator,
    /// Open connection slots.
    pub connection_slots: Arc<Semaphore>,
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
    /// Builds the shared state from the configuration and starts the pub/sub
    /// task, which stops when `background` is cancelled.
    pub fn start(config: Config, background: &CancellationToken) -> Result<Arc<Self>, ServeError> {
        config.validate().map_err(ServeError::Config)?;
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(ServeError::RedisUrl)?;
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(LamportClock::new());
        let store = Store::new(
            client.clone(),
            StoreSettings {
                shards: config.stream_shards,
                history_size: config.history_size,
                history_ttl: config.history_ttl,
                presence_ttl: config.presence_ttl,
                timeout: config.backend_timeout,
            },
        )?;
        let history = History::new(config.database_url.as_deref(), config.backend_timeout)?;
        let hub = Arc::new(Hub::new(store.clone(), clock.clone(), metrics.clone()));
        let topics = Topics::start(
            client,
            hub.clone(),
            metrics.clone(),
            config.backend_timeout,
            background.clone(),
        );
        Ok(Arc::new(Self {
            instance: config.instance(),
            auth: Authenticator::new(config.auth_mode, config.jwt_secret.as_deref()),
            connection_slots: Arc::new(Semaphore::new(config.max_connections)),
            config,
            store,
            history,
            hub,
            topics,
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

    /// Ready: Redis reachable (commands and pub/sub) and not draining.
    pub fn is_ready(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
            && self.topics.is_connected()
            && !self.draining.is_cancelled()
    }

    /// Registers a channel name once (persisted the first time); returns whether it was new.
    pub async fn ensure_channel(&self, channel: &str) -> Result<bool, OpError> {
        if self.hub.names.channels.contains(channel) {
            return Ok(false);
        }
        let created = self.store.register(Registry::Channels, channel).await?;
        self.hub.names.channels.insert(channel);
        Ok(created)
    }

    /// Registers a user name once (persisted the first time).
    pub async fn ensure_user(&self, user: &str) -> Result<(), OpError> {
        if !self.hub.names.users.contains(user) {
            self.store.register(Registry::Users, user).await?;
            self.hub.names.users.insert(user);
        }
        Ok(())
    }

    /// Whether a user was ever registered.
    pub async fn user_exists(&self, user: &str) -> Result<bool, OpError> {
        if self.hub.names.users.contains(user) {
            return Ok(true);
        }
        let exists = self.store.exists(Registry::Users, user).await?;
        if exists {
            self.hub.names.users.insert(user);
        }
        Ok(exists)
    }

    /// The channel's position, starting its epoch after the highest offset in
    /// PostgreSQL when Redis has none.
    pub async fn position(&self, channel: &str) -> Result<Position, OpError> {
        if let Some(position) = self.store.position(channel).await? {
            return Ok(position);
        }
        self.start_epoch(channel).await
    }

    async fn start_epoch(&self, channel: &str) -> Result<Position, OpError> {
        // A new epoch may mean Redis lost everything: register the name again.
        self.store.register(Registry::Channels, channel).await?;
        let floor = self.history.max_offset(channel).await?;
        let position = self.store.init_channel(channel, floor).await?;
        tracing::info!(%channel, epoch = %position.epoch, floor, "channel epoch started");
        Ok(position)
    }

    /// Publishes a channel message from `user`; `clock` is the Lamport time of the request.
    pub async fn publish(
        &self,
        channel: &str,
        user: &str,
        text: String,
        clock: u64,
    ) -> Result<PublishReply, OpError> {
        self.ensure_channel(channel).await?;
        let message = StoredMessage {
            channel: channel.to_owned(),
            msg_id: uuid::Uuid::new_v4(),
            user: user.to_owned(),
            text,
            ts: chrono::Utc::now().timestamp_millis(),
            clock,
        };
        let started = Instant::now();
        let result = match self.store.publish(&message).await {
            Err(StoreError::NoEpoch) => {
                self.start_epoch(channel).await?;
                self.store.publish(&message).await
            }
            other => other,
        };
        let (offset, _epoch) = result.inspect_err(|_| {
            self.metrics.redis_errors_total.inc();
        })?;
        self.metrics
            .publish_latency
            .observe(started.elapsed().as_secs_f64());
        self.metrics.messages_in_total.inc();
        Ok(PublishReply {
            channel: message.channel,
            offset,
            msg_id: message.msg_id,
        })
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
}
