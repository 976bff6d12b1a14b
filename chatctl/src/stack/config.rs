//! `chatctl up`'s options: the stack's shape, ports and where its state lives.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

use super::redis::Fsync;

/// How clients authenticate to the gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// Clients name themselves with `login` (development).
    None,
    /// Clients present an HS256 token; `chatctl token` mints one from the stack's secret.
    Jwt,
}

impl Auth {
    /// The gateway's `AUTH_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Jwt => "jwt",
        }
    }
}

/// The local stack: Redis, PostgreSQL, workers, gateways on Unix sockets, HAProxy.
#[derive(Debug, Clone, Args)]
pub struct StackConfig {
    /// State directory: data, sockets, secrets, logs
    /// [default: ~/.local/share/chatcluster; /var/lib/chatcluster for root].
    #[arg(long, env = "CHATCTL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Gateway processes, each on its own Unix socket behind HAProxy.
    #[arg(long, env = "CHATCTL_GATEWAYS", default_value_t = 2)]
    pub gateways: usize,
    /// Worker processes (Redis Streams → PostgreSQL).
    #[arg(long, env = "CHATCTL_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Run without PostgreSQL and workers (`history` then answers `unavailable`).
    #[arg(long, env = "CHATCTL_NO_POSTGRES")]
    pub no_postgres: bool,
    /// HAProxy's WebSocket and web page port on 127.0.0.1; 0 for any free port
    /// [default: 8080 if free, else any free port].
    #[arg(long, env = "CHATCTL_PORT")]
    pub port: Option<u16>,
    /// HAProxy's stats and Prometheus port; 0 for any free port [default: 8404 if free, else
    /// any free port].
    #[arg(long, env = "CHATCTL_STATS_PORT")]
    pub stats_port: Option<u16>,
    /// Redis's port [default: a free port].
    #[arg(long, env = "CHATCTL_REDIS_PORT")]
    pub redis_port: Option<u16>,
    /// PostgreSQL's port [default: a free port].
    #[arg(long, env = "CHATCTL_POSTGRES_PORT")]
    pub postgres_port: Option<u16>,
    /// Client authentication of the gateways.
    #[arg(long, env = "CHATCTL_AUTH", value_enum, default_value_t = Auth::None)]
    pub auth: Auth,
    /// Redis append-only file fsync policy.
    #[arg(long, env = "CHATCTL_REDIS_FSYNC", value_enum, default_value_t = Fsync::Always)]
    pub redis_fsync: Fsync,
    /// Directory of chatcluster-gateway and chatcluster-worker [default: beside chatctl, else PATH].
    #[arg(long, env = "CHATCTL_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Directory of PostgreSQL's postgres, initdb and pg_isready
    /// [default: /usr/lib/postgresql/<newest>/bin, else beside `postgres` on PATH].
    #[arg(long, env = "CHATCTL_POSTGRES_BIN_DIR")]
    pub postgres_bin_dir: Option<PathBuf>,
    /// When chatctl runs as root: the unprivileged user PostgreSQL runs as.
    #[arg(long, env = "CHATCTL_POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,
    /// On stop, how long gateways let open connections stay before closing them (1001).
    #[arg(long, env = "CHATCTL_DRAIN_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Extra argument for every gateway, e.g. `--gateway-arg=--write-delay=1ms` (repeat the
    /// flag, or give several separated by spaces in the variable). Every gateway variable in
    /// chatctl's environment (WRITE_DELAY, API_KEY, ...) reaches the gateways too.
    #[arg(
        long = "gateway-arg",
        env = "CHATCTL_GATEWAY_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub gateway_args: Vec<String>,
    /// Extra argument for every worker, e.g. `--worker-arg=--batch-size=1000`.
    #[arg(
        long = "worker-arg",
        env = "CHATCTL_WORKER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub worker_args: Vec<String>,
    /// Log every HAProxy connection to its log file.
    #[arg(long, env = "CHATCTL_HAPROXY_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub haproxy_log: bool,
}

#[derive(Parser)]
struct Standalone {
    #[command(flatten)]
    config: StackConfig,
}

impl StackConfig {
    /// A configuration from `up`-style arguments, with every other option at its default
    /// (the benchmarks start their stacks through this, so the defaults live in one place).
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("chatctl-up"))
            .chain(args.into_iter().map(Into::into));
        Standalone::try_parse_from(argv).map(|s| s.config)
    }

    /// The state directory in use.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(super::layout::default_state_dir)
    }

    /// Whether PostgreSQL (and so workers) run.
    pub fn with_postgres(&self) -> bool {
        !self.no_postgres
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let config = StackConfig::from_args(["--gateways", "3", "--gateway-arg=--write-delay=1ms"])
            .expect("parse");
        assert_eq!(config.gateways, 3);
        assert_eq!(config.workers, 1);
        assert_eq!(config.redis_fsync, Fsync::Always);
        assert_eq!(config.gateway_args, ["--write-delay=1ms"]);
        assert_eq!(config.drain_timeout, Duration::from_secs(3));
        assert!(config.with_postgres());
        let err = StackConfig::from_args(["--redis-fsync", "never"]).expect_err("bad value");
        assert!(err.to_string().contains("--redis-fsync"), "{err}");
    }
}
