//! Hostile clients against the real layout (redis-server, two gateway
//! processes on Unix sockets, HAProxy in front), while well-behaved clients
//! chat: one client floods every op, one sends oversize frames and garbage
//! (WebSocket and raw TCP), one opens connections until refused, one
//! subscribes to thousands of channels. The well-behaved clients must lose
//! nothing and keep their p99 latency within 2× of their unloaded figure; the
//! gateways' memory must stay bounded (the peak is printed).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatcluster_protocol::codec::{self, Encoding};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// Well-behaved subscribers of the calm channel.
const SUBSCRIBERS: usize = 12;
/// Well-behaved publishers and their rate each (messages per second).
const PUBLISHERS: usize = 2;
const PUBLISH_EVERY: Duration = Duration::from_millis(40);
/// Measurement windows.
const CALM: Duration = Duration::from_secs(8);
const STORM: Duration = Duration::from_secs(8);
/// Pace of the garbage client's rounds (two WebSocket connections and one raw
/// TCP connection each): the attacker runs on the same two cores as the
/// gateways, so an unpaced loop would measure the test machine, not them.
const GARBAGE_EVERY: Duration = Duration::from_millis(20);
/// Connections each gateway accepts (the opener fills them).
const MAX_CONNECTIONS: usize = 1200;
/// p99 figures below this are scheduler noise on a shared two-core machine
/// (the calm p99 alone ranges from 4 to 17 ms there while other builds run);
/// the 2× bound is taken against at least this.
const LATENCY_FLOOR_MS: f64 = 10.0;
/// Most resident memory one gateway may reach (MiB).
const MEMORY_BOUND_MIB: u64 = 400;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str, encoding: Encoding) -> Result<Ws, tungstenite::Error> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        encoding.subprotocol().parse().unwrap(),
    );
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

fn frame(encoding: Encoding, value: &Value) -> Message {
    let bytes = codec::encode(encoding, value);
    match encoding {
        Encoding::Json => Message::Text(String::from_utf8(bytes.to_vec()).unwrap().into()),
        Encoding::MsgPack => Message::Binary(bytes),
    }
}

fn decode(encoding: Encoding, message: &Message) -> Option<Value> {
    match message {
        Message::Text(text) => codec::decode(encoding, text.as_bytes()).ok(),
        Message::Binary(bytes) => codec::decode(encoding, bytes).ok(),
        _ => None,
    }
}

fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn p99(mut samples: Vec<u64>) -> f64 {
    assert!(!samples.is_empty(), "no latency samples");
    samples.sort_unstable();
    let index = ((samples.len() as f64) * 0.99).ceil() as usize - 1;
    samples[index.min(samples.len() - 1)] as f64 / 1000.0
}

/// Latencies (µs) of one phase, and every offset each subscriber received.
#[derive(Default)]
struct Observed {
    calm: Vec<u64>,
    storm: Vec<u64>,
    offsets: Vec<Vec<u64>>,
}

/// The measuring phase: 0 calm, 1 storm, 2 done.
static PHASE: AtomicU64 = AtomicU64::new(0);

async fn well_behaved_subscriber(
    url: String,
    index: usize,
    observed: Arc<Mutex<Observed>>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) {
    let encoding = if index.is_multiple_of(2) {
        Encoding::MsgPack
    } else {
        Encoding::Json
    };
    let mut client = login(&url, encoding, &format!("calm{index}")).await;
    client
        .ok(json!({"op": "subscribe", "channel": "calm"}))
        .await;
    ready.send(()).await.unwrap();
    let mut offsets = Vec::new();
    let (mut calm, mut storm) = (Vec::new(), Vec::new());
    // After `stop` (set once the publishers are done), read until a silence.
    loop {
        let Some(frame) = client.push_of("message", Duration::from_secs(2)).await else {
            if stop.load(Ordering::Acquire) {
                break;
            }
            continue;
        };
        offsets.push(frame["offset"].as_u64().unwrap());
        let text = frame["text"].as_str().unwrap();
        let (phase, sent) = text.split_once(':').unwrap();
        let latency = micros_now().saturating_sub(sent.parse().unwrap());
        match phase {
            "0" => calm.push(latency),
            "1" => storm.push(latency),
            _ => {}
        }
    }
    let mut observed = observed.lock().await;
    observed.calm.extend(calm);
    observed.storm.extend(storm);
    observed.offsets.push(offsets);
}

/// Publishes at a steady pace until `stop`; returns the offsets acknowledged.
async fn well_behaved_publisher(url: String, index: usize, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut client = login(&url, Encoding::MsgPack, &format!("speaker{index}")).await;
    let mut acked = Vec::new();
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let phase = PHASE.load(Ordering::Acquire);
        let text = format!("{phase}:{}", micros_now());
        let reply = client
            .ok(json!({"op": "publish", "channel": "calm", "text": text}))
            .await;
        acked.push(reply["offset"].as_u64().unwrap());
    }
    acked
}

/// What the flooder got: replies by outcome, and how long it flooded.
struct Flood {
    ok: u64,
    refused: u64,
    seconds: f64,
}

/// Sends every op as fast as the socket takes them, never waiting for a
/// reply (a reader drains them); counts replies by outcome.
async fn flooder(url: String, stop: Arc<AtomicBool>) -> Flood {
    let started = Instant::now();
    let ws = open(&url, Encoding::Json).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let refused = Arc::new(AtomicU64::new(0));
    let succeeded = Arc::new(AtomicU64::new(0));
    let reader = {
        let (refused, succeeded) = (refused.clone(), succeeded.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Some(value) = decode(Encoding::Json, &message) {
                    match value["type"].as_str() {
                        Some("ok") => succeeded.fetch_add(1, Ordering::Relaxed),
                        Some("error") => refused.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            }
        })
    };
    let user = "flood";
    let ops = [
        json!({"op": "login", "user": user}),
        json!({"op": "ping"}),
        json!({"op": "users"}),
        json!({"op": "channels"}),
        json!({"op": "channel", "channel": "flood"}),
        json!({"op": "subscribe", "channel": "flood"}),
        json!({"op": "presence", "channel": "flood"}),
        json!({"op": "history", "channel": "flood"}),
        json!({"op": "unsubscribe", "channel": "flood"}),
        json!({"op": "publish", "channel": "flood", "text": "spam"}),
        json!({"op": "message", "to": user, "text": "spam"}),
        json!({"op": "refresh", "token": "x"}),
    ];
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut op = ops[(n as usize) % ops.len()].clone();
        op["id"] = json!(n);
        n += 1;
        let sent = tokio::time::timeout(
            Duration::from_millis(200),
            sink.send(frame(Encoding::Json, &op)),
        )
        .await;
        if matches!(sent, Ok(Err(_))) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    reader.abort();
    Flood {
        ok: succeeded.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// What the garbage client saw.
#[derive(Debug, Default)]
struct Garbage {
    too_big: u64,
    malformed: u64,
    refused: u64,
    raw_closed: u64,
}

/// One round: an oversize frame, 20 malformed frames, raw bytes to HAProxy.
async fn garbage_round(url: &str, port: u16, seen: &mut Garbage) {
    match open(url, Encoding::Json).await {
        Ok(mut ws) => {
            let _ = ws.send(Message::Text("x".repeat(100 * 1024).into())).await;
            if close_code(&mut ws).await == Some(1009) {
                seen.too_big += 1;
            }
        }
        Err(_) => seen.refused += 1,
    }
    match open(url, Encoding::MsgPack).await {
        Ok(mut ws) => {
            for i in 0..20u8 {
                let _ = ws.send(Message::Binary(vec![0xc1, i, 0xff].into())).await;
            }
            if close_code(&mut ws).await == Some(1008) {
                seen.malformed += 1;
            }
        }
        Err(_) => seen.refused += 1,
    }
    if let Ok(mut raw) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        let _ = raw
            .write_all(b"\x16\x03\x01\xff\xffGARBAGE\r\n\r\n\x00\x01")
            .await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
        if matches!(read, Ok(Ok(_)) | Ok(Err(_))) {
            seen.raw_closed += 1;
        }
    }
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(message)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        ws.next(),
    )
    .await
    {
        match message {
            Ok(Message::Close(Some(frame))) => return Some(u16::from(frame.code)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Opens connections until one is refused; holds them until `stop`.
async fn opener(url: String, stop: Arc<AtomicBool>) -> (usize, Option<u16>, u64) {
    // One user first: refused at login past MAX_USER_CONNECTIONS.
    let mut held = Vec::new();
    let mut user_limited = 0;
    for _ in 0..30 {
        let mut client = connect(&url, Encoding::Json).await;
        let reply = client.request(json!({"op": "login", "user": "hog"})).await;
        if reply["code"] == "limit_exceeded" {
            user_limited += 1;
        }
        held.push(client);
    }
    let mut bare = Vec::new();
    let mut refusal = None;
    for _ in 0..(MAX_CONNECTIONS * 2 + 500) {
        match open(&url, Encoding::Json).await {
            Ok(ws) => bare.push(ws),
            Err(tungstenite::Error::Http(response)) => {
                refusal = Some(response.status().as_u16());
                break;
            }
            Err(other) => panic!("connection failed otherwise: {other}"),
        }
    }
    let opened = held.len() + bare.len();
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (opened, refusal, user_limited)
}

/// Pipelines subscribes to thousands of channels until `stop`; counts the outcomes.
async fn greedy(url: String, stop: Arc<AtomicBool>) -> (u64, u64) {
    let ws = open(&url, Encoding::MsgPack).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    sink.send(frame(
        Encoding::MsgPack,
        &json!({"op": "login", "user": "greedy", "id": -1}),
    ))
    .await
    .unwrap();
    const WANTED: u64 = 5000;
    let writer = tokio::spawn(async move {
        for n in 0..WANTED {
            let request = json!({"op": "subscribe", "channel": format!("g{n}"), "id": n});
            if sink.send(frame(Encoding::MsgPack, &request)).await.is_err() {
                break;
            }
        }
        sink
    });
    let (mut ok, mut refused) = (0, 0);
    while ok + refused < WANTED && !stop.load(Ordering::Acquire) {
        let Ok(next) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await else {
            continue;
        };
        let Some(Ok(message)) = next else {
            break;
        };
        let Some(value) = decode(Encoding::MsgPack, &message) else {
            continue;
        };
        if value["id"].as_i64().is_none_or(|id| id < 0) {
            continue;
        }
        match value["type"].as_str() {
            Some("ok") => ok += 1,
            Some("error") => refused += 1,
            _ => {}
        }
    }
    writer.abort();
    (ok, refused)
}

/// What the attackers saw.
struct Storm {
    flood: Flood,
    opened: usize,
    refusal: Option<u16>,
    user_limited: u64,
    garbage: Garbage,
    greedy_ok: u64,
    greedy_refused: u64,
}

/// Runs every attacker until `stop`.
async fn storm(url: String, port: u16, stop: Arc<AtomicBool>) -> Storm {
    let flooder = tokio::spawn(flooder(url.clone(), stop.clone()));
    let greedy = tokio::spawn(greedy(url.clone(), stop.clone()));
    // One garbage round before the opener takes every connection slot.
    let mut garbage = Garbage::default();
    garbage_round(&url, port, &mut garbage).await;
    let opener = tokio::spawn(opener(url.clone(), stop.clone()));
    let mut pace = tokio::time::interval(GARBAGE_EVERY);
    while !stop.load(Ordering::Acquire) {
        pace.tick().await;
        garbage_round(&url, port, &mut garbage).await;
    }
    let (opened, refusal, user_limited) = opener.await.unwrap();
    let (greedy_ok, greedy_refused) = greedy.await.unwrap();
    Storm {
        flood: flooder.await.unwrap(),
        opened,
        refusal,
        user_limited,
        garbage,
        greedy_ok,
        greedy_refused,
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_well_behaved_ones() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let sockets: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("gateway-{i}.sock")))
        .collect();
    let gateways: Vec<Gateway> = sockets
        .iter()
        .map(|socket| {
            Gateway::start(
                &redis.url(),
                GatewayOptions::default()
                    .socket(socket.clone())
                    .env("MAX_CONNECTIONS", &MAX_CONNECTIONS.to_string())
                    .env("MAX_USER_CONNECTIONS", "10"),
            )
        })
        .collect();
    let haproxy = Haproxy::start(&sockets);
    let url = haproxy.ws_url();
    let pids: Vec<u32> = gateways.iter().map(Gateway::pid).collect();
    let baseline: Vec<u64> = pids.iter().map(|&pid| rss_kib(pid, "VmRSS:")).collect();

    // Well-behaved clients.
    let observed = Arc::new(Mutex::new(Observed::default()));
    let stop_publishers = Arc::new(AtomicBool::new(false));
    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(SUBSCRIBERS);
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|i| {
            tokio::spawn(well_behaved_subscriber(
                url.clone(),
                i,
                observed.clone(),
                ready_tx.clone(),
                stop_subscribers.clone(),
            ))
        })
        .collect();
    for _ in 0..SUBSCRIBERS {
        ready_rx.recv().await.unwrap();
    }
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            tokio::spawn(well_behaved_publisher(
                url.clone(),
                i,
                stop_publishers.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(CALM).await;

    // The storm.
    PHASE.store(1, Ordering::Release);
    let stop_storm = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pids, peak, stop) = (pids.clone(), peak_rss.clone(), stop_storm.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                for &pid in &pids {
                    peak.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The attackers run on their own runtime and thread: on a separate
    // machine in real life, they must not delay the well-behaved clients'
    // tasks inside this test process (only compete for the CPU).
    let storm = {
        let (url, port, stop) = (url.clone(), haproxy.port(), stop_storm.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
                .block_on(storm(url, port, stop))
        })
    };
    tokio::time::sleep(STORM).await;
    let storm_ended = Instant::now();
    PHASE.store(2, Ordering::Release);
    stop_publishers.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for publisher in publishers {
        acked.extend(publisher.await.unwrap());
    }
    stop_storm.store(true, Ordering::Release);
    // Subscribers read on until two seconds pass without a message.
    stop_subscribers.store(true, Ordering::Release);
    for subscriber in subscribers {
        subscriber.await.unwrap();
    }
    let storm = storm.join().unwrap();
    let (flood, garbage) = (&storm.flood, &storm.garbage);
    let (greedy_ok, greedy_refused) = (storm.greedy_ok, storm.greedy_refused);
    let (opened, refusal, user_limited) = (storm.opened, storm.refusal, storm.user_limited);
    sampler.await.unwrap();
    println!(
        "hostile clients stopped {:?} after the storm",
        storm_ended.elapsed()
    );
    let peak_hwm: Vec<u64> = pids.iter().map(|&pid| rss_kib(pid, "VmHWM:")).collect();

    let observed = observed.lock().await;
    let (calm_p99, storm_p99) = (p99(observed.calm.clone()), p99(observed.storm.clone()));
    println!(
        "well-behaved: {} subscribers, {} messages published; p99 calm {calm_p99:.2} ms \
         ({} samples), under attack {storm_p99:.2} ms ({} samples)",
        SUBSCRIBERS,
        acked.len(),
        observed.calm.len(),
        observed.storm.len()
    );
    println!(
        "flooder: {} ops answered ok, {} refused in {:.1} s; greedy: {greedy_ok} subscribed, \
         {greedy_refused} refused; opener: {opened} connections then HTTP {refusal:?} \
         ({user_limited} logins over MAX_USER_CONNECTIONS); garbage: {garbage:?}",
        flood.ok, flood.refused, flood.seconds
    );
    println!(
        "gateway memory: baseline RSS {baseline:?} KiB, peak sampled {} KiB, VmHWM {peak_hwm:?} KiB",
        peak_rss.load(Ordering::Relaxed)
    );

    // Nothing lost: every subscriber got every acknowledged message, in order, once.
    acked.sort_unstable();
    for offsets in &observed.offsets {
        assert_eq!(
            offsets, &acked,
            "a well-behaved subscriber lost or reordered messages"
        );
    }
    assert!(
        storm_p99 <= 2.0 * calm_p99.max(LATENCY_FLOOR_MS),
        "p99 under attack {storm_p99:.2} ms is more than 2x the calm {calm_p99:.2} ms"
    );
    // The hostile clients were stopped by the limits. Every answer the
    // flooder got was paid from its op budget (OP_RATE 200/s, burst 400) or,
    // for a publish or message accepted, from its message bucket (100/s, 200).
    let budget = (400.0 + 200.0 * flood.seconds) + (200.0 + 100.0 * flood.seconds);
    assert!(
        ((flood.ok + flood.refused) as f64) <= budget,
        "the flooder got more than its budget allows"
    );
    assert!(
        greedy_ok <= 256 && greedy_refused > 0,
        "subscriptions bounded"
    );
    assert_eq!(
        refusal,
        Some(503),
        "connections beyond MAX_CONNECTIONS refused"
    );
    assert!(opened <= MAX_CONNECTIONS * 2);
    assert!(user_limited > 0, "MAX_USER_CONNECTIONS applied");
    assert!(garbage.too_big >= 1 && garbage.malformed >= 1 && garbage.raw_closed >= 1);
    let peak_mib = peak_hwm.iter().max().unwrap() / 1024;
    assert!(
        peak_mib < MEMORY_BOUND_MIB,
        "gateway peak RSS {peak_mib} MiB over {MEMORY_BOUND_MIB} MiB"
    );
}
