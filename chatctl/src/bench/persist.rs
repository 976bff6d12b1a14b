//! `bench persist`: Redis Streams → worker → PostgreSQL.
//!
//! Messages are published the way a gateway does (one `EVALSHA` of the protocol crate's
//! `APPEND` per message, pipelined), and the workers are real `chatcluster-worker`
//! processes, started the way `chatctl up` starts them. Two phases:
//!
//! 1. **throughput**: `--messages` are queued before the workers start; sustained rows/s
//!    from the first row to the last;
//! 2. **lag**: messages at a steady `--rate` for `--duration` while the workers run; each
//!    message's time from publish until its row is visible (polled every 5 ms).
//!
//! At the end every message must be in PostgreSQL exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chatcluster_protocol::entry::StoredMessage;
use chatcluster_protocol::scripts;
use chatcluster_protocol::stream::{AppendSettings, StreamId};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use sqlx::PgPool;

use super::histogram::{Summary, summarize};
use super::procs::{self, Usage};
use super::progress::Progress;
use super::report::{latency_line, processes, thousands};
use super::{BenchError, Setup, StackRequest, run_id};
use crate::stack::child::{self, ChildSpec};
use crate::stack::components::{self, Backends};
use crate::stack::redis::Fsync;
use crate::stack::secrets::Secrets;
use crate::stack::{Layout, StackConfig, postgres, probe, programs};

/// Options of `bench persist`.
#[derive(Debug, Clone, clap::Args)]
pub struct PersistArgs {
    /// Redis to use, with --database-url [default: start a stack with Redis and PostgreSQL].
    #[arg(
        long,
        env = "CHATCTL_BENCH_REDIS_URL",
        requires = "database_url",
        hide_env_values = true
    )]
    redis_url: Option<String>,
    /// PostgreSQL to use, with --redis-url.
    #[arg(
        long,
        env = "CHATCTL_BENCH_DATABASE_URL",
        requires = "redis_url",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Redis append-only fsync policy of the stack the benchmark starts.
    #[arg(long, env = "CHATCTL_BENCH_REDIS_FSYNC", value_enum, default_value_t = Fsync::Always)]
    redis_fsync: Fsync,
    /// Messages queued before the workers start (throughput phase).
    #[arg(long, env = "CHATCTL_BENCH_MESSAGES", default_value_t = 200_000)]
    messages: usize,
    /// Channels the messages are spread over.
    #[arg(long, env = "CHATCTL_BENCH_CHANNELS", default_value_t = 16)]
    channels: usize,
    /// Bytes of text per message.
    #[arg(long, env = "CHATCTL_BENCH_SIZE", default_value_t = 100)]
    size: usize,
    /// Steady publish rate of the lag phase, messages/s (0 skips the phase).
    #[arg(long, env = "CHATCTL_BENCH_RATE", default_value_t = 10_000)]
    rate: u64,
    /// Length of the lag phase.
    #[arg(long, env = "CHATCTL_BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Worker processes.
    #[arg(long, env = "CHATCTL_BENCH_WORKERS", default_value_t = 1)]
    workers: usize,
    /// The workers' BATCH_SIZE.
    #[arg(long, env = "CHATCTL_BENCH_BATCH_SIZE", default_value_t = 1000)]
    batch_size: usize,
    /// The workers' BATCH_TIMEOUT.
    #[arg(long, env = "CHATCTL_BENCH_BATCH_TIMEOUT", default_value = "100ms")]
    batch_timeout: String,
    /// The workers' WRITE_MODE (unnest or copy).
    #[arg(long, env = "CHATCTL_BENCH_WRITE_MODE", default_value = "unnest")]
    write_mode: String,
    /// The workers' WRITERS.
    #[arg(long, env = "CHATCTL_BENCH_WRITERS", default_value_t = 2)]
    writers: usize,
    /// STREAM_SHARDS of the workers (and of the publishing here).
    #[arg(long, env = "CHATCTL_BENCH_SHARDS", default_value_t = 4)]
    shards: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
}

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct PersistReport {
    /// Where Redis and PostgreSQL came from.
    pub stack: String,
    /// The worker settings, as passed.
    pub worker_args: Vec<String>,
    /// Worker processes.
    pub workers: usize,
    /// Messages published per second into the streams (throughput phase, pipelined).
    pub publish_per_second: f64,
    /// Messages of the throughput phase.
    pub backlog: usize,
    /// Rows per second from the first committed row to the last.
    pub sustained_per_second: f64,
    /// Rows per second including the workers' start-up.
    pub overall_per_second: f64,
    /// The lag phase's rate, messages/s.
    pub lag_rate: u64,
    /// Publish → row visible.
    pub lag: Summary,
    /// Messages published in total.
    pub published: u64,
    /// Rows in PostgreSQL for this run.
    pub rows: i64,
    /// Distinct message ids among them.
    pub distinct: i64,
    /// CPU and memory over both phases.
    pub processes: Vec<Usage>,
}

fn backend(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |message| BenchError::Backend {
        what: what.to_owned(),
        message,
    }
}

/// How the bench appends: no TTL, no idempotency records, one offset block for the whole run.
const APPEND: AppendSettings = AppendSettings {
    history_size: 1000,
    ttl_secs: 0,
    record_ms: 1,
    block: 1 << 40,
};

/// Publishes like the gateway: one `EVALSHA APPEND` per message, pipelined.
struct Publisher {
    conn: MultiplexedConnection,
    script: redis::Script,
    init: redis::Script,
    shards: u32,
    body: String,
    next: usize,
}

impl Publisher {
    async fn new(
        mut conn: MultiplexedConnection,
        shards: u32,
        size: usize,
    ) -> Result<Self, BenchError> {
        let script = redis::Script::new(scripts::APPEND);
        let _: (String,) = redis::pipe()
            .load_script(&script)
            .query_async(&mut conn)
            .await
            .map_err(|e| backend("load the publish script")(e.to_string()))?;
        Ok(Self {
            conn,
            script,
            init: redis::Script::new(scripts::INIT_EPOCH),
            shards,
            body: "x".repeat(size),
            next: 0,
        })
    }

    async fn init(&mut self, channel: &str) -> Result<(), BenchError> {
        let epoch = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let call = StreamId::channel(channel).init_call(self.shards, &epoch, 0, APPEND.block, 0);
        let mut invocation = self.init.prepare_invoke();
        invocation.key(call.keys).arg(call.args);
        let _: (i64, String, i64, i64) = invocation
            .invoke_async(&mut self.conn)
            .await
            .map_err(|e| backend("create a channel")(e.to_string()))?;
        Ok(())
    }

    /// Publishes `n` messages round-robin over `channels`; returns (channel index, offset).
    async fn publish(
        &mut self,
        channels: &[String],
        n: usize,
    ) -> Result<Vec<(usize, u64)>, BenchError> {
        let mut invocations = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            let index = self.next % channels.len();
            let channel = &channels[index];
            self.next += 1;
            let message = StoredMessage {
                channel: channel.clone(),
                msg_id: uuid::Uuid::new_v4(),
                user: "bench".into(),
                text: self.body.clone(),
                ts: chrono::Utc::now().timestamp_millis(),
                clock: self.next as u64,
            };
            let call = StreamId::channel(channel).append_call(
                self.shards,
                message.encode(),
                message.msg_id,
                None,
                &APPEND,
            );
            let mut invocation = self.script.prepare_invoke();
            invocation.key(call.keys).arg(call.args);
            invocations.push(invocation);
            targets.push(index);
        }
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let replies: Vec<(u64, String, String, u8, u64)> =
            pipe.query_async(&mut self.conn)
                .await
                .map_err(|e| backend("publish")(e.to_string()))?;
        Ok(targets
            .into_iter()
            .zip(replies.into_iter().map(|(offset, ..)| offset))
            .collect())
    }
}

async fn max_offsets(pool: &PgPool, channels: &[String]) -> Result<Vec<i64>, BenchError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c, COALESCE((SELECT max(channel_offset) FROM messages WHERE channel = c), 0) \
         FROM unnest($1::text[]) WITH ORDINALITY AS t(c, i) ORDER BY i",
    )
    .bind(channels)
    .fetch_all(pool)
    .await
    .map_err(|e| backend("read max offsets")(e.to_string()))?;
    Ok(rows.into_iter().map(|(_, max)| max).collect())
}

/// Redis and PostgreSQL URLs, and a stack the benchmark started (if it did).
async fn services(args: &PersistArgs) -> Result<(Option<Setup>, Backends), BenchError> {
    if let (Some(redis), Some(db)) = (&args.redis_url, &args.database_url) {
        return Ok((
            None,
            Backends {
                redis_url: redis.clone(),
                database_url: Some(db.clone()),
                jwt_secret: None,
            },
        ));
    }
    let setup = Setup::own(StackRequest {
        gateways: 0,
        workers: 0,
        postgres: true,
        redis_fsync: args.redis_fsync,
        gateway_args: Vec::new(),
    })
    .await?;
    let info = setup
        .info
        .clone()
        .ok_or_else(|| BenchError::Invalid("the benchmark's stack has no state".to_owned()))?;
    let secrets = Secrets::load_or_create(&Layout::new(&info.state_dir).secrets())
        .map_err(|e| backend("read the stack's secrets")(e.to_string()))?;
    let backends = Backends {
        redis_url: probe::redis_url(info.redis_port, &secrets.redis_password),
        database_url: info
            .postgres_port
            .map(|p| postgres::url(p, &secrets.postgres_password)),
        jwt_secret: None,
    };
    Ok((Some(setup), backends))
}

fn worker_args(args: &PersistArgs) -> Vec<String> {
    vec![
        format!("--batch-size={}", args.batch_size),
        format!("--batch-timeout={}", args.batch_timeout),
        format!("--write-mode={}", args.write_mode),
        format!("--writers={}", args.writers),
        format!("--stream-shards={}", args.shards),
    ]
}

/// Starts the workers the way `chatctl up` does.
async fn start_workers(
    args: &PersistArgs,
    backends: &Backends,
    logs: &std::path::Path,
) -> Result<Vec<(ChildSpec, tokio::process::Child)>, BenchError> {
    let program = programs::chatcluster("chatcluster-worker", None)
        .map_err(|e| BenchError::Invalid(e.to_string()))?;
    let argv: Vec<String> = worker_args(args)
        .iter()
        .map(|a| format!("--worker-arg={a}"))
        .collect();
    let config = StackConfig::from_args(argv).map_err(|e| BenchError::Invalid(e.to_string()))?;
    let mut workers = Vec::new();
    for index in 0..args.workers {
        let admin = crate::stack::ports::any_free(&[]);
        let spec = components::worker(&config, &program, index, admin, backends);
        let log = logs.join(format!("bench-worker-{index}.log"));
        let process = child::spawn(&spec, &log).map_err(|e| BenchError::Invalid(e.to_string()))?;
        workers.push((spec, process));
    }
    Ok(workers)
}

/// Runs `bench persist`.
pub async fn run(args: &PersistArgs) -> Result<PersistReport, BenchError> {
    let mut progress = Progress::new(args.quiet);
    progress.say("persist: preparing Redis and PostgreSQL ...");
    let (setup, backends) = services(args).await?;
    let result = measure(args, setup.as_ref(), &backends, &mut progress).await;
    if let Some(setup) = setup {
        setup.finish().await;
    }
    result
}

async fn measure(
    args: &PersistArgs,
    setup: Option<&Setup>,
    backends: &Backends,
    progress: &mut Progress,
) -> Result<PersistReport, BenchError> {
    if args.channels == 0 || args.workers == 0 {
        return Err(BenchError::Invalid(
            "--channels and --workers must be above 0".to_owned(),
        ));
    }
    let database_url = backends.database_url.clone().unwrap_or_default();
    let redis = redis::Client::open(backends.redis_url.as_str())
        .map_err(|e| backend("Redis URL")(e.to_string()))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| backend("connect to Redis")(e.to_string()))?;
    let mut publisher = Publisher::new(redis, args.shards, args.size).await?;
    let run = run_id();
    let channels: Vec<String> = (0..args.channels)
        .map(|i| format!("bench-{run}-t{i}"))
        .collect();
    for channel in &channels {
        publisher.init(channel).await?;
    }

    // Phase 1: a backlog, then the workers.
    let started = Instant::now();
    let mut queued = 0;
    while queued < args.messages {
        let n = (args.messages - queued).min(500);
        publisher.publish(&channels, n).await?;
        queued += n;
        progress.show(
            queued as f64 / args.messages as f64,
            &format!("queueing {queued}/{}", args.messages),
        );
    }
    progress.finish();
    let publish_per_second = args.messages as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let logs = match setup.and_then(|s| s.info.as_ref()) {
        Some(info) => info.log_dir.clone(),
        None => std::env::temp_dir(),
    };
    let mut servers = setup.map(|s| s.servers.clone()).unwrap_or_default();
    let workers_started = Instant::now();
    let mut workers = start_workers(args, backends, &logs).await?;
    servers.extend(
        workers
            .iter()
            .filter_map(|(spec, p)| Some((spec.name.clone(), p.id()?))),
    );
    let mut window = procs::Window::begin(&servers);
    let pool = connect_pool(&database_url, workers_started).await?;
    let target = args.messages as i64;
    let (mut first, mut first_rows) = (None, 0);
    loop {
        let rows: i64 = max_offsets(&pool, &channels).await?.iter().sum();
        if first.is_none() && rows > 0 {
            first = Some(Instant::now());
            first_rows = rows;
        }
        progress.show(
            rows as f64 / target.max(1) as f64,
            &format!("persisted {rows}/{target}"),
        );
        if rows >= target {
            break;
        }
        if workers_started.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::Invalid(format!(
                "throughput phase timed out at {rows} rows"
            )));
        }
        window.sample_peaks();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    progress.finish();
    let done = Instant::now();
    let sustained = (target - first_rows) as f64
        / done
            .duration_since(first.unwrap_or(workers_started))
            .as_secs_f64()
            .max(1e-9);
    let overall = target as f64 / done.duration_since(workers_started).as_secs_f64().max(1e-9);

    // Phase 2: steady rate.
    let mut published = args.messages as u64;
    let mut lag = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .expect("constant bounds hdrhistogram accepts");
    if args.rate > 0 {
        let lag_channels: Vec<String> = (0..args.channels)
            .map(|i| format!("bench-{run}-l{i}"))
            .collect();
        for channel in &lag_channels {
            publisher.init(channel).await?;
        }
        let lags = lag_phase(
            &mut publisher,
            &pool,
            &lag_channels,
            args.rate,
            args.duration,
            progress,
        )
        .await?;
        published += lags.len() as u64;
        for l in lags {
            let _ = lag.record(u64::try_from(l.as_micros()).unwrap_or(u64::MAX).max(1));
        }
    }
    let processes = window.end();
    for (spec, process) in &mut workers {
        child::stop(process, spec).await;
    }
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT msg_id) FROM messages WHERE channel LIKE $1",
    )
    .bind(format!("bench-{run}-%"))
    .fetch_one(&pool)
    .await
    .map_err(|e| backend("count rows")(e.to_string()))?;
    Ok(PersistReport {
        stack: match setup {
            Some(s) => s.about.stack.clone(),
            None => "--redis-url/--database-url".to_owned(),
        },
        worker_args: worker_args(args),
        workers: args.workers,
        publish_per_second,
        backlog: args.messages,
        sustained_per_second: sustained,
        overall_per_second: overall,
        lag_rate: args.rate,
        lag: summarize(&lag),
        published,
        rows,
        distinct,
        processes,
    })
}

/// Waits for the workers' migrations to create the table, then opens a small pool.
async fn connect_pool(url: &str, since: Instant) -> Result<PgPool, BenchError> {
    loop {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await;
        if let Ok(pool) = pool {
            let ready = sqlx::query("SELECT 1 FROM messages LIMIT 1")
                .execute(&pool)
                .await;
            if ready.is_ok() {
                return Ok(pool);
            }
        }
        if since.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Invalid(
                "PostgreSQL has no `messages` table 60 s after the workers started; see their logs"
                    .to_owned(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes at `rate` for `duration`; returns every message's lag.
async fn lag_phase(
    publisher: &mut Publisher,
    pool: &PgPool,
    channels: &[String],
    rate: u64,
    duration: Duration,
    progress: &mut Progress,
) -> Result<Vec<Duration>, BenchError> {
    let per_tick = usize::try_from(rate.div_ceil(100)).unwrap_or(usize::MAX);
    let mut sent: HashMap<usize, Vec<Instant>> =
        (0..channels.len()).map(|c| (c, Vec::new())).collect();
    let mut seen: Vec<usize> = vec![0; channels.len()];
    let mut lags = Vec::new();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut next_poll = Instant::now();
    let mut publishing = true;
    loop {
        if publishing {
            ticker.tick().await;
            let at = Instant::now();
            for (channel, offset) in publisher.publish(channels, per_tick).await? {
                let times = sent.entry(channel).or_default();
                if offset as usize != times.len() + 1 {
                    return Err(BenchError::Invalid("offsets must be dense".to_owned()));
                }
                times.push(at);
            }
            publishing = started.elapsed() < duration;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if Instant::now() >= next_poll || !publishing {
            next_poll = Instant::now() + Duration::from_millis(5);
            let now = Instant::now();
            for (channel, max) in max_offsets(pool, channels).await?.into_iter().enumerate() {
                let times = &sent[&channel];
                let max = usize::try_from(max).unwrap_or(0).min(times.len());
                for at in &times[seen[channel]..max.max(seen[channel])] {
                    lags.push(now.duration_since(*at));
                }
                seen[channel] = seen[channel].max(max);
            }
            let all_seen = sent.iter().all(|(c, times)| seen[*c] == times.len());
            let elapsed = started.elapsed().as_secs_f64();
            progress.show(
                elapsed / duration.as_secs_f64(),
                &format!("lag phase {elapsed:.0}/{:.0} s", duration.as_secs_f64()),
            );
            if !publishing && all_seen {
                break;
            }
            if started.elapsed() > duration + Duration::from_secs(120) {
                return Err(BenchError::Invalid("lag phase timed out".to_owned()));
            }
        }
    }
    progress.finish();
    Ok(lags)
}

/// The summary table.
pub fn summary(r: &PersistReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npersist: {} worker(s) {}",
        r.workers,
        r.worker_args.join(" ")
    );
    let _ = writeln!(out, "  stack        {}", r.stack);
    let _ = writeln!(
        out,
        "  publish      {:.0} messages/s into the streams (pipelined EVALSHA)",
        r.publish_per_second
    );
    let _ = writeln!(
        out,
        "  throughput   {} queued: sustained {:.0} rows/s ({:.0} incl. start-up)",
        thousands(r.backlog as u64),
        r.sustained_per_second,
        r.overall_per_second
    );
    if r.lag_rate > 0 {
        let _ = writeln!(
            out,
            "  lag ms       at {} msg/s: {}",
            r.lag_rate,
            latency_line(&r.lag)
        );
    }
    let _ = writeln!(
        out,
        "  check        published {}, rows {}, distinct ids {}{}",
        thousands(r.published),
        r.rows,
        r.distinct,
        if r.published as i64 == r.rows && r.rows == r.distinct {
            " (exactly once)"
        } else {
            " — LOST OR DUPLICATED"
        }
    );
    out.push_str(&processes(&r.processes));
    out
}
