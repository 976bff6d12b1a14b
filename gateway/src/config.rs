//! Command-line flags and environment variables, parsed once in `main`.
//!
//! Secrets (JWT secret, API key) and URLs that may carry passwords are held in
//! [`Secret`] and [`SecretUrl`], so `{:?}` of the configuration (and of
//! everything that contains it) never prints them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::secret::{Secret, SecretUrl};

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Clients name themselves with `login` (development).
    None,
    /// Clients present an HS256 JWT; `sub` is the user.
    Jwt,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses durations such as `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 250ms, 5s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Gateway configuration. Every flag also reads the environment variable named.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chatcluster-gateway",
    version,
    about = "chatcluster WebSocket gateway"
)]
pub struct Config {
    /// Unix socket to listen on (mode 0660; a stale file is removed at start).
    #[arg(long, env = "SOCKET_PATH")]
    pub socket_path: Option<PathBuf>,
    /// TCP address to listen on when no socket path is set.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// Extra TCP address serving only /health, /ready and /metrics (for probes and scraping).
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Redis URL.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: SecretUrl,
    /// PostgreSQL URL: history and conversations older than Redis keeps, and
    /// the offset blocks that keep offsets from ever being reused. Required
    /// unless --ephemeral.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretUrl>,
    /// Run without PostgreSQL (development and tests only): history is what
    /// Redis keeps, and after Redis loses its state offsets continue only above
    /// what Redis still has, so they may repeat offsets a worker stored.
    #[arg(long, env = "EPHEMERAL", default_value_t = false)]
    pub ephemeral: bool,
    /// How long the first result of a publish or direct message with an
    /// `idempotency_key` is kept: a retry with the same key within it returns
    /// that result and stores nothing (about 150 bytes of Redis per keyed message).
    #[arg(long, env = "IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub idempotency_window: Duration,
    /// Offsets of a channel or inbox reserved in PostgreSQL at a time (the
    /// next block is reserved when half is left; a new epoch may skip up to
    /// this many offsets).
    #[arg(long, env = "OFFSET_BLOCK", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=1_000_000_000))]
    pub offset_block: u64,
    /// Name of this gateway process in logs and presence members (default: host name and pid).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Authentication mode.
    #[arg(long, env = "AUTH_MODE", value_enum, default_value = "none")]
    pub auth_mode: AuthMode,
    /// HS256 secret for `AUTH_MODE=jwt`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Clock skew tolerated when checking a JWT's `exp` and `nbf`; a session is
    /// closed (4001) this long after its token's `exp`.
    #[arg(long, env = "JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,
    /// Bearer key of the HTTP API: required by `POST /api/channels/{channel}/messages`
    /// (unset disables it) and accepted by the read routes in JWT mode.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Number of persistence-stream shards (must match the worker).
    #[arg(long, env = "STREAM_SHARDS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub stream_shards: u32,
    /// Messages kept per channel in the Redis history stream (recovery window).
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub history_size: u64,
    /// How long an idle channel's history and epoch live in Redis.
    #[arg(long, env = "HISTORY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// Largest message text in bytes.
    #[arg(long, env = "MAX_TEXT_BYTES", default_value_t = chatcluster_protocol::validate::DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
    /// Largest WebSocket frame in bytes; a larger one closes the connection (1009).
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = chatcluster_protocol::validate::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Sustained publishes (and direct messages) per second per connection.
    #[arg(long, env = "PUBLISH_RATE", default_value_t = 100.0)]
    pub publish_rate: f64,
    /// Publish burst allowed above the sustained rate.
    #[arg(long, env = "PUBLISH_BURST", default_value_t = 200.0)]
    pub publish_burst: f64,
    /// Cost units per second of one connection's op budget (ping 1, presence 2,
    /// login, refresh and unsubscribe 5, subscribe, channel, users, channels and
    /// history 10; publish and message use the message rate instead). An op
    /// waits up to OP_WAIT for the budget, else gets `rate_limited`; a client
    /// that keeps sending is read no faster than the budget refills.
    #[arg(long, env = "OP_RATE", default_value_t = 200.0)]
    pub op_rate: f64,
    /// Cost units one connection may spend at once above the op rate.
    #[arg(long, env = "OP_BURST", default_value_t = 400.0)]
    pub op_burst: f64,
    /// Longest an op waits for the op budget to refill (the connection is not
    /// read meanwhile); an op that would wait longer gets `rate_limited`.
    #[arg(long, env = "OP_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub op_wait: Duration,
    /// Connections one user may hold open on this process (more: HTTP 429 at the
    /// upgrade in JWT mode, `limit_exceeded` at `login`); 0 means no limit.
    #[arg(long, env = "MAX_USER_CONNECTIONS", default_value_t = 100)]
    pub max_user_connections: u32,
    /// Channels that may exist in the whole cluster (creating more: `limit_exceeded`); 0 means no limit.
    #[arg(long, env = "MAX_CHANNELS", default_value_t = 100_000)]
    pub max_channels: u64,
    /// Channels one user may create per CHANNEL_CREATE_WINDOW, cluster-wide
    /// (more: `rate_limited`); 0 means no limit.
    #[arg(long, env = "CHANNEL_CREATE_LIMIT", default_value_t = 100)]
    pub channel_create_limit: u64,
    /// The window of CHANNEL_CREATE_LIMIT.
    #[arg(long, env = "CHANNEL_CREATE_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub channel_create_window: Duration,
    /// Largest page of `users`, `channels` and `GET /api/channels` (the default page is 100 or this, if smaller).
    #[arg(long, env = "MAX_LIST_PAGE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_list_page: u32,
    /// PostgreSQL `statement_timeout` of history reads (a slower query is
    /// cancelled and answered `unavailable`).
    #[arg(long, env = "HISTORY_QUERY_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub history_query_timeout: Duration,
    /// Frames queued for one connection before it counts as a slow reader and is closed (1008).
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub outbound_queue: u32,
    /// Longest spacing of two writes to one connection. The spacing grows with
    /// the frames the connection receives (this value at 1,000 frames/s and
    /// above, proportionally less below): frames queued meanwhile leave together
    /// in one vectored write, while a quiet connection writes at once. Cuts
    /// syscalls at high fan-out, here and in HAProxy, for at most this much added
    /// latency. `0s` writes every wake-up at once.
    #[arg(long, env = "WRITE_COALESCE", default_value = "20ms", value_parser = parse_duration)]
    pub write_coalesce: Duration,
    /// Dispatcher tasks of the delivery core (topics are spread over them by
    /// hash); 0 means one per available CPU.
    #[arg(long, env = "DISPATCHERS", default_value_t = 0)]
    pub dispatchers: usize,
    /// How long a topic stays subscribed after its last local subscriber left
    /// (absorbs reconnect storms and subscribe/unsubscribe churn).
    #[arg(long, env = "TOPIC_LINGER", default_value = "5s", value_parser = parse_duration)]
    pub topic_linger: Duration,
    /// How often the pub/sub connection is checked with a PING; no answer
    /// within BACKEND_TIMEOUT reconnects it (and /ready fails until every topic
    /// is subscribed again).
    #[arg(long, env = "PUBSUB_PING_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub pubsub_ping_interval: Duration,
    /// Open WebSocket connections this process accepts.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 20000)]
    pub max_connections: usize,
    /// Channels one connection may subscribe to.
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = 256)]
    pub max_subscriptions: usize,
    /// Consecutive malformed frames tolerated before the connection is closed (1008).
    #[arg(long, env = "MAX_BAD_FRAMES", default_value_t = 20)]
    pub max_bad_frames: u32,
    /// Interval of server pings.
    #[arg(long, env = "PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A client silent this long is closed.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Lifetime of a presence entry; refreshed at a third of it.
    #[arg(long, env = "PRESENCE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub presence_ttl: Duration,
    /// After SIGTERM, how long open connections may stay before they are closed with 1001.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Log format (filter with RUST_LOG, default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Timeout of one Redis or PostgreSQL request.
    #[arg(long, env = "BACKEND_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
}

impl Config {
    /// The instance id, defaulting to `<hostname>-<pid>`.
    pub fn instance(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "gateway".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// Dispatcher tasks to run.
    pub fn dispatchers(&self) -> usize {
        if self.dispatchers > 0 {
            return self.dispatchers;
        }
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// Checks combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.auth_mode == AuthMode::Jwt && self.jwt_secret.as_deref().is_none_or(str::is_empty) {
            return Err("--auth-mode jwt needs --jwt-secret (JWT_SECRET)".into());
        }
        if !(self.publish_rate > 0.0 && self.publish_burst >= 1.0) {
            return Err("--publish-rate must be > 0 and --publish-burst >= 1".into());
        }
        if !(self.op_rate > 0.0 && self.op_burst >= crate::budget::MAX_COST) {
            return Err(format!(
                "--op-rate must be > 0 and --op-burst >= {} (the costliest op)",
                crate::budget::MAX_COST
            ));
        }
        if self.channel_create_limit > 0 && self.channel_create_window.as_secs() == 0 {
            return Err("--channel-create-window must be at least 1s".into());
        }
        if self.history_query_timeout.is_zero() {
            return Err("--history-query-timeout must be above 0".into());
        }
        if self.max_text_bytes + 512 > self.max_frame_bytes {
            return Err("--max-frame-bytes must exceed --max-text-bytes by at least 512".into());
        }
        if self.database_url.is_none() && !self.ephemeral {
            return Err("--database-url (DATABASE_URL) is required: offsets must stay above \
                 those PostgreSQL has when Redis loses its state; pass --ephemeral (EPHEMERAL=true) \
                 to run without a database"
                .into());
        }
        if self.idempotency_window.is_zero() {
            return Err("--idempotency-window must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn jwt_needs_a_secret() {
        let config = Config::parse_from(["gw", "--ephemeral", "--auth-mode", "jwt"]);
        assert!(config.validate().unwrap_err().contains("JWT_SECRET"));
        let config = Config::parse_from([
            "gw",
            "--ephemeral",
            "--auth-mode",
            "jwt",
            "--jwt-secret",
            "s",
        ]);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn defaults_are_sane() {
        let config = Config::parse_from(["gw", "--database-url", "postgres://db/chat"]);
        assert_eq!(config.stream_shards, 4);
        assert_eq!(config.offset_block, 1000);
        assert_eq!(config.idempotency_window, Duration::from_secs(600));
        assert_eq!(config.validate(), Ok(()));
        assert!(Config::try_parse_from(["gw", "--stream-shards", "0"]).is_err());
        assert!(Config::try_parse_from(["gw", "--max-list-page", "0"]).is_err());
        let config = Config::parse_from(["gw", "--ephemeral", "--op-burst", "1"]);
        assert!(config.validate().unwrap_err().contains("--op-burst"));
        assert!(Config::try_parse_from(["gw", "--offset-block", "99"]).is_err());
    }

    #[test]
    fn a_database_is_required_unless_ephemeral() {
        let error = Config::parse_from(["gw"]).validate().unwrap_err();
        assert!(
            error.contains("DATABASE_URL") && error.contains("--ephemeral"),
            "{error}"
        );
        assert_eq!(Config::parse_from(["gw", "--ephemeral"]).validate(), Ok(()));
    }
}
