//! What durability costs: publishes per second through the gateway's own
//! publish path (the `APPEND` script, one round trip per publish, many in
//! flight on one multiplexed connection as in a gateway process), against a
//! redis-server without an AOF, with an AOF fsynced every second
//! (`appendfsync everysec`), and with one fsynced before every reply
//! (`appendfsync always`). Each server is a fresh `redis-server` in a temp
//! dir (on the same disk as `TMPDIR`).
//!
//! ```sh
//! cargo run --release -p chatcluster-gateway --example fsync -- --seconds 10 --concurrency 64
//! cargo run --release -p chatcluster-gateway --example fsync -- --idempotency-keys
//! ```

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use chatcluster_gateway::blocks::Blocks;
use chatcluster_gateway::epochs;
use chatcluster_gateway::metrics::Metrics;
use chatcluster_gateway::store::{Append, Store, StoreSettings};
use chatcluster_protocol::entry::StoredMessage;
use chatcluster_protocol::keys;
use chatcluster_protocol::stream::StreamId;
use chatcluster_testkit::{Fsync, Persistence, RedisServer};

/// Measures publishes per second for each `appendfsync` policy.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of publishing per policy.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Channels published to (round robin).
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    bytes: usize,
    /// Give every publish an idempotency key (one more key written per publish).
    #[arg(long)]
    idempotency_keys: bool,
}

/// One policy's result.
struct Measured {
    publishes: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

async fn measure(persistence: Persistence, args: &Args) -> Measured {
    let redis = tokio::task::spawn_blocking(move || RedisServer::start_with(persistence))
        .await
        .unwrap();
    let shards = 4;
    let store = Store::new(
        redis::Client::open(redis.url()).unwrap(),
        StoreSettings {
            shards,
            history_size: 1000,
            history_ttl: Duration::from_secs(24 * 3600),
            presence_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            idempotency_window: Duration::from_secs(600),
            offset_block: 1000,
        },
    )
    .unwrap();
    let blocks = Blocks::new(None, 1000);
    let metrics = Arc::new(Metrics::new());
    let text = "x".repeat(args.bytes);
    // Every channel's epoch is started before the clock runs.
    for c in 0..args.channels {
        publish(
            &store,
            &blocks,
            &metrics,
            &format!("bench-{c}"),
            &text,
            None,
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let (store, blocks, metrics, text) =
                (store.clone(), blocks.clone(), metrics.clone(), text.clone());
            let (channels, keyed) = (args.channels, args.idempotency_keys);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let channel = format!("bench-{}", (task + n) % channels);
                    let key = keyed.then(|| format!("t{task}-{n}"));
                    let sent = Instant::now();
                    publish(&store, &blocks, &metrics, &channel, &text, key.as_deref()).await;
                    latencies.push(sent.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    drop(redis);
    Measured {
        publishes: latencies.len() as u64,
        elapsed,
        latencies,
    }
}

async fn publish(
    store: &Store,
    blocks: &Blocks,
    metrics: &Metrics,
    channel: &str,
    text: &str,
    key: Option<&str>,
) {
    let message = StoredMessage {
        channel: channel.to_owned(),
        msg_id: uuid::Uuid::new_v4(),
        user: "bench".into(),
        text: text.to_owned(),
        ts: chrono::Utc::now().timestamp_millis(),
        clock: 1,
    };
    let stream = StreamId::channel(channel);
    let append = Append {
        stream: &stream,
        payload: message.encode(),
        msg_id: message.msg_id,
        record: key.map(|key| keys::publish_record_key(channel, "bench", key, 4)),
    };
    epochs::append(store, blocks, metrics, &append)
        .await
        .expect("publish");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "{} s per policy, {} publishes in flight, {} channels, {}-byte texts{}",
        args.seconds,
        args.concurrency,
        args.channels,
        args.bytes,
        if args.idempotency_keys {
            ", idempotency keys"
        } else {
            ""
        }
    );
    println!("| policy | publishes/s | p50 | p99 |");
    println!("|---|---|---|---|");
    for (name, persistence) in [
        ("no AOF", Persistence::None),
        ("appendfsync everysec", Persistence::Aof(Fsync::EverySec)),
        ("appendfsync always", Persistence::Aof(Fsync::Always)),
    ] {
        let measured = measure(persistence, &args).await;
        println!(
            "| {name} | {:.0} | {:.2} ms | {:.2} ms |",
            measured.publishes as f64 / measured.elapsed.as_secs_f64(),
            percentile(&measured.latencies, 0.5).as_secs_f64() * 1000.0,
            percentile(&measured.latencies, 0.99).as_secs_f64() * 1000.0,
        );
    }
}
