//! `chatcluster-worker`: parses the command line, sets up logging and runs the
//! worker, or one of its tools (`dead-letters list|replay`).

use std::io::{IsTerminal as _, Write as _};

use anyhow::Context as _;
use chatcluster_worker::config::{Cli, Command, DeadLettersCommand, LogFormat, StreamArgs};
use chatcluster_worker::dead_letters::{self, DeadLetters, Filter};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = cli.run;
    let filter = EnvFilter::try_new(&args.log)
        .with_context(|| format!("invalid RUST_LOG {:?}", args.log))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Some(Command::DeadLetters(command)) = cli.command {
        return dead_letters_command(command).await;
    }
    let admin_addr = args.admin_addr;
    let config = args
        .into_config(|| {
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "worker".to_owned())
        })
        .context("--database-url (DATABASE_URL) is required")?;
    #[cfg(debug_assertions)]
    let config = test_fault(config);
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| chatcluster_worker::Error::Bind {
            addr: admin_addr,
            source,
        })?;
    chatcluster_worker::run(config, admin, shutdown_signal()).await?;
    Ok(())
}

/// Debug builds only (the tests run them): `CHATCLUSTER_WORKER_PANIC_ON=<msg_id>`
/// makes the writer panic on that message, to test crash handling end to end.
#[cfg(debug_assertions)]
fn test_fault(mut config: chatcluster_worker::Config) -> chatcluster_worker::Config {
    if let Some(id) = std::env::var_os("CHATCLUSTER_WORKER_PANIC_ON") {
        let id = id.to_string_lossy().into_owned();
        config.hooks.before_write = Some(std::sync::Arc::new(move |rows| {
            if rows.messages.iter().any(|m| m.msg_id.to_string() == id) {
                panic!("test fault: writing message {id}");
            }
        }));
    }
    config
}

/// `dead-letters list|replay`.
async fn dead_letters_command(command: DeadLettersCommand) -> anyhow::Result<()> {
    let open = |streams: &StreamArgs| -> anyhow::Result<(DeadLetters, Filter)> {
        let conn = chatcluster_worker::streams::connect(
            &streams.redis_url,
            std::time::Duration::from_secs(10),
        )?;
        let filter = Filter {
            shard: streams.shard,
            cause: streams.cause,
        };
        Ok((DeadLetters::new(conn, streams.stream_shards), filter))
    };
    let mut out = std::io::stdout().lock();
    match command {
        DeadLettersCommand::List(list) => {
            let (mut letters, filter) = open(&list.streams)?;
            let found = letters.list(filter, list.limit).await?;
            for letter in &found {
                if list.json {
                    writeln!(out, "{}", letter.to_json())?;
                } else {
                    writeln!(
                        out,
                        "{}\t{}\t{}\t{}",
                        letter.name(),
                        letter.cause.map_or("-", |c| c.label()),
                        letter.summary(),
                        letter.reason
                    )?;
                }
            }
            if !list.json {
                eprintln!("{} dead letter(s)", found.len());
            }
        }
        DeadLettersCommand::Replay(replay) => {
            let (mut letters, filter) = open(&replay.streams)?;
            if replay.all {
                let replayed = letters
                    .replay_all(filter, |n| eprintln!("replayed {n}"))
                    .await?;
                writeln!(out, "replayed {replayed} dead letter(s)")?;
            } else {
                let mut chosen = Vec::with_capacity(replay.id.len());
                for name in &replay.id {
                    let (shard, id) = dead_letters::parse_name(name).map_err(anyhow::Error::msg)?;
                    let letter = letters.get(shard, &id).await?.with_context(|| {
                        format!("no dead letter {name} (see `dead-letters list`)")
                    })?;
                    chosen.push(letter);
                }
                let new_ids = letters.replay(&chosen).await?;
                for (letter, new_id) in chosen.iter().zip(new_ids) {
                    writeln!(out, "{} -> {}/{new_id}", letter.name(), letter.shard)?;
                }
                writeln!(out, "replayed {} dead letter(s)", chosen.len())?;
            }
        }
    }
    Ok(())
}

/// Completes on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
