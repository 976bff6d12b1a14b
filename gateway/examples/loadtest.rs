//! Fan-out load test: subscribers on one channel, publishers at a fixed rate,
//! end-to-end latency percentiles, loss and order checks, and gateway memory
//! per idle connection.
//!
//! By default it starts its own stack (redis-server, two gateway processes on
//! Unix sockets, HAProxy in front, as in a pod); `--url` targets a running one.
//!
//! ```text
//! cargo build --release -p chatcluster-gateway --bins --examples
//! target/release/examples/loadtest --subscribers 1000 --rate 1000 --seconds 10
//! target/release/examples/loadtest --idle 10000          # memory per idle connection
//! target/release/examples/loadtest --idle 10000 --bare   # ... that never logged in
//! ```

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatcluster_protocol::codec::{self, Encoding};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Parser)]
#[command(about = "chatcluster gateway fan-out load test")]
struct Args {
    /// Target gateway or HAProxy WebSocket URL; without it a local stack is started.
    #[arg(long, env = "LOADTEST_URL")]
    url: Option<String>,
    /// Gateway processes of the local stack.
    #[arg(long, default_value_t = 2)]
    gateways: usize,
    /// Subscribers of the channel.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Publishers sharing the rate.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// WRITE_DELAY of the local stack's gateways (write coalescing), e.g. `0s`, `5ms`.
    #[arg(long, default_value = "0s")]
    write_delay: String,
    /// Encoding of the subscribers: json or msgpack.
    #[arg(long, default_value = "msgpack")]
    encoding: String,
    /// Instead of the fan-out test: open this many idle logged-in, subscribed
    /// connections and report gateway memory per connection (local stack only).
    #[arg(long)]
    idle: Option<usize>,
    /// With `--idle`: connections only connect (no login, no subscription).
    #[arg(long)]
    bare: bool,
}

struct Stack {
    children: Vec<Child>,
    pids: Vec<u32>,
    url: String,
    _dir: tempfile::TempDir,
    _redis: chatcluster_testkit::RedisServer,
    _haproxy: chatcluster_testkit::Haproxy,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("chatcluster-gateway");
    assert!(
        path.is_file(),
        "{} missing: run `cargo build --release -p chatcluster-gateway --bins --examples`",
        path.display()
    );
    path
}

fn start_stack(gateways: usize, env: &[(&str, &str)]) -> Stack {
    let redis = chatcluster_testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<PathBuf> = (0..gateways)
        .map(|i| dir.path().join(format!("gateway-{i}.sock")))
        .collect();
    let mut children = Vec::new();
    for (i, socket) in sockets.iter().enumerate() {
        let mut command = Command::new(gateway_binary());
        command
            .env("SOCKET_PATH", socket)
            .env("REDIS_URL", redis.url())
            .env("EPHEMERAL", "true")
            .env("INSTANCE_ID", format!("gw{i}"))
            .env("RUST_LOG", "warn")
            .env("PUBLISH_RATE", "1000000")
            .env("PUBLISH_BURST", "1000000")
            .env("OUTBOUND_QUEUE", "4096")
            .env("MAX_CONNECTIONS", "100000")
            .stdin(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        children.push(command.spawn().unwrap());
        assert!(
            chatcluster_testkit::wait_until(Duration::from_secs(10), || socket.exists()),
            "gateway {i} did not start"
        );
    }
    let haproxy = chatcluster_testkit::Haproxy::start(&sockets);
    Stack {
        pids: children.iter().map(Child::id).collect(),
        children,
        url: haproxy.ws_url(),
        _dir: dir,
        _redis: redis,
        _haproxy: haproxy,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, encoding: Encoding) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        encoding.subprotocol().parse().unwrap(),
    );
    for attempt in 0..50 {
        match tokio_tungstenite::connect_async(request.clone()).await {
            Ok((ws, _)) => return ws,
            Err(_) if attempt < 49 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("connect {url}: {e}"),
        }
    }
    unreachable!()
}

async fn send(ws: &mut Ws, encoding: Encoding, request: Value) {
    let bytes = codec::encode(encoding, &request);
    let message = match encoding {
        Encoding::Json => Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
        Encoding::MsgPack => Message::Binary(bytes),
    };
    ws.send(message).await.unwrap();
}

async fn next_value(ws: &mut Ws, encoding: Encoding) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return codec::decode(encoding, text.as_bytes()).ok(),
            Ok(Message::Binary(bytes)) => return codec::decode(encoding, &bytes).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Sends a request and waits for its reply.
async fn call(ws: &mut Ws, encoding: Encoding, request: Value) -> Value {
    send(ws, encoding, request).await;
    loop {
        let frame = next_value(ws, encoding).await.expect("reply");
        if frame["type"] == "ok" || frame["type"] == "error" {
            assert_eq!(frame["type"], "ok", "{frame}");
            return frame;
        }
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[derive(Default)]
struct Report {
    latencies_us: Vec<u64>,
    received: u64,
    gaps: u64,
    reordered: u64,
}

async fn subscriber(
    url: String,
    encoding: Encoding,
    index: usize,
    expected: u64,
    deadline: Instant,
) -> Report {
    let mut ws = connect(&url, encoding).await;
    call(
        &mut ws,
        encoding,
        json!({"op": "login", "user": format!("sub{index}")}),
    )
    .await;
    call(
        &mut ws,
        encoding,
        json!({"op": "subscribe", "channel": "bench"}),
    )
    .await;
    READY.fetch_add(1, Ordering::Relaxed);
    let mut report = Report {
        latencies_us: Vec::with_capacity(expected as usize),
        ..Report::default()
    };
    let mut last: Option<u64> = None;
    while report.received < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(message))) = tokio::time::timeout(left, ws.next()).await else {
            break;
        };
        let bytes = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes.as_ref(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Some(frame) = Push::decode(encoding, bytes) else {
            continue;
        };
        if frame.kind != "message" {
            continue;
        }
        let offset = frame.offset.unwrap_or(0);
        if let Some(last) = last {
            if offset <= last {
                report.reordered += 1;
            } else if offset != last + 1 {
                report.gaps += offset - last - 1;
            }
        }
        last = Some(offset);
        report.received += 1;
        if let Some(sent) = frame
            .text
            .as_deref()
            .and_then(|t| t.split(':').next())
            .and_then(|t| t.parse::<u64>().ok())
        {
            report.latencies_us.push(now_micros().saturating_sub(sent));
        }
    }
    report
}

/// The fields of a push the load test reads, borrowed (cheap to decode at a million per second).
#[derive(serde::Deserialize)]
struct Push<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    offset: Option<u64>,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> Push<'a> {
    fn decode(encoding: Encoding, bytes: &'a [u8]) -> Option<Self> {
        match encoding {
            Encoding::Json => serde_json::from_slice(bytes).ok(),
            Encoding::MsgPack => rmp_serde::from_slice(bytes).ok(),
        }
    }
}

static READY: AtomicU64 = AtomicU64::new(0);

async fn publisher(url: String, index: usize, per_second: f64, count: u64, size: usize) -> u64 {
    let encoding = Encoding::MsgPack;
    let mut ws = connect(&url, encoding).await;
    call(
        &mut ws,
        encoding,
        json!({"op": "login", "user": format!("pub{index}")}),
    )
    .await;
    let (mut sink, mut stream) = ws.split();
    // Replies are read concurrently: publishes are pipelined, not one round trip each.
    let acks = tokio::spawn(async move {
        let mut ok = 0u64;
        while ok < count {
            match stream.next().await {
                Some(Ok(Message::Binary(bytes))) => {
                    let frame: Value = codec::decode(encoding, &bytes).unwrap();
                    if frame["type"] == "ok" {
                        ok += 1;
                    } else if frame["type"] == "error" {
                        eprintln!("publish error: {frame}");
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        ok
    });
    let padding = "x".repeat(size.saturating_sub(20));
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let start = tokio::time::Instant::now();
    for n in 0..count {
        tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
        let text = format!("{}:{padding}", now_micros());
        let bytes = codec::encode(
            encoding,
            &json!({"op": "publish", "channel": "bench", "text": text, "id": n}),
        );
        sink.send(Message::Binary(bytes)).await.unwrap();
    }
    acks.await.unwrap()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

async fn idle_memory(count: usize, gateways: usize, bare: bool) {
    let stack = start_stack(gateways, &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: u64 = stack.pids.iter().map(|&p| rss_kib(p)).sum();
    let encoding = Encoding::MsgPack;
    let started = Instant::now();
    let url = stack.url.clone();
    let conns: Vec<Ws> = futures_util::stream::iter(0..count)
        .map(|i| {
            let url = url.clone();
            async move {
                let mut ws = connect(&url, encoding).await;
                if !bare {
                    call(
                        &mut ws,
                        encoding,
                        json!({"op": "login", "user": format!("idle{i}")}),
                    )
                    .await;
                    call(
                        &mut ws,
                        encoding,
                        json!({"op": "subscribe", "channel": format!("room{}", i % 100)}),
                    )
                    .await;
                }
                if (i + 1) % 1000 == 0 {
                    eprintln!(
                        "  {} connections open ({:.1}s)",
                        i + 1,
                        started.elapsed().as_secs_f64()
                    );
                }
                ws
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: u64 = stack.pids.iter().map(|&p| rss_kib(p)).sum();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / count as f64;
    let what = if bare {
        "connected only"
    } else {
        "logged in, 1 subscription each"
    };
    println!(
        "idle connections: {} ({what}) over {gateways} gateways",
        conns.len()
    );
    println!("gateway RSS: {before} KiB before, {after} KiB after: {per:.0} bytes per connection");
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(count) = args.idle {
        idle_memory(count, args.gateways, args.bare).await;
        return;
    }
    let encoding = match args.encoding.as_str() {
        "json" => Encoding::Json,
        "msgpack" => Encoding::MsgPack,
        other => panic!("--encoding: unknown {other:?}; use json or msgpack"),
    };
    let stack = args
        .url
        .is_none()
        .then(|| start_stack(args.gateways, &[("WRITE_DELAY", args.write_delay.as_str())]));
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| stack.as_ref().unwrap().url.clone());
    let total = args.rate * args.seconds;
    eprintln!("connecting {} subscribers to {url} ...", args.subscribers);
    let deadline = Instant::now() + Duration::from_secs(args.seconds + 60);
    let subscribers: Vec<_> = (0..args.subscribers)
        .map(|i| tokio::spawn(subscriber(url.clone(), encoding, i, total, deadline)))
        .collect();
    while READY.load(Ordering::Relaxed) < args.subscribers as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "publishing {total} messages at {} msg/s for {} s ...",
        args.rate, args.seconds
    );
    let started = Instant::now();
    let per_publisher = total / args.publishers as u64;
    let publishers: Vec<_> = (0..args.publishers)
        .map(|i| {
            tokio::spawn(publisher(
                url.clone(),
                i,
                args.rate as f64 / args.publishers as f64,
                per_publisher,
                args.size,
            ))
        })
        .collect();
    let mut acked = 0;
    for p in publishers {
        acked += p.await.unwrap();
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let expected = per_publisher * args.publishers as u64;
    let mut latencies = Vec::new();
    let (mut received, mut gaps, mut reordered) = (0u64, 0u64, 0u64);
    for s in subscribers {
        let report = s.await.unwrap();
        received += report.received;
        gaps += report.gaps;
        reordered += report.reordered;
        latencies.extend(report.latencies_us);
    }
    let total_secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let wanted = expected * args.subscribers as u64;
    println!(
        "published: {acked}/{expected} acked in {publish_secs:.1}s ({:.0} msg/s)",
        acked as f64 / publish_secs
    );
    println!(
        "delivered: {received}/{wanted} ({:.0} deliveries/s), lost {}, gaps {gaps}, reordered {reordered}",
        received as f64 / total_secs,
        wanted.saturating_sub(received)
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0)
    );
    drop(stack);
}
