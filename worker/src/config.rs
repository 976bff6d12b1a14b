//! Command line and environment configuration.
//!
//! Every knob is a `--flag` and an environment variable with a default, parsed
//! once by `main` into [`Cli`] and turned into the typed [`Config`] that
//! [`crate::run`] takes; nothing below reads the environment.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::Rows;
use crate::dead_letters::Cause;

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

/// The worker's command line: without a subcommand it runs the worker; each
/// flag also reads the environment variable shown.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "chatcluster-worker",
    version,
    about = "Persists chatcluster's Redis persistence streams into PostgreSQL",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A tool instead of the worker.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The worker's settings.
    #[command(flatten)]
    pub run: Args,
}

/// Subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Inspect or replay dead letters (entries the worker did not write).
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

/// `dead-letters` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// Print dead letters, oldest first: `<shard>/<id>`, cause, what the entry holds, why.
    List(ListArgs),
    /// Append dead letters' original entries to their persistence stream again and
    /// delete the letters (fix the cause first: an entry that fails again comes back).
    Replay(ReplayArgs),
}

/// Where the dead letters are.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Redis holding the persistence and dead-letter streams.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Number of persistence stream shards (as the worker's STREAM_SHARDS).
    #[arg(long, env = "STREAM_SHARDS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub stream_shards: u32,

    /// Only this shard.
    #[arg(long)]
    pub shard: Option<u32>,

    /// Only letters of this cause.
    #[arg(long, value_enum)]
    pub cause: Option<Cause>,
}

/// `dead-letters list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Where and which.
    #[command(flatten)]
    pub streams: StreamArgs,

    /// Most letters printed.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,

    /// One JSON object per line (with every original field) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dead-letters replay`.
#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
pub struct ReplayArgs {
    /// Where and which (with --all).
    #[command(flatten)]
    pub streams: StreamArgs,

    /// A letter to replay, `<shard>/<id>` as `list` prints it (repeatable).
    #[arg(long)]
    pub id: Vec<String>,

    /// Every letter present now (of --shard and --cause when given).
    #[arg(long)]
    pub all: bool,
}

/// The worker's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Redis holding the persistence streams.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// PostgreSQL to write to, e.g. postgres://chat:secret@db:5432/chat.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, required = true)]
    pub database_url: Option<String>,

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

    /// Deliveries of one entry without an acknowledgement (crashes, timeouts) before it is
    /// moved to the dead letters instead of being tried again (at least 3: an entry that
    /// was only in the same batch as a crashing one is delivered up to 3 times).
    #[arg(long, env = "MAX_DELIVERIES", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(3..=1000))]
    pub max_deliveries: u64,

    /// Most entries kept in each shard's dead-letter stream `cc:{sN}:dead` (the oldest go first).
    #[arg(long, env = "DEAD_LETTER_MAXLEN", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub dead_letter_maxlen: u64,

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
    /// Deliveries before an unacknowledged entry becomes a dead letter.
    pub max_deliveries: u64,
    /// Most entries per dead-letter stream.
    pub dead_letter_maxlen: u64,
    /// Test hooks (none in production).
    pub hooks: Hooks,
}

/// Called before every write of rows to PostgreSQL.
pub type BeforeWrite = Arc<dyn Fn(&Rows) + Send + Sync>;

/// Points where tests step into the pipeline, e.g. to make a writer panic on
/// a chosen message and drive crash loops deterministically.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Runs in the writer task before each write attempt.
    pub before_write: Option<BeforeWrite>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("before_write", &self.before_write.is_some())
            .finish()
    }
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
            max_deliveries: 5,
            dead_letter_maxlen: 10_000,
            hooks: Hooks::default(),
        }
    }
}

impl Args {
    /// The typed configuration; `hostname` names the consumer when `WORKER_ID`
    /// is unset. `None` without a database URL (only possible with a subcommand).
    pub fn into_config(self, hostname: impl FnOnce() -> String) -> Option<Config> {
        Some(Config {
            redis_url: self.redis_url,
            database_url: self.database_url?,
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
            max_deliveries: self.max_deliveries,
            dead_letter_maxlen: self.dead_letter_maxlen,
            hooks: Hooks::default(),
        })
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

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(argv).map(|cli| cli.run)
    }

    #[test]
    fn defaults_match_the_contract() {
        let args = parse(&["w", "--database-url", "postgres://x"]).unwrap();
        let config = args.clone().into_config(|| "host-1".to_owned()).unwrap();
        assert_eq!(args.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:9091");
        assert_eq!(config.worker_id, "host-1");
        assert_eq!(config.batch_size, 100);
        assert_eq!(config.batch_timeout, Duration::from_secs(5));
        assert_eq!(config.claim_idle, Duration::from_secs(30));
        assert_eq!(config.stream_shards, 4);
        assert_eq!(config.write_mode, WriteMode::Unnest);
        assert_eq!(config.max_deliveries, 5);
        assert_eq!(config.dead_letter_maxlen, 10_000);
    }

    #[test]
    fn flags_parse_durations_and_reject_nonsense() {
        let args = parse(&[
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
            "--max-deliveries",
            "7",
            "--dead-letter-maxlen",
            "50",
        ])
        .unwrap();
        assert_eq!(args.batch_timeout, Duration::from_millis(250));
        assert_eq!(args.claim_idle, Duration::from_secs(60));
        assert_eq!(args.write_mode, WriteMode::Copy);
        let config = args.into_config(|| unreachable!()).unwrap();
        assert_eq!(config.worker_id, "w-7");
        assert_eq!((config.max_deliveries, config.dead_letter_maxlen), (7, 50));
        for bad in [
            ["--batch-timeout", "soon"],
            ["--batch-timeout", "0s"],
            ["--batch-size", "0"],
            ["--stream-shards", "0"],
            ["--max-deliveries", "2"],
            ["--dead-letter-maxlen", "0"],
        ] {
            let mut argv = vec!["w", "--database-url", "postgres://x"];
            argv.extend(bad);
            assert!(parse(&argv).is_err(), "{bad:?} accepted");
        }
        let missing = parse(&["w"]).unwrap_err().to_string();
        assert!(missing.contains("--database-url"), "{missing}");
    }

    #[test]
    fn dead_letter_commands_need_no_database() {
        let cli = Cli::try_parse_from([
            "w",
            "dead-letters",
            "list",
            "--cause",
            "offset_clash",
            "--json",
        ])
        .unwrap();
        let Some(Command::DeadLetters(DeadLettersCommand::List(list))) = cli.command else {
            panic!("not a list: {cli:?}");
        };
        assert_eq!(list.streams.cause, Some(Cause::OffsetClash));
        assert!(list.json && list.limit == 100 && list.streams.shard.is_none());
        let cli = Cli::try_parse_from([
            "w",
            "dead-letters",
            "replay",
            "--id",
            "1/5-0",
            "--id",
            "2/6-0",
        ])
        .unwrap();
        let Some(Command::DeadLetters(DeadLettersCommand::Replay(replay))) = cli.command else {
            panic!("not a replay: {cli:?}");
        };
        assert_eq!(replay.id, ["1/5-0", "2/6-0"]);
        assert!(
            Cli::try_parse_from(["w", "dead-letters", "replay"]).is_err(),
            "replay needs --id or --all"
        );
        assert!(
            Cli::try_parse_from(["w", "dead-letters", "replay", "--all", "--id", "1/5-0"]).is_err()
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
