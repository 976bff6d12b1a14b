//! Persistence benchmark: publish → stream → worker → PostgreSQL.
//!
//! Publishes through the gateway's own `PUBLISH_MESSAGE` script and runs one
//! worker (the library, in this process), then reports:
//!
//! 1. **throughput**: `--messages` messages are queued in the streams first,
//!    then the worker starts; sustained msgs/s from the first committed batch
//!    to the last row;
//! 2. **lag**: messages published at a steady `--rate` for `--duration` while
//!    the worker runs; the end-to-end persistence lag of each message (publish
//!    until its row is visible in PostgreSQL, polled every 5 ms) as percentiles.
//!
//! Without `--redis-url`/`--database-url` it starts its own redis-server and
//! postgres (chatcluster-testkit). Run it optimised:
//!
//! ```text
//! cargo run --release -p chatcluster-worker --example bench -- --messages 200000 --rate 10000
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatcluster_protocol::entry::StoredMessage;
use chatcluster_protocol::scripts;
use chatcluster_protocol::stream::{AppendSettings, StreamId};
use chatcluster_worker::config::parse_duration;
use chatcluster_worker::{Config, WriteMode};
use clap::Parser;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(name = "bench", about = "chatcluster persistence benchmark")]
struct Bench {
    /// Redis to use [default: start a redis-server].
    #[arg(long, env = "BENCH_REDIS_URL")]
    redis_url: Option<String>,
    /// PostgreSQL to use [default: start a postgres].
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Messages queued before the worker starts (throughput phase).
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Channels the messages are spread over.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Steady publish rate of the lag phase, msgs/s (0 skips the phase).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Length of the lag phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// The worker's BATCH_SIZE.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// The worker's BATCH_TIMEOUT.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    batch_timeout: Duration,
    /// The worker's WRITE_MODE.
    #[arg(long, value_enum, default_value_t = WriteMode::Unnest)]
    write_mode: WriteMode,
    /// The worker's WRITERS.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// The worker's STREAM_SHARDS.
    #[arg(long, default_value_t = 4)]
    shards: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bench = Bench::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let (_services, redis_url, database_url) = services(&bench).await?;
    let redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    chatcluster_worker::store::MIGRATOR.run(&pool).await?;
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut publisher = Publisher::new(redis.clone(), bench.shards, bench.body_bytes).await?;

    println!(
        "worker: BATCH_SIZE={} BATCH_TIMEOUT={:?} WRITE_MODE={:?} WRITERS={} STREAM_SHARDS={}",
        bench.batch_size, bench.batch_timeout, bench.write_mode, bench.writers, bench.shards
    );

    // Phase 1: throughput of one worker draining a backlog.
    let channels: Vec<String> = (0..bench.channels)
        .map(|i| format!("bench-{run}-t{i}"))
        .collect();
    for channel in &channels {
        publisher.init(channel).await?;
    }
    let started = Instant::now();
    let mut queued = 0;
    while queued < bench.messages {
        let n = (bench.messages - queued).min(500);
        publisher.publish(&channels, n).await?;
        queued += n;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    println!(
        "publish: {} messages via PUBLISH_MESSAGE in {:.2}s = {:.0} msgs/s",
        bench.messages,
        publish_secs,
        bench.messages as f64 / publish_secs
    );

    let mut config = Config::new(
        redis_url.clone(),
        database_url.clone(),
        format!("bench-{run}"),
    );
    config.batch_size = bench.batch_size;
    config.batch_timeout = bench.batch_timeout;
    config.write_mode = bench.write_mode;
    config.writers = bench.writers;
    config.stream_shards = bench.shards;
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let worker_started = Instant::now();
    let worker = tokio::spawn(chatcluster_worker::run(
        config,
        listener,
        stop.clone().cancelled_owned(),
    ));

    let target = bench.messages as i64;
    let (mut first, mut first_rows) = (None, 0);
    loop {
        let rows = persisted(&pool, &channels).await?;
        if first.is_none() && rows > 0 {
            first = Some(Instant::now());
            first_rows = rows;
        }
        if rows >= target {
            break;
        }
        anyhow::ensure!(
            worker_started.elapsed() < Duration::from_secs(600),
            "throughput phase timed out at {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = Instant::now();
    let sustained = (target - first_rows) as f64
        / done
            .duration_since(first.unwrap_or(worker_started))
            .as_secs_f64();
    let overall = target as f64 / done.duration_since(worker_started).as_secs_f64();
    println!(
        "throughput: {target} messages persisted in {:.2}s: sustained {sustained:.0} msgs/s (incl. start-up {overall:.0} msgs/s)",
        done.duration_since(worker_started).as_secs_f64()
    );

    // Phase 2: steady rate, end-to-end lag.
    let mut total = bench.messages;
    if bench.rate > 0 {
        let lag_channels: Vec<String> = (0..bench.channels)
            .map(|i| format!("bench-{run}-l{i}"))
            .collect();
        for channel in &lag_channels {
            publisher.init(channel).await?;
        }
        let lags = lag_phase(
            &mut publisher,
            &pool,
            &lag_channels,
            bench.rate,
            bench.duration,
        )
        .await?;
        total += lags.len();
        let pct = |p: f64| {
            lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)].as_secs_f64() * 1000.0
        };
        println!(
            "lag at {} msgs/s for {:?} ({} messages): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            bench.rate,
            bench.duration,
            lags.len(),
            pct(0.50),
            pct(0.95),
            pct(0.99),
            pct(1.0)
        );
    }

    stop.cancel();
    worker.await?.context("worker failed")?;
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT msg_id) FROM messages WHERE channel LIKE $1",
    )
    .bind(format!("bench-{run}-%"))
    .fetch_one(&pool)
    .await?;
    println!("check: published {total}, rows {rows}, distinct msg_ids {distinct}");
    anyhow::ensure!(
        rows == total as i64 && distinct == rows,
        "lost or duplicated messages"
    );
    Ok(())
}

/// Publishes at `rate` for `duration`; returns every message's lag, sorted.
async fn lag_phase(
    publisher: &mut Publisher,
    pool: &PgPool,
    channels: &[String],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let tick = Duration::from_millis(10);
    let per_tick = (rate as usize).div_ceil(100);
    let mut sent: HashMap<String, Vec<Instant>> =
        channels.iter().map(|c| (c.clone(), Vec::new())).collect();
    let mut seen: HashMap<String, usize> = channels.iter().map(|c| (c.clone(), 0)).collect();
    let mut lags = Vec::new();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    let mut next_poll = Instant::now();
    let mut publishing = true;
    loop {
        if publishing {
            ticker.tick().await;
            let at = Instant::now();
            for (channel, offset) in publisher.publish(channels, per_tick).await? {
                let times = sent.get_mut(&channel).context("channel")?;
                anyhow::ensure!(offset as usize == times.len() + 1, "offsets must be dense");
                times.push(at);
            }
            publishing = started.elapsed() < duration;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if Instant::now() >= next_poll || !publishing {
            next_poll = Instant::now() + Duration::from_millis(5);
            let now = Instant::now();
            for (channel, max) in max_offsets(pool, channels).await? {
                let times = &sent[&channel];
                let seen = seen.get_mut(&channel).context("channel")?;
                let max = (max as usize).min(times.len());
                for at in &times[*seen..max.max(*seen)] {
                    lags.push(now.duration_since(*at));
                }
                *seen = (*seen).max(max);
            }
            let all_seen = sent.iter().all(|(c, times)| seen[c] == times.len());
            if !publishing && all_seen {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < duration + Duration::from_secs(120),
                "lag phase timed out"
            );
        }
    }
    lags.sort();
    Ok(lags)
}

/// Rows of the given channels visible in PostgreSQL (offsets are dense from 1).
async fn persisted(pool: &PgPool, channels: &[String]) -> anyhow::Result<i64> {
    Ok(max_offsets(pool, channels)
        .await?
        .iter()
        .map(|(_, max)| max)
        .sum())
}

async fn max_offsets(pool: &PgPool, channels: &[String]) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT c, COALESCE((SELECT max(channel_offset) FROM messages WHERE channel = c), 0) FROM unnest($1::text[]) AS c",
    )
    .bind(channels)
    .fetch_all(pool)
    .await?)
}

/// Publishes like the gateway: one `EVALSHA APPEND` per message, pipelined.
struct Publisher {
    conn: MultiplexedConnection,
    script: redis::Script,
    init: redis::Script,
    shards: u32,
    body: String,
    next: usize,
}

/// How the bench appends: no TTL, no idempotency records, one block for the whole run.
const APPEND: AppendSettings = AppendSettings {
    history_size: 1000,
    ttl_secs: 0,
    record_ms: 1,
    block: 1 << 40,
};

impl Publisher {
    async fn new(
        mut conn: MultiplexedConnection,
        shards: u32,
        body_bytes: usize,
    ) -> anyhow::Result<Self> {
        let script = redis::Script::new(scripts::APPEND);
        let _: (String,) = redis::pipe()
            .load_script(&script)
            .query_async(&mut conn)
            .await?;
        Ok(Self {
            conn,
            script,
            init: redis::Script::new(scripts::INIT_EPOCH),
            shards,
            body: "x".repeat(body_bytes),
            next: 0,
        })
    }

    async fn init(&mut self, channel: &str) -> anyhow::Result<()> {
        let epoch = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let call = StreamId::channel(channel).init_call(self.shards, &epoch, 0, APPEND.block, 0);
        let mut invocation = self.init.prepare_invoke();
        invocation.key(call.keys).arg(call.args);
        let _: (i64, String, i64, i64) = invocation.invoke_async(&mut self.conn).await?;
        Ok(())
    }

    /// Publishes `n` messages round-robin over `channels`; returns their offsets.
    async fn publish(
        &mut self,
        channels: &[String],
        n: usize,
    ) -> anyhow::Result<Vec<(String, u64)>> {
        let mut invocations = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            let channel = &channels[self.next % channels.len()];
            self.next += 1;
            let message = StoredMessage {
                channel: channel.clone(),
                msg_id: Uuid::new_v4(),
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
            targets.push(channel.clone());
        }
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let replies: Vec<(u64, String, String, u8, u64)> = pipe.query_async(&mut self.conn).await?;
        Ok(targets
            .into_iter()
            .zip(replies.into_iter().map(|(offset, ..)| offset))
            .collect())
    }
}

/// Services started for the run (kept alive until the end), and the URLs to use.
async fn services(
    bench: &Bench,
) -> anyhow::Result<(
    Option<(
        chatcluster_testkit::RedisServer,
        chatcluster_testkit::Postgres,
    )>,
    String,
    String,
)> {
    if let (Some(redis), Some(db)) = (&bench.redis_url, &bench.database_url) {
        return Ok((None, redis.clone(), db.clone()));
    }
    println!("starting redis-server and postgres (chatcluster-testkit)...");
    let (redis, pg) = tokio::task::spawn_blocking(|| {
        (
            chatcluster_testkit::RedisServer::start(),
            chatcluster_testkit::Postgres::start(),
        )
    })
    .await?;
    let (redis_url, db_url) = (
        bench.redis_url.clone().unwrap_or_else(|| redis.url()),
        bench.database_url.clone().unwrap_or_else(|| pg.url()),
    );
    Ok((Some((redis, pg)), redis_url, db_url))
}
