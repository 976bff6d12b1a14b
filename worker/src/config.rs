//! Command line and environment configuration.
//!
//! Every knob is a `--flag` and an environment variable with a default, parsed
//! once by `main` into [`Args`] and turned into the typed [`Config`] that
//! [`crate::run`] takes; nothing below reads the environment.

use std::net::SocketAddr;
use std::time::Duration;

/// How a batch of channel messages and direct messages is written.
///
/// Both are idempotent (`ON CONFLICT DO NOTHING`); they differ in speed only.
/// See `docs/worker.md` for the measured figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMode {
    /// One `INSERT ... SELECT FROM UNNEST($1::text[], ...)` per table: the rows
    /// travel as binary arrays in one statement.
    Unnest,
    /// `COPY` into a temporary staging table, then `INSERT ... SELECT` from it.
    Copy,
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The worker's command line; each flag also reads the environment variable shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chatcluster-worker",
    version,
    about = "Persists chatcluster's Redis persistence streams into PostgreSQL"
)]
pub struct Args {
    /// Redis holding the persistence streams.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// PostgreSQL to write to, e.g. postgres://chat:secret@db:5432/chat.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Consumer name in the `persist` group [default: the host name].
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,

    /// Most stream entries written in one PostgreSQL transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Longest time the first entry of a batch waits for the batch to fill (e.g. 250ms, 5s).
    #[arg(long, env = "BATCH_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub batch_timeout: Duration,

    /// Entries pending this long on another consumer are claimed (XAUTOCLAIM) by this one.
    #[arg(long, env = "CLAIM_IDLE", default_value = "30s", value_parser = parse_duration)]
    pub claim_idle: Duration,

    /// Number of persistence stream shards `cc:{sN}:persist` (must match the gateways).
    #[arg(long, env = "STREAM_SHARDS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub stream_shards: u32,

    /// Address of the admin HTTP server (/health, /ready, /metrics).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,

    /// Batches written to PostgreSQL at the same time, each on its own connection.
    #[arg(long, env = "WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub writers: u32,

    /// How batches are written to PostgreSQL.
    #[arg(long, env = "WRITE_MODE", value_enum, default_value_t = WriteMode::Unnest)]
    pub write_mode: WriteMode,

    /// On SIGTERM, longest time spent finishing the batches already read before exiting
    /// (what is left stays pending and is claimed by another worker).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log filter (tracing EnvFilter syntax), e.g. `info,chatcluster_worker=debug`.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Parses a human-friendly duration such as `250ms`, `5s` or `1m 30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write a duration such as 250ms, 5s or 1m)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

/// What [`crate::run`] needs, resolved from [`Args`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Redis URL.
    pub redis_url: String,
    /// PostgreSQL URL (contains the password: log [`redact_url`] of it only).
    pub database_url: String,
    /// Consumer name.
    pub worker_id: String,
    /// Most entries per batch.
    pub batch_size: usize,
    /// Longest wait of a batch's first entry.
    pub batch_timeout: Duration,
    /// Idle time after which another consumer's pending entries are claimed.
    pub claim_idle: Duration,
    /// Number of persistence shards.
    pub stream_shards: u32,
    /// Batches written at the same time.
    pub writers: usize,
    /// Write strategy.
    pub write_mode: WriteMode,
    /// Longest drain on shutdown.
    pub drain_timeout: Duration,
}

impl Config {
    /// A configuration with the documented defaults for the given backends.
    pub fn new(
        redis_url: impl Into<String>,
        database_url: impl Into<String>,
        worker_id: impl Into<String>,
    ) -> Self {
        Self {
            redis_url: redis_url.into(),
            database_url: database_url.into(),
            worker_id: worker_id.into(),
            batch_size: 100,
            batch_timeout: Duration::from_secs(5),
            claim_idle: Duration::from_secs(30),
            stream_shards: 4,
            writers: 2,
            write_mode: WriteMode::Unnest,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl Args {
    /// The typed configuration; `hostname` names the consumer when `WORKER_ID` is unset.
    pub fn into_config(self, hostname: impl FnOnce() -> String) -> Config {
        Config {
            redis_url: self.redis_url,
            database_url: self.database_url,
            worker_id: self
                .worker_id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(hostname),
            batch_size: self.batch_size as usize,
            batch_timeout: self.batch_timeout,
            claim_idle: self.claim_idle,
            stream_shards: self.stream_shards,
            writers: self.writers as usize,
            write_mode: self.write_mode,
            drain_timeout: self.drain_timeout,
        }
    }
}

/// A URL with its password replaced by `***`, safe to log.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_match_the_contract() {
        let args = Args::try_parse_from(["w", "--database-url", "postgres://x"]).unwrap();
        let config = args.clone().into_config(|| "host-1".to_owned());
        assert_eq!(args.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:9091");
        assert_eq!(config.worker_id, "host-1");
        assert_eq!(config.batch_size, 100);
        assert_eq!(config.batch_timeout, Duration::from_secs(5));
        assert_eq!(config.claim_idle, Duration::from_secs(30));
        assert_eq!(config.stream_shards, 4);
        assert_eq!(config.write_mode, WriteMode::Unnest);
    }

    #[test]
    fn flags_parse_durations_and_reject_nonsense() {
        let args = Args::try_parse_from([
            "w",
            "--database-url",
            "postgres://x",
            "--batch-timeout",
            "250ms",
            "--claim-idle",
            "1m",
            "--worker-id",
            "w-7",
            "--write-mode",
            "copy",
        ])
        .unwrap();
        assert_eq!(args.batch_timeout, Duration::from_millis(250));
        assert_eq!(args.claim_idle, Duration::from_secs(60));
        assert_eq!(args.write_mode, WriteMode::Copy);
        assert_eq!(args.into_config(|| unreachable!()).worker_id, "w-7");
        for bad in [
            ["--batch-timeout", "soon"],
            ["--batch-timeout", "0s"],
            ["--batch-size", "0"],
            ["--stream-shards", "0"],
        ] {
            let mut argv = vec!["w", "--database-url", "postgres://x"];
            argv.extend(bad);
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
        assert!(
            Args::try_parse_from(["w"]).is_err(),
            "DATABASE_URL is required"
        );
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact_url("postgres://chat:s3cr@t@db:5432/chat"),
            "postgres://chat:***@db:5432/chat"
        );
        assert_eq!(
            redact_url("postgres://chat@db/chat"),
            "postgres://chat@db/chat"
        );
        assert_eq!(
            redact_url("redis://:pw@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
