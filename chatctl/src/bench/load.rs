//! The channel-load engine behind `bench fanout`, `rooms` and `latency`: N channels with M
//! subscribers each, publishers at a fixed rate per channel, every delivery checked.
//!
//! Subscribers connect first (each starts reading at once, so presence pushes never pile
//! up), then publishers send `<send time µs>:xxxx…` texts on a schedule. Each subscriber
//! marks the offsets it receives in a bitmap: a second arrival is a duplicate, an arrival
//! below the highest seen is out of order, and whatever is missing from the acknowledged
//! range at the end is lost. Latency is receive time minus the send time in the text (one
//! clock, one process).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chatcluster_protocol::Encoding;
use chatcluster_protocol::codec;
use chatcluster_protocol::frame::{RawRequest, RequestId, ServerFrame};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::histogram::{Latencies, Summary};
use super::procs::{self, Usage};
use super::progress::Progress;
use super::{BenchError, push};
use crate::client::{ConnectOptions, Target, Ws, connect, payload, request_message};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Channels.
    pub channels: usize,
    /// Subscribers of each channel (one connection each).
    pub subscribers_per_channel: usize,
    /// Messages per second published to each channel.
    pub rate_per_channel: f64,
    /// Publisher connections; channels are dealt out among them.
    pub publishers: usize,
    /// How long to publish.
    pub duration: Duration,
    /// Bytes of text per message.
    pub size: usize,
    /// Encoding of the subscribers (publishers use it too).
    pub encoding: Encoding,
    /// Where publishers connect (round robin).
    pub publish_targets: Vec<Target>,
    /// Where subscribers connect (round robin).
    pub subscribe_targets: Vec<Target>,
    /// Loopback source addresses for TCP connections (round robin); empty: the default.
    pub sources: Vec<IpAddr>,
    /// Connections being opened at the same time.
    pub connect_concurrency: usize,
    /// How long to wait for deliveries after the last publish.
    pub drain: Duration,
    /// Names channels and users of this run apart from any other.
    pub run_id: String,
    /// Sign a token per connection instead of `login` (gateways in `AUTH_MODE=jwt`).
    pub jwt_secret: Option<String>,
}

impl Plan {
    /// Subscriber connections in total.
    pub fn subscribers(&self) -> usize {
        self.channels * self.subscribers_per_channel
    }

    /// The channels each publisher serves and its rate. With at least as many channels as
    /// publishers, channels are dealt out; with fewer, publishers share them and the rate.
    pub fn assignments(&self) -> Vec<(Vec<usize>, f64)> {
        let publishers = self.publishers.max(1);
        if self.channels >= publishers {
            (0..publishers)
                .map(|p| {
                    let mine: Vec<usize> = (p..self.channels).step_by(publishers).collect();
                    let rate = self.rate_per_channel * mine.len() as f64;
                    (mine, rate)
                })
                .collect()
        } else {
            let rate = self.rate_per_channel * self.channels as f64 / publishers as f64;
            (0..publishers)
                .map(|p| (vec![p % self.channels], rate))
                .collect()
        }
    }

    fn channel(&self, index: usize) -> String {
        format!("b{}-{index}", self.run_id)
    }
}

/// What the coordinator tells each subscriber, through a queue of its own (a shared
/// watch or token would be polled under one lock by every subscriber for every message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Publishing ended; the expected ranges are known.
    Draining,
    Stop,
}

struct Shared {
    plan: Plan,
    epoch: Instant,
    latencies: Latencies,
    ack_latencies: Latencies,
    /// Highest acknowledged offset per channel.
    top: Vec<AtomicU64>,
    /// Channel offset when the run started (all subscribers subscribe before publishing).
    base: Vec<AtomicU64>,
    delivered: AtomicU64,
    complete: AtomicUsize,
}

impl Shared {
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// Offsets one subscriber has seen, as a bitmap above its subscribe offset.
#[derive(Debug, Default)]
struct Seen {
    base: u64,
    bits: Vec<u64>,
    unique: u64,
    highest: u64,
}

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    New,
    /// New, but below an offset already seen.
    OutOfOrder,
    Duplicate,
    /// At or below the subscribe offset: not ours.
    Unexpected,
}

impl Seen {
    fn new(base: u64, capacity: u64) -> Self {
        Self {
            base,
            bits: Vec::with_capacity(usize::try_from(capacity / 64 + 1).unwrap_or(0)),
            unique: 0,
            highest: base,
        }
    }

    fn mark(&mut self, offset: u64) -> Arrival {
        if offset <= self.base {
            return Arrival::Unexpected;
        }
        let Ok(index) = usize::try_from(offset - self.base - 1) else {
            return Arrival::Unexpected;
        };
        let (word, bit) = (index / 64, index % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            return Arrival::Duplicate;
        }
        self.bits[word] |= 1 << bit;
        self.unique += 1;
        if offset < self.highest {
            Arrival::OutOfOrder
        } else {
            self.highest = offset;
            Arrival::New
        }
    }

    /// How many of the offsets `base+1 ..= base+count` were seen.
    fn seen_within(&self, count: u64) -> u64 {
        let count = usize::try_from(count).unwrap_or(usize::MAX);
        let full = count / 64;
        let mut n: u64 = self
            .bits
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if let Some(word) = self.bits.get(full) {
            let rest = count % 64;
            if rest > 0 {
                n += u64::from((word & ((1u64 << rest) - 1)).count_ones());
            }
        }
        n
    }
}

/// One subscriber's account.
#[derive(Debug, Default)]
struct SubscriberStats {
    received: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    unexpected: u64,
    closed: Option<String>,
    last_us: u64,
}

/// The request-reply exchange used while setting up a connection.
async fn call(
    ws: &mut Ws,
    encoding: Encoding,
    id: i64,
    request: RawRequest,
) -> Result<Value, String> {
    let request = RawRequest {
        id: Some(RequestId::Int(id)),
        ..request
    };
    ws.send(request_message(encoding, &request))
        .await
        .map_err(|e| e.to_string())?;
    let wait = async {
        loop {
            let message = match ws.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("connection closed".to_owned()),
            };
            let Some(bytes) = payload(&message) else {
                continue;
            };
            match codec::decode::<ServerFrame<Value>>(encoding, bytes) {
                Ok(ServerFrame::Ok {
                    id: Some(RequestId::Int(got)),
                    data,
                    ..
                }) if got == id => return Ok(data),
                Ok(ServerFrame::Error {
                    id: Some(RequestId::Int(got)),
                    code,
                    message,
                    ..
                }) if got == id => return Err(format!("{message} ({code})")),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| "no reply within 30 s".to_owned())?
}

fn op(name: &str) -> RawRequest {
    RawRequest {
        op: Some(name.to_owned()),
        ..RawRequest::default()
    }
}

/// Connects as `user` (logging in, or with a token signed with `jwt_secret`), and subscribes
/// to `channel` if given; returns the socket and the channel's offset at subscription.
pub async fn open(
    target: &Target,
    source: Option<IpAddr>,
    encoding: Encoding,
    jwt_secret: Option<&str>,
    user: &str,
    channel: Option<&str>,
) -> Result<(Ws, u64), String> {
    let token = match jwt_secret {
        Some(secret) => Some(
            crate::token::mint(secret, user, Duration::from_secs(3600), None)
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let options = ConnectOptions {
        token: token.clone(),
        source: source.filter(|_| target.is_loopback()),
    };
    let mut ws = connect(target, encoding, &options)
        .await
        .map_err(|e| e.to_string())?;
    if token.is_none() {
        call(
            &mut ws,
            encoding,
            1,
            RawRequest {
                user: Some(user.to_owned()),
                ..op("login")
            },
        )
        .await?;
    }
    let mut offset = 0;
    if let Some(channel) = channel {
        let data = call(
            &mut ws,
            encoding,
            2,
            RawRequest {
                channel: Some(channel.to_owned()),
                ..op("subscribe")
            },
        )
        .await?;
        offset = data.get("offset").and_then(Value::as_u64).unwrap_or(0);
    }
    Ok((ws, offset))
}

impl Shared {
    async fn open(
        &self,
        target: &Target,
        source: Option<IpAddr>,
        user: &str,
        channel: Option<&str>,
    ) -> Result<(Ws, u64), String> {
        let plan = &self.plan;
        open(
            target,
            source,
            plan.encoding,
            plan.jwt_secret.as_deref(),
            user,
            channel,
        )
        .await
    }
}

async fn subscriber(
    shared: Arc<Shared>,
    index: usize,
    channel: usize,
    mut ws: Ws,
    base: u64,
    mut control: mpsc::Receiver<Phase>,
) -> SubscriberStats {
    let encoding = shared.plan.encoding;
    let expected_guess = (shared.plan.rate_per_channel * shared.plan.duration.as_secs_f64()) as u64;
    let mut seen = Seen::new(base, expected_guess);
    let mut stats = SubscriberStats::default();
    let mut recorder = shared.latencies.recorder(index);
    let mut draining = false;
    let mut unreported = 0u64;
    let mut complete = false;
    let target_of = |shared: &Shared| {
        shared.top[channel]
            .load(Ordering::Relaxed)
            .saturating_sub(base)
    };
    loop {
        if draining && !complete && seen.seen_within(target_of(&shared)) >= target_of(&shared) {
            complete = true;
            shared.complete.fetch_add(1, Ordering::Relaxed);
        }
        let message = tokio::select! {
            // Frames first: the control queue is looked at only when the socket has nothing.
            biased;
            message = ws.next() => message,
            phase = control.recv() => match phase {
                Some(Phase::Draining) => {
                    draining = true;
                    continue;
                }
                Some(Phase::Stop) | None => break,
            },
        };
        let message = match message {
            Some(Ok(Message::Close(frame))) => {
                stats.closed = Some(frame.map_or_else(
                    || "closed".to_owned(),
                    |f| format!("{} {}", u16::from(f.code), f.reason),
                ));
                break;
            }
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                stats.closed = Some(e.to_string());
                break;
            }
            None => {
                stats.closed = Some("connection closed".to_owned());
                break;
            }
        };
        let Some(push) = payload(&message).and_then(|bytes| push::parse(encoding, bytes)) else {
            continue;
        };
        let now = shared.now_us();
        let arrival = seen.mark(push.offset);
        match arrival {
            Arrival::New | Arrival::OutOfOrder => {
                if arrival == Arrival::OutOfOrder {
                    stats.out_of_order += 1;
                }
                recorder.record(now.saturating_sub(push.sent_us));
                stats.received += 1;
                stats.last_us = now;
                unreported += 1;
                if unreported == 64 {
                    shared.delivered.fetch_add(unreported, Ordering::Relaxed);
                    unreported = 0;
                }
            }
            Arrival::Duplicate => stats.duplicated += 1,
            Arrival::Unexpected => stats.unexpected += 1,
        }
        if draining && !complete && seen.seen_within(target_of(&shared)) >= target_of(&shared) {
            complete = true;
            shared.complete.fetch_add(1, Ordering::Relaxed);
        }
    }
    shared.delivered.fetch_add(unreported, Ordering::Relaxed);
    let expected = target_of(&shared);
    stats.lost = expected.saturating_sub(seen.seen_within(expected));
    stats
}

/// What publishing achieved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Published {
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged (`ok`).
    pub acked: u64,
    /// Error replies, by code.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Messages acknowledged per second, from the first publish to the last acknowledgement.
    pub per_second: f64,
    /// Publish → acknowledgement.
    pub ack_latency: Summary,
}

/// What one publisher did: sent, acknowledged, errors by code, and when it sent its last
/// message (µs since the run's start).
type PublisherResult = (u64, u64, std::collections::BTreeMap<String, u64>, u64);

async fn publisher(
    shared: Arc<Shared>,
    ws: Ws,
    channels: Vec<usize>,
    rate: f64,
) -> PublisherResult {
    let plan = &shared.plan;
    let names: Vec<String> = channels.iter().map(|&c| plan.channel(c)).collect();
    let total = (rate * plan.duration.as_secs_f64()).round() as u64;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let encoding = plan.encoding;
    let (mut sink, mut stream) = ws.split();
    let reader = {
        let shared = shared.clone();
        let sent_at = sent_at.clone();
        let channels = channels.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            let mut errors = std::collections::BTreeMap::new();
            let mut recorder = shared.ack_latencies.recorder(0);
            while acked + errors.values().sum::<u64>() < total {
                let Some(Ok(message)) = stream.next().await else {
                    break;
                };
                let Some(bytes) = payload(&message) else {
                    continue;
                };
                match codec::decode::<ServerFrame<Value>>(encoding, bytes) {
                    Ok(ServerFrame::Ok {
                        id: Some(RequestId::Int(id)),
                        data,
                        ..
                    }) => {
                        let Ok(n) = usize::try_from(id) else { continue };
                        let channel = channels[n % channels.len()];
                        let offset = data.get("offset").and_then(Value::as_u64).unwrap_or(0);
                        shared.top[channel].fetch_max(offset, Ordering::Relaxed);
                        if let Some(at) = sent_at.get(n) {
                            recorder
                                .record(shared.now_us().saturating_sub(at.load(Ordering::Relaxed)));
                        }
                        acked += 1;
                    }
                    Ok(ServerFrame::Error { code, .. }) => {
                        *errors.entry(code.to_string()).or_insert(0) += 1
                    }
                    _ => {}
                }
            }
            (acked, errors)
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
    let start = tokio::time::Instant::now();
    let mut text = String::with_capacity(plan.size + 24);
    let mut sent = 0u64;
    'publish: while sent < total {
        let due = ((start.elapsed().as_secs_f64() / interval.as_secs_f64()) as u64 + 1).min(total);
        while sent < due {
            let now = shared.now_us();
            push::text(now, plan.size, &mut text);
            let n = usize::try_from(sent).unwrap_or(usize::MAX);
            if let Some(at) = sent_at.get(n) {
                at.store(now, Ordering::Relaxed);
            }
            let request = RawRequest {
                id: Some(RequestId::Int(i64::try_from(sent).unwrap_or(i64::MAX))),
                channel: Some(names[n % names.len()].clone()),
                text: Some(text.clone()),
                ..op("publish")
            };
            if sink
                .feed(request_message(encoding, &request))
                .await
                .is_err()
            {
                break 'publish;
            }
            sent += 1;
        }
        if sink.flush().await.is_err() {
            break;
        }
        tokio::time::sleep_until(start + interval.mul_f64(sent as f64)).await;
    }
    let _ = sink.flush().await;
    let last_sent_us = shared.now_us();
    let (acked, errors) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    (sent, acked, errors, last_sent_us)
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Subscriber connections.
    pub subscribers: usize,
    /// Seconds taken to connect, log in and subscribe them all.
    pub connect_seconds: f64,
    /// Publishing.
    pub published: Published,
    /// Deliveries expected: acknowledged messages × subscribers of their channel.
    pub expected: u64,
    /// Deliveries received (each offset once per subscriber).
    pub delivered: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Second arrivals of an offset.
    pub duplicated: u64,
    /// Arrivals below an offset already seen.
    pub out_of_order: u64,
    /// Deliveries per second, from the first publish to the last delivery.
    pub deliveries_per_second: f64,
    /// Time from the last publish to the last delivery (how far deliveries lagged behind).
    pub drain_seconds: f64,
    /// Publish → delivery.
    pub latency: Summary,
    /// Subscribers closed by the server, by reason (`1008 slow reader…`).
    pub closed: std::collections::BTreeMap<String, u64>,
    /// CPU and memory per process over the measured window.
    pub processes: Vec<Usage>,
}

/// Runs `plan`, measuring `servers` (name, pid).
pub async fn run(
    plan: Plan,
    servers: &[(String, u32)],
    progress: &mut Progress,
) -> Result<LoadReport, BenchError> {
    if plan.subscribe_targets.is_empty() || plan.publish_targets.is_empty() || plan.channels == 0 {
        return Err(BenchError::Invalid("nothing to connect to".to_owned()));
    }
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        latencies: Latencies::default(),
        ack_latencies: Latencies::default(),
        top: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        base: (0..plan.channels).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicU64::new(0),
        complete: AtomicUsize::new(0),
        plan,
    });
    let plan = &shared.plan;
    let total = plan.subscribers();

    // 1. Subscribers, each reading as soon as it is subscribed.
    let connect_started = Instant::now();
    let opened = AtomicUsize::new(0);
    let mut readers = tokio::task::JoinSet::new();
    let mut controls: Vec<mpsc::Sender<Phase>> = Vec::with_capacity(total);
    let tell = |controls: &[mpsc::Sender<Phase>], phase: Phase| {
        for control in controls {
            let _ = control.try_send(phase);
        }
    };
    let mut failures = Vec::new();
    {
        let mut connecting = futures_util::stream::iter(0..total)
            .map(|i| {
                let shared = shared.clone();
                let opened = &opened;
                async move {
                    let channel = i % shared.plan.channels;
                    let target =
                        &shared.plan.subscribe_targets[i % shared.plan.subscribe_targets.len()];
                    let source = (!shared.plan.sources.is_empty())
                        .then(|| shared.plan.sources[i % shared.plan.sources.len()]);
                    let user = format!("s{}-{i}", shared.plan.run_id);
                    let result = shared
                        .open(target, source, &user, Some(&shared.plan.channel(channel)))
                        .await;
                    opened.fetch_add(1, Ordering::Relaxed);
                    (i, channel, result)
                }
            })
            .buffer_unordered(plan.connect_concurrency.max(1));
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                next = connecting.next() => match next {
                    Some((i, channel, Ok((ws, base)))) => {
                        shared.base[channel].store(base, Ordering::Relaxed);
                        let (control, listen) = mpsc::channel(2);
                        controls.push(control);
                        readers.spawn(subscriber(shared.clone(), i, channel, ws, base, listen));
                    }
                    Some((i, _, Err(e))) => failures.push(format!("subscriber {i}: {e}")),
                    None => break,
                },
                _ = ticker.tick() => {
                    let n = opened.load(Ordering::Relaxed);
                    progress.show(n as f64 / total as f64, &format!("connecting subscribers {n}/{total}"));
                }
            }
        }
    }
    if let Some(first) = failures.first() {
        tell(&controls, Phase::Stop);
        return Err(BenchError::Connect(format!(
            "{} of {total} subscribers failed; first: {first}",
            failures.len()
        )));
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    progress.say(&format!(
        "{total} subscribers connected in {connect_seconds:.1} s"
    ));

    // 2. Publishers.
    let mut publishers = Vec::new();
    for (p, (channels, rate)) in plan.assignments().into_iter().enumerate() {
        let target = &plan.publish_targets[p % plan.publish_targets.len()];
        let source = (!plan.sources.is_empty()).then(|| plan.sources[p % plan.sources.len()]);
        let (ws, _) = shared
            .open(target, source, &format!("p{}-{p}", plan.run_id), None)
            .await
            .map_err(|e| BenchError::Connect(format!("publisher {p}: {e}")))?;
        publishers.push((ws, channels, rate));
    }

    // 3. Publish, measuring.
    let mut window = procs::Window::begin(servers);
    let publish_started_us = shared.now_us();
    let publish_started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (ws, channels, rate) in publishers {
        running.spawn(publisher(shared.clone(), ws, channels, rate));
    }
    let mut published = Published::default();
    let mut last_sent_us = publish_started_us;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let duration = plan.duration.as_secs_f64();
    loop {
        tokio::select! {
            done = running.join_next() => match done {
                Some(Ok((sent, acked, errors, last))) => {
                    last_sent_us = last_sent_us.max(last);
                    published.sent += sent;
                    published.acked += acked;
                    for (code, n) in errors {
                        *published.errors.entry(code).or_insert(0) += n;
                    }
                }
                Some(Err(e)) => return Err(BenchError::Invalid(format!("a publisher failed: {e}"))),
                None => break,
            },
            _ = ticker.tick() => {
                window.sample_peaks();
                let elapsed = publish_started.elapsed().as_secs_f64();
                let delivered = shared.delivered.load(Ordering::Relaxed);
                let latency = shared.latencies.summary();
                progress.show(elapsed / duration, &format!(
                    "publishing {elapsed:.0}/{duration:.0} s  delivered {}  ({:.0}/s)  p99 {:.1} ms",
                    delivered, delivered as f64 / elapsed.max(1e-3), latency.p99_ms
                ));
            }
        }
    }
    let publish_seconds = publish_started.elapsed().as_secs_f64();
    published.per_second = published.acked as f64 / publish_seconds.max(1e-9);
    published.ack_latency = shared.ack_latencies.summary();

    // 4. Drain: wait until every subscriber has its whole acknowledged range, or the deadline.
    tell(&controls, Phase::Draining);
    let drain_deadline = Instant::now() + plan.drain;
    let subscribers = readers.len();
    while shared.complete.load(Ordering::Relaxed) < subscribers && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        window.sample_peaks();
        let done = shared.complete.load(Ordering::Relaxed);
        progress.show(
            1.0,
            &format!("draining: {done}/{subscribers} subscribers have everything"),
        );
    }
    tell(&controls, Phase::Stop);
    let processes = window.end();
    progress.finish();

    let mut report = LoadReport {
        subscribers: total,
        connect_seconds,
        published,
        expected: 0,
        delivered: 0,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        deliveries_per_second: 0.0,
        drain_seconds: 0.0,
        latency: shared.latencies.summary(),
        closed: std::collections::BTreeMap::new(),
        processes,
    };
    let mut last_us = publish_started_us;
    while let Some(done) = readers.join_next().await {
        let Ok(stats) = done else { continue };
        report.delivered += stats.received;
        report.lost += stats.lost;
        report.duplicated += stats.duplicated;
        report.out_of_order += stats.out_of_order;
        last_us = last_us.max(stats.last_us);
        if let Some(reason) = stats.closed {
            *report.closed.entry(reason).or_insert(0) += 1;
        }
    }
    report.latency = shared.latencies.summary();
    for channel in 0..plan.channels {
        let acked_range = shared.top[channel]
            .load(Ordering::Relaxed)
            .saturating_sub(shared.base[channel].load(Ordering::Relaxed));
        report.expected += acked_range * plan.subscribers_per_channel as u64;
    }
    let span = (last_us.saturating_sub(publish_started_us)) as f64 / 1e6;
    report.deliveries_per_second = report.delivered as f64 / span.max(1e-9);
    report.drain_seconds = last_us.saturating_sub(last_sent_us) as f64 / 1e6;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_dealt_to_publishers() {
        let plan = |channels, publishers| Plan {
            channels,
            subscribers_per_channel: 1,
            rate_per_channel: 10.0,
            publishers,
            duration: Duration::from_secs(1),
            size: 64,
            encoding: Encoding::Json,
            publish_targets: Vec::new(),
            subscribe_targets: Vec::new(),
            sources: Vec::new(),
            connect_concurrency: 1,
            drain: Duration::from_secs(1),
            run_id: "t".into(),
            jwt_secret: None,
        };
        let dealt = plan(5, 2).assignments();
        assert_eq!(dealt, vec![(vec![0, 2, 4], 30.0), (vec![1, 3], 20.0)]);
        let shared = plan(1, 4).assignments();
        assert_eq!(shared, vec![(vec![0], 2.5); 4]);
    }

    #[test]
    fn seen_classifies_arrivals() {
        let mut seen = Seen::new(10, 100);
        assert_eq!(seen.mark(11), Arrival::New);
        assert_eq!(seen.mark(13), Arrival::New);
        assert_eq!(seen.mark(12), Arrival::OutOfOrder);
        assert_eq!(seen.mark(13), Arrival::Duplicate);
        assert_eq!(seen.mark(10), Arrival::Unexpected);
        assert_eq!(seen.mark(200), Arrival::New);
        assert_eq!(seen.unique, 4);
        assert_eq!(seen.seen_within(3), 3);
        assert_eq!(seen.seen_within(5), 3);
        assert_eq!(seen.seen_within(190), 4);
        assert_eq!(seen.seen_within(0), 0);
    }
}
