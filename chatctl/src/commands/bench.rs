//! `chatctl bench ...`: runs a benchmark, prints its table (or `--json`). Exits 1 when a
//! message was lost, duplicated or reordered.

use std::process::ExitCode;

use chatctl::bench::{connections, persist, report, scenarios};

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// One channel, many subscribers, one publisher (1,000 JSON subscribers, 1,000 msg/s,
    /// 64 B, 20 s by default, through HAProxy to 2 gateways on Unix sockets).
    Fanout(scenarios::FanoutArgs),
    /// Many channels of a few members, each at its own rate: the usual chat.
    Rooms(scenarios::RoomsArgs),
    /// Publish on one gateway, receive on another, at a low rate.
    Latency(scenarios::LatencyArgs),
    /// Many idle connections: opening rate and memory per connection.
    Connections(connections::ConnectionsArgs),
    /// Redis Streams → worker → PostgreSQL throughput and lag.
    Persist(persist::PersistArgs),
}

fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        say!("{}", serde_json::to_string_pretty(value)?);
    } else {
        say!("{}", table(value).trim_end());
    }
    Ok(())
}

/// Runs one benchmark.
pub async fn run(bench: Bench) -> anyhow::Result<ExitCode> {
    let ok = match bench {
        Bench::Fanout(args) => load(scenarios::fanout(&args).await?, json_of(&args))?,
        Bench::Rooms(args) => load(scenarios::rooms(&args).await?, json_of(&args))?,
        Bench::Latency(args) => load(scenarios::latency(&args).await?, json_of(&args))?,
        Bench::Connections(args) => {
            let outcome = connections::run(&args).await?;
            emit(args.json(), &outcome, connections::summary)?;
            outcome.failed.is_empty() && outcome.closed_while_held == 0
        }
        Bench::Persist(args) => {
            let outcome = persist::run(&args).await?;
            emit(args.json, &outcome, persist::summary)?;
            outcome.published as i64 == outcome.rows && outcome.rows == outcome.distinct
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn json_of<T: scenarios::HasTarget>(args: &T) -> bool {
    args.target().json
}

fn load(outcome: scenarios::Outcome, json: bool) -> anyhow::Result<bool> {
    emit(json, &outcome, report::load)?;
    let r = &outcome.result;
    Ok(r.lost == 0 && r.duplicated == 0 && r.out_of_order == 0 && r.closed.is_empty())
}
