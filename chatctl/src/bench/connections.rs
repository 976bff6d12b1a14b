//! `bench connections`: many idle connections. How fast they open (connect, log in,
//! subscribe), and what each costs the gateways and HAProxy in memory while held open.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::watch;

use super::histogram::{Latencies, Summary};
use super::procs::{self, Usage};
use super::progress::Progress;
use super::report::{latency_line, limits, processes, thousands};
use super::{BenchError, Setup, SetupInfo, TargetArgs, load, run_id};
use crate::client::{ConnectOptions, Target, connect};
use crate::procstat;

/// Options of `bench connections`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Connections to open.
    #[arg(long, env = "CHATCTL_BENCH_CONNECTIONS", default_value_t = 10_000)]
    connections: usize,
    /// Channels the connections subscribe to, spread evenly.
    #[arg(long, env = "CHATCTL_BENCH_CHANNELS", default_value_t = 100)]
    channels: usize,
    /// Only connect: no login, no subscription.
    #[arg(long)]
    bare: bool,
    /// Connections being opened at the same time.
    #[arg(long, env = "CHATCTL_BENCH_CONNECT_CONCURRENCY", default_value_t = 200)]
    concurrency: usize,
    /// How long to hold them open before measuring memory.
    #[arg(long, env = "CHATCTL_BENCH_HOLD", default_value = "3s", value_parser = humantime::parse_duration)]
    hold: Duration,
}

impl ConnectionsArgs {
    /// Whether to print JSON.
    pub fn json(&self) -> bool {
        self.target.json
    }
}

/// Memory of one server process, before and after the connections opened.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Process name.
    pub name: String,
    /// RSS before, MiB.
    pub before_mib: f64,
    /// RSS with the connections open, MiB.
    pub after_mib: f64,
    /// Growth divided by the connections it holds (all of them for HAProxy, its share for a
    /// gateway), in bytes.
    pub bytes_per_connection: f64,
}

/// The outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsReport {
    /// What was measured.
    pub setup: SetupInfo,
    /// Where connections went.
    pub path: String,
    /// Connections asked for.
    pub requested: usize,
    /// Connections open at the end.
    pub opened: usize,
    /// Failures by error (first 80 characters).
    pub failed: BTreeMap<String, u64>,
    /// Whether they logged in and subscribed.
    pub subscribed: bool,
    /// Seconds to open them all.
    pub open_seconds: f64,
    /// Connections opened per second.
    pub per_second: f64,
    /// Connect (+ login + subscribe) time per connection.
    pub setup_latency: Summary,
    /// Memory per process.
    pub memory: Vec<Memory>,
    /// Gateway memory growth per connection, all gateways together.
    pub gateway_bytes_per_connection: Option<f64>,
    /// CPU during the opening.
    pub processes: Vec<Usage>,
    /// Connections closed by the server while held.
    pub closed_while_held: u64,
}

/// Runs `bench connections`.
pub async fn run(args: &ConnectionsArgs) -> Result<ConnectionsReport, BenchError> {
    let mut progress = Progress::new(args.target.quiet);
    progress.say("connections: preparing the stack ...");
    let setup = Setup::prepare(&args.target, false, 0).await?;
    let result = measure(args, &setup, &mut progress).await;
    setup.finish().await;
    result
}

async fn measure(
    args: &ConnectionsArgs,
    setup: &Setup,
    progress: &mut Progress,
) -> Result<ConnectionsReport, BenchError> {
    let targets = setup.subscriber_targets(args.target.direct)?;
    let through_haproxy = targets.iter().any(|t| matches!(t, Target::Url(_)));
    setup.check_capacity(args.connections, through_haproxy)?;
    let sources = args.target.sources();
    let encoding = args.target.encoding.into();
    let id = run_id();
    let before: Vec<(String, u64)> = setup
        .servers
        .iter()
        .map(|(name, pid)| (name.clone(), procstat::rss_bytes(*pid).unwrap_or(0)))
        .collect();
    let latencies = Latencies::default();
    let (stop_tx, stop) = watch::channel(false);
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::channel::<()>(args.connections.max(1));
    let mut held = tokio::task::JoinSet::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let window = procs::Window::begin(&setup.servers);
    let started = Instant::now();
    let jwt = setup.jwt_secret.as_deref();
    let mut opening = futures_util::stream::iter(0..args.connections)
        .map(|i| {
            let target = &targets[i % targets.len()];
            let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            let user = format!("i{id}-{i}");
            let channel = format!("b{id}-{}", i % args.channels.max(1));
            let latencies = &latencies;
            async move {
                let t0 = Instant::now();
                let result = if args.bare {
                    let options = ConnectOptions {
                        token: None,
                        source: source.filter(|_| target.is_loopback()),
                    };
                    connect(target, encoding, &options)
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    load::open(target, source, encoding, jwt, &user, Some(&channel))
                        .await
                        .map(|(ws, _)| ws)
                };
                let mut recorder = latencies.recorder(i);
                recorder.record(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                result
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut done = 0usize;
    loop {
        tokio::select! {
            next = opening.next() => match next {
                Some(Ok(mut ws)) => {
                    done += 1;
                    let mut stop = stop.clone();
                    let closed = closed_tx.clone();
                    // Read (and drop) presence pushes while held, as a client would.
                    held.spawn(async move {
                        loop {
                            tokio::select! {
                                _ = stop.changed() => return ws,
                                message = ws.next() => if !matches!(message, Some(Ok(_))) || matches!(message, Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))) {
                                    let _ = closed.try_send(());
                                    let _ = stop.changed().await;
                                    return ws;
                                },
                            }
                        }
                    });
                }
                Some(Err(e)) => {
                    done += 1;
                    *failed.entry(e.chars().take(80).collect()).or_insert(0) += 1;
                }
                None => break,
            },
            _ = ticker.tick() => {
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                progress.show(done as f64 / args.connections as f64, &format!("opening {done}/{} ({rate:.0}/s)", args.connections));
            }
        }
    }
    drop(opening);
    let open_seconds = started.elapsed().as_secs_f64();
    let usage = window.end();
    progress.finish();
    progress.say(&format!(
        "holding {} connections for {:?} ...",
        held.len(),
        args.hold
    ));
    tokio::time::sleep(args.hold).await;
    let opened = held.len();
    let after: Vec<(String, u64)> = setup
        .servers
        .iter()
        .map(|(name, pid)| (name.clone(), procstat::rss_bytes(*pid).unwrap_or(0)))
        .collect();
    let _ = stop_tx.send(true);
    while held.join_next().await.is_some() {}
    drop(closed_tx);
    let mut closed_while_held = 0;
    while closed_rx.recv().await.is_some() {
        closed_while_held += 1;
    }
    let gateways = before
        .iter()
        .filter(|(n, _)| n.starts_with("gateway"))
        .count()
        .max(1);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let memory: Vec<Memory> = before
        .iter()
        .zip(&after)
        .filter(|((name, _), _)| name.starts_with("gateway") || name == "haproxy")
        .map(|((name, b), (_, a))| {
            let share = if name.starts_with("gateway") {
                opened as f64 / gateways as f64
            } else {
                opened as f64
            };
            Memory {
                name: name.clone(),
                before_mib: mib(*b),
                after_mib: mib(*a),
                bytes_per_connection: (*a as f64 - *b as f64) / share.max(1.0),
            }
        })
        .collect();
    let gateway_growth: f64 = memory
        .iter()
        .filter(|m| m.name.starts_with("gateway"))
        .map(|m| (m.after_mib - m.before_mib) * 1024.0 * 1024.0)
        .sum();
    let has_gateways = memory.iter().any(|m| m.name.starts_with("gateway"));
    Ok(ConnectionsReport {
        setup: setup.about.clone(),
        path: targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        requested: args.connections,
        opened,
        failed,
        subscribed: !args.bare,
        open_seconds,
        per_second: opened as f64 / open_seconds.max(1e-9),
        setup_latency: latencies.summary(),
        gateway_bytes_per_connection: has_gateways
            .then(|| gateway_growth / (opened as f64).max(1.0)),
        memory,
        processes: usage,
        closed_while_held,
    })
}

/// The summary table.
pub fn summary(r: &ConnectionsReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let what = if r.subscribed {
        "logged in, 1 subscription each"
    } else {
        "connected only"
    };
    let _ = writeln!(
        out,
        "\nconnections: {} requested ({what}) → {}",
        thousands(r.requested as u64),
        r.path
    );
    let _ = writeln!(out, "  stack        {}", r.setup.stack);
    let _ = writeln!(
        out,
        "  opened       {} in {:.1} s ({:.0}/s); failed {:?}; closed while held {}",
        thousands(r.opened as u64),
        r.open_seconds,
        r.per_second,
        r.failed,
        r.closed_while_held
    );
    let _ = writeln!(out, "  setup ms     {}", latency_line(&r.setup_latency));
    for m in &r.memory {
        let _ = writeln!(
            out,
            "  memory       {:<10} {:.1} → {:.1} MiB: {:.0} bytes per connection",
            m.name, m.before_mib, m.after_mib, m.bytes_per_connection
        );
    }
    if let Some(per) = r.gateway_bytes_per_connection {
        let _ = writeln!(out, "  gateways     {per:.0} bytes per idle connection");
    }
    out.push_str("  CPU while opening:\n");
    out.push_str(&processes(&r.processes));
    let _ = writeln!(out, "  limits       {}", limits(&r.setup));
    out
}
