//! `chatctl bench`: load generation against a stack the benchmark starts (through `chatctl
//! up`'s code, in a temporary state directory) or a running one.
//!
//! * [`load`]: the channel-load engine of `fanout`, `rooms` and `latency`;
//! * [`connections`]: many idle connections: connect rate and memory per connection;
//! * [`persist`]: Redis Streams → worker → PostgreSQL throughput and lag;
//! * [`push`], [`histogram`], [`procs`], [`progress`]: the measuring parts;
//! * [`report`]: the summary table and `--json`.

pub mod connections;
pub mod histogram;
pub mod load;
pub mod persist;
pub mod procs;
pub mod progress;
pub mod push;
pub mod report;
pub mod scenarios;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::client::{Target, Wire};
use crate::limits::{self, FileLimit};
use crate::stack::redis::Fsync;
use crate::stack::{
    Layout, ShutdownReport, Stack, StackConfig, StackError, StackInfo, child::Role,
};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The stack to measure could not be started.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// Not enough open files.
    #[error(transparent)]
    Limit(#[from] limits::LimitError),
    /// Connections failed.
    #[error("{0}")]
    Connect(String),
    /// Options that do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// The persistence benchmark's Redis or PostgreSQL access failed.
    #[error("{what}: {message}")]
    Backend {
        /// What was being done.
        what: String,
        /// The error.
        message: String,
    },
}

/// Which stack to measure, and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Measure the stack at this WebSocket URL (HAProxy or one gateway) instead of starting one.
    #[arg(long, env = "CHATCTL_BENCH_URL")]
    pub url: Option<String>,
    /// Measure the stack `chatctl up` runs in this state directory (its HAProxy, gateway
    /// sockets and processes).
    #[arg(long, env = "CHATCTL_BENCH_STACK", conflicts_with = "url")]
    pub stack: Option<PathBuf>,
    /// With --url: a server process to measure, as NAME=PID (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Gateway processes of the stack the benchmark starts.
    #[arg(long, env = "CHATCTL_BENCH_GATEWAYS", default_value_t = 2)]
    pub gateways: usize,
    /// Extra argument for the gateways of the stack the benchmark starts (repeatable), e.g.
    /// `--gateway-arg=--write-delay=1ms`. Their publish rate limit is lifted unless given.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Redis append-only fsync policy of the stack the benchmark starts.
    #[arg(long, env = "CHATCTL_BENCH_REDIS_FSYNC", value_enum, default_value_t = Fsync::Always)]
    pub redis_fsync: Fsync,
    /// Connect subscribers straight to the gateways' Unix sockets, bypassing HAProxy.
    #[arg(long)]
    pub direct: bool,
    /// Loopback source addresses (127.0.0.2, 127.0.0.3, ...) that TCP connections are spread
    /// over, so more than the ~28,000 ephemeral ports of one address can be used.
    #[arg(long, env = "CHATCTL_BENCH_SOURCE_ADDRS", default_value_t = 4)]
    pub source_addrs: u8,
    /// Frame encoding of subscribers and publishers.
    #[arg(long, env = "CHATCTL_BENCH_ENCODING", value_enum, default_value_t = Wire::Json)]
    pub encoding: Wire,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_pid(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or("expected NAME=PID, e.g. haproxy=1234")?;
    let pid = pid.parse().map_err(|_| format!("{pid:?} is not a pid"))?;
    Ok((name.to_owned(), pid))
}

impl TargetArgs {
    /// The loopback source addresses to use.
    pub fn sources(&self) -> Vec<IpAddr> {
        (0..self.source_addrs)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
            .collect()
    }
}

/// A stack the benchmark started, stopped by [`Setup::finish`].
#[derive(Debug)]
struct OwnStack {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<ShutdownReport>,
    _dir: tempfile::TempDir,
}

/// Describes the stack measured, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct SetupInfo {
    /// `started by the benchmark`, `chatctl up in <dir>`, or `--url`.
    pub stack: String,
    /// Gateway processes (when known).
    pub gateways: Option<usize>,
    /// Redis fsync policy (when the benchmark started the stack).
    pub redis_fsync: Option<Fsync>,
    /// Extra gateway arguments (when the benchmark started the stack).
    pub gateway_args: Vec<String>,
    /// The load generator's open-file limits.
    pub file_limit: FileLimit,
    /// HAProxy's `maxconn` (when the benchmark started the stack).
    pub haproxy_max_conn: Option<u32>,
    /// The server processes' soft open-file limits, by name.
    pub server_file_limits: Vec<(String, u64)>,
}

impl SetupInfo {
    fn new(stack: String) -> Self {
        Self {
            stack,
            gateways: None,
            redis_fsync: None,
            gateway_args: Vec::new(),
            file_limit: limits::raise(),
            haproxy_max_conn: None,
            server_file_limits: Vec::new(),
        }
    }
}

/// The stack under measurement: where to connect and which processes to watch.
#[derive(Debug)]
pub struct Setup {
    /// HAProxy's (or `--url`'s) WebSocket target; none for a stack without gateways.
    pub front: Option<Target>,
    /// Each gateway's Unix socket, when known.
    pub sockets: Vec<Target>,
    /// Server processes (name, pid).
    pub servers: Vec<(String, u32)>,
    /// The stack's state, when it is a `chatctl` stack.
    pub info: Option<StackInfo>,
    /// JWT secret when the stack wants tokens.
    pub jwt_secret: Option<String>,
    /// For the report.
    pub about: SetupInfo,
    own: Option<OwnStack>,
}

/// Options that lift a local stack's limits for load generation, unless the user set them.
fn bench_gateway_args(user: &[String]) -> Vec<String> {
    let mut args = user.to_vec();
    for (flag, value) in [
        ("--publish-rate", "1000000"),
        ("--publish-burst", "1000000"),
    ] {
        if !user.iter().any(|a| a.starts_with(flag)) {
            args.push(format!("{flag}={value}"));
        }
    }
    args
}

/// The shape of a stack a benchmark starts.
#[derive(Debug, Clone)]
pub struct StackRequest {
    /// Gateway processes (and HAProxy when above 0).
    pub gateways: usize,
    /// Worker processes.
    pub workers: usize,
    /// Whether PostgreSQL runs.
    pub postgres: bool,
    /// Redis fsync policy.
    pub redis_fsync: Fsync,
    /// Extra gateway arguments (the publish rate limit is lifted unless given).
    pub gateway_args: Vec<String>,
}

impl Setup {
    /// Starts a stack (with PostgreSQL and `workers` workers if `postgres`) unless the
    /// arguments name one; raises the open-file limit.
    pub async fn prepare(
        args: &TargetArgs,
        postgres: bool,
        workers: usize,
    ) -> Result<Setup, BenchError> {
        if let Some(url) = &args.url {
            let mut about = SetupInfo::new(format!("--url {url}"));
            about.gateways = None;
            return Ok(Setup {
                front: Some(Target::parse(url).map_err(|e| BenchError::Invalid(e.to_string()))?),
                sockets: Vec::new(),
                servers: args.pids.clone(),
                info: None,
                jwt_secret: None,
                about,
                own: None,
            }
            .with_limits());
        }
        if let Some(dir) = &args.stack {
            let info = crate::client::endpoint::running_stack(dir).ok_or_else(|| {
                BenchError::Stack(StackError::NotRunning(dir.display().to_string()))
            })?;
            return Ok(Self::of_stack(
                info,
                SetupInfo::new(format!("chatctl up in {}", dir.display())),
                None,
            ));
        }
        Self::own(StackRequest {
            gateways: args.gateways,
            workers,
            postgres,
            redis_fsync: args.redis_fsync,
            gateway_args: args.gateway_args.clone(),
        })
        .await
    }

    /// Starts a stack through `chatctl up`'s code in a temporary state directory.
    pub async fn own(request: StackRequest) -> Result<Setup, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("chatctl-bench-")
            .tempdir()
            .map_err(|e| {
                BenchError::Invalid(format!("cannot make a temporary state directory: {e}"))
            })?;
        let gateway_args = bench_gateway_args(&request.gateway_args);
        let mut argv: Vec<String> = vec![
            "--state-dir".into(),
            dir.path().display().to_string(),
            "--gateways".into(),
            request.gateways.to_string(),
            "--workers".into(),
            request.workers.to_string(),
            "--redis-fsync".into(),
            request.redis_fsync.as_str().to_owned(),
            "--haproxy-log".into(),
            "false".into(),
            "--drain-timeout".into(),
            "1s".into(),
            // Any free ports: never a user's 8080 / 8404.
            "--port".into(),
            "0".into(),
            "--stats-port".into(),
            "0".into(),
        ];
        if !request.postgres {
            argv.push("--no-postgres".into());
        }
        for arg in &gateway_args {
            argv.push(format!("--gateway-arg={arg}"));
        }
        let config =
            StackConfig::from_args(argv).map_err(|e| BenchError::Invalid(e.to_string()))?;
        let stack = Stack::start(&config).await?;
        let info = stack.info().clone();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(stack.run(async {
            let _ = stopped.await;
        }));
        let mut about = SetupInfo::new("started by the benchmark".to_owned());
        about.redis_fsync = Some(request.redis_fsync);
        about.gateway_args = gateway_args;
        about.haproxy_max_conn =
            (request.gateways > 0).then(|| about.file_limit.haproxy_max_conn());
        Ok(Self::of_stack(
            info,
            about,
            Some(OwnStack {
                stop,
                task,
                _dir: dir,
            }),
        ))
    }

    fn of_stack(info: StackInfo, mut about: SetupInfo, own: Option<OwnStack>) -> Setup {
        let jwt_secret = (info.auth == "jwt")
            .then(|| {
                crate::stack::secrets::Secrets::jwt_secret(&Layout::new(&info.state_dir).secrets())
                    .ok()
            })
            .flatten()
            .map(|s| s.expose().to_owned());
        let sockets: Vec<Target> = info
            .of_role(Role::Gateway)
            .filter_map(|c| c.socket.clone().map(Target::Unix))
            .collect();
        about.gateways = Some(sockets.len());
        let front = info
            .ws_url
            .as_deref()
            .and_then(|url| Target::parse(url).ok());
        Setup {
            front,
            sockets,
            servers: info.pids(),
            info: Some(info),
            jwt_secret,
            about,
            own,
        }
        .with_limits()
    }

    fn with_limits(mut self) -> Self {
        self.about.server_file_limits = self
            .servers
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), crate::procstat::open_file_limit(*pid)?)))
            .collect();
        self
    }

    /// Where subscribers connect: HAProxy, or with `direct` each gateway's socket.
    pub fn subscriber_targets(&self, direct: bool) -> Result<Vec<Target>, BenchError> {
        if !direct {
            return self
                .front
                .clone()
                .map(|front| vec![front])
                .ok_or_else(|| BenchError::Invalid("this stack has no gateways".to_owned()));
        }
        if self.sockets.is_empty() {
            return Err(BenchError::Invalid(
                "--direct needs the gateways' sockets: leave out --url (or use --stack)".to_owned(),
            ));
        }
        Ok(self.sockets.clone())
    }

    /// Checks that `connections` fit the load generator's (and HAProxy's) open-file limits.
    pub fn check_capacity(
        &self,
        connections: usize,
        through_haproxy: bool,
    ) -> Result<(), BenchError> {
        self.about
            .file_limit
            .check("the load generator", connections as u64)?;
        if let (true, Some(max)) = (through_haproxy, self.about.haproxy_max_conn)
            && connections > max as usize
        {
            return Err(BenchError::Invalid(format!(
                "HAProxy may proxy at most {max} connections under the open-file limit ({} hard: two \
                 descriptors each); use --direct or fewer connections",
                self.about.file_limit.hard
            )));
        }
        Ok(())
    }

    /// Stops a stack the benchmark started.
    pub async fn finish(self) -> Option<ShutdownReport> {
        let own = self.own?;
        let _ = own.stop.send(());
        own.task.await.ok()
    }
}

/// A short random name for one run's channels and users.
pub fn run_id() -> String {
    use rand::Rng as _;
    format!("{:06x}", rand::rng().random_range(0..0x100_0000))
}
