//! `bench fanout`, `bench rooms` and `bench latency`: three shapes of the same channel load.
//!
//! * fanout: one channel, many subscribers, one publisher (the delivery-core method: 1,000
//!   JSON subscribers over 2 gateways behind HAProxy on Unix sockets, 64-byte texts, 20 s);
//! * rooms: the usual chat, many channels of a few members, each channel at its own rate;
//! * latency: publisher on one gateway, subscribers on another, at a low rate.

use std::time::Duration;

use serde::Serialize;

use super::load::{self, LoadReport, Plan};
use super::procs;
use super::progress::Progress;
use super::{BenchError, Setup, SetupInfo, TargetArgs, run_id};
use crate::client::Target;

/// Options every channel-load benchmark has.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// How long to publish.
    #[arg(long, env = "CHATCTL_BENCH_DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Bytes of text per message.
    #[arg(long, env = "CHATCTL_BENCH_SIZE", default_value_t = 64)]
    pub size: usize,
    /// After the last publish, how long to wait for missing deliveries.
    #[arg(long, env = "CHATCTL_BENCH_DRAIN", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Connections opened at the same time while connecting.
    #[arg(long, env = "CHATCTL_BENCH_CONNECT_CONCURRENCY", default_value_t = 100)]
    pub connect_concurrency: usize,
}

/// `bench fanout`.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Subscribers of the one channel.
    #[arg(long, env = "CHATCTL_BENCH_SUBSCRIBERS", default_value_t = 1000)]
    subscribers: usize,
    /// Messages per second.
    #[arg(long, env = "CHATCTL_BENCH_RATE", default_value_t = 1000.0)]
    rate: f64,
    /// Publisher connections sharing the rate.
    #[arg(long, env = "CHATCTL_BENCH_PUBLISHERS", default_value_t = 1)]
    publishers: usize,
}

/// `bench rooms`.
#[derive(Debug, Clone, clap::Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Channels.
    #[arg(long, env = "CHATCTL_BENCH_CHANNELS", default_value_t = 1000)]
    channels: usize,
    /// Subscribers per channel.
    #[arg(long, env = "CHATCTL_BENCH_MEMBERS", default_value_t = 10)]
    members: usize,
    /// Messages per second in each channel.
    #[arg(long, env = "CHATCTL_BENCH_RATE", default_value_t = 10.0)]
    rate: f64,
    /// Publisher connections; channels are dealt out among them
    /// [default: one per 100 msg/s, the gateways' default per-connection limit].
    #[arg(long, env = "CHATCTL_BENCH_PUBLISHERS")]
    publishers: Option<usize>,
}

/// `bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    load: LoadArgs,
    /// Messages per second.
    #[arg(long, env = "CHATCTL_BENCH_RATE", default_value_t = 100.0)]
    rate: f64,
    /// Subscribers (on the other gateway).
    #[arg(long, env = "CHATCTL_BENCH_SUBSCRIBERS", default_value_t = 1)]
    subscribers: usize,
    /// With --url: where the publisher connects (another gateway than --subscribe-url).
    #[arg(long, requires = "subscribe_url")]
    publish_url: Option<String>,
    /// With --url: where the subscribers connect.
    #[arg(long, requires = "publish_url")]
    subscribe_url: Option<String>,
}

/// Benchmarks that measure a stack chosen by [`TargetArgs`].
pub trait HasTarget {
    /// The target options.
    fn target(&self) -> &TargetArgs;
}

impl HasTarget for FanoutArgs {
    fn target(&self) -> &TargetArgs {
        &self.target
    }
}

impl HasTarget for RoomsArgs {
    fn target(&self) -> &TargetArgs {
        &self.target
    }
}

impl HasTarget for LatencyArgs {
    fn target(&self) -> &TargetArgs {
        &self.target
    }
}

/// A finished channel-load benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `fanout`, `rooms` or `latency`.
    pub bench: &'static str,
    /// What was measured.
    pub setup: SetupInfo,
    /// Where subscribers connected.
    pub path: String,
    /// The plan, in numbers.
    pub channels: usize,
    /// Subscribers per channel.
    pub subscribers_per_channel: usize,
    /// Messages per second per channel.
    pub rate_per_channel: f64,
    /// Publisher connections.
    pub publishers: usize,
    /// Seconds of publishing.
    pub duration_seconds: f64,
    /// Text bytes.
    pub size: usize,
    /// Encoding.
    pub encoding: &'static str,
    /// Results.
    pub result: LoadReport,
    /// Deliveries per CPU-second of the gateways and HAProxy together.
    pub deliveries_per_server_cpu_second: Option<f64>,
    /// Whether the stack the benchmark started stopped cleanly.
    pub stack_stopped_cleanly: Option<bool>,
}

struct Shape {
    bench: &'static str,
    channels: usize,
    members: usize,
    rate: f64,
    publishers: usize,
}

async fn run(
    shape: Shape,
    target: &TargetArgs,
    load_args: &LoadArgs,
    targets: impl FnOnce(&Setup) -> Result<(Vec<Target>, Vec<Target>, String), BenchError>,
) -> Result<Outcome, BenchError> {
    if shape.rate <= 0.0 || shape.channels == 0 || shape.members == 0 {
        return Err(BenchError::Invalid(
            "rate, channels and subscribers must be above 0".to_owned(),
        ));
    }
    let mut progress = Progress::new(target.quiet);
    progress.say(&format!("{}: preparing the stack ...", shape.bench));
    let setup = Setup::prepare(target, false, 0).await?;
    let result = async {
        let (publish_targets, subscribe_targets, path) = targets(&setup)?;
        let connections = shape.channels * shape.members + shape.publishers;
        let through_haproxy = subscribe_targets.iter().any(|t| matches!(t, Target::Url(_)));
        setup.check_capacity(connections, through_haproxy)?;
        let plan = Plan {
            channels: shape.channels,
            subscribers_per_channel: shape.members,
            rate_per_channel: shape.rate,
            publishers: shape.publishers,
            duration: load_args.duration,
            size: load_args.size,
            encoding: target.encoding.into(),
            publish_targets,
            subscribe_targets,
            sources: target.sources(),
            connect_concurrency: load_args.connect_concurrency,
            drain: load_args.drain,
            run_id: run_id(),
            jwt_secret: setup.jwt_secret.clone(),
        };
        progress.say(&format!(
            "{}: {} × {} subscribers, {} msg/s per channel, {} publisher(s), {:?}, {} B {} → {path}",
            shape.bench, shape.channels, shape.members, shape.rate, shape.publishers, load_args.duration, load_args.size, encoding_name(target.encoding)
        ));
        let report = load::run(plan, &setup.servers, &mut progress).await?;
        Ok::<_, BenchError>((report, path))
    }
    .await;
    let about = setup.about.clone();
    let stopped = setup.finish().await.map(|r| r.clean());
    let (result, path) = result?;
    let server_cpu = procs::cpu_of(&result.processes, &["gateway", "haproxy"]);
    Ok(Outcome {
        bench: shape.bench,
        setup: about,
        path,
        channels: shape.channels,
        subscribers_per_channel: shape.members,
        rate_per_channel: shape.rate,
        publishers: shape.publishers,
        duration_seconds: load_args.duration.as_secs_f64(),
        size: load_args.size,
        encoding: encoding_name(target.encoding),
        deliveries_per_server_cpu_second: (server_cpu > 0.0)
            .then(|| result.delivered as f64 / server_cpu),
        result,
        stack_stopped_cleanly: stopped,
    })
}

fn encoding_name(wire: crate::client::Wire) -> &'static str {
    match wire {
        crate::client::Wire::Json => "json",
        crate::client::Wire::Msgpack => "msgpack",
    }
}

fn front_and_subscribers(
    setup: &Setup,
    direct: bool,
) -> Result<(Vec<Target>, Vec<Target>, String), BenchError> {
    let subscribers = setup.subscriber_targets(direct)?;
    let publish = if direct {
        vec![subscribers[0].clone()]
    } else {
        subscribers.clone()
    };
    let path = if direct {
        format!("{} gateway socket(s) directly", subscribers.len())
    } else {
        match setup.about.gateways {
            Some(n) => format!("HAProxy → {n} gateway(s) on Unix sockets"),
            None => subscribers[0].to_string(),
        }
    };
    Ok((publish, subscribers, path))
}

/// `bench fanout`.
pub async fn fanout(args: &FanoutArgs) -> Result<Outcome, BenchError> {
    let shape = Shape {
        bench: "fanout",
        channels: 1,
        members: args.subscribers,
        rate: args.rate,
        publishers: args.publishers.max(1),
    };
    let direct = args.target.direct;
    run(shape, &args.target, &args.load, |setup| {
        front_and_subscribers(setup, direct)
    })
    .await
}

/// `bench rooms`.
pub async fn rooms(args: &RoomsArgs) -> Result<Outcome, BenchError> {
    let total_rate = args.channels as f64 * args.rate;
    let publishers = args
        .publishers
        .unwrap_or_else(|| ((total_rate / 100.0).ceil() as usize).clamp(1, args.channels.max(1)));
    let shape = Shape {
        bench: "rooms",
        channels: args.channels,
        members: args.members,
        rate: args.rate,
        publishers,
    };
    let direct = args.target.direct;
    run(shape, &args.target, &args.load, |setup| {
        front_and_subscribers(setup, direct)
    })
    .await
}

/// `bench latency`: publish on one gateway, receive on another.
pub async fn latency(args: &LatencyArgs) -> Result<Outcome, BenchError> {
    let shape = Shape {
        bench: "latency",
        channels: 1,
        members: args.subscribers,
        rate: args.rate,
        publishers: 1,
    };
    let explicit = args.publish_url.clone().zip(args.subscribe_url.clone());
    run(shape, &args.target, &args.load, move |setup| {
        let parse = |t: &str| Target::parse(t).map_err(|e| BenchError::Invalid(e.to_string()));
        if let Some((publish, subscribe)) = explicit {
            let path = format!("publish {publish}, receive {subscribe}");
            return Ok((vec![parse(&publish)?], vec![parse(&subscribe)?], path));
        }
        match setup.sockets.as_slice() {
            [first, second, ..] => Ok((
                vec![first.clone()],
                vec![second.clone()],
                "publish on gateway-0, receive on gateway-1 (their Unix sockets)".to_owned(),
            )),
            _ => Err(BenchError::Invalid(
                "latency is measured across two gateways: start two (--gateways 2), or give \
                 --publish-url and --subscribe-url"
                    .to_owned(),
            )),
        }
    })
    .await
}
