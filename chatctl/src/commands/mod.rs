//! The subcommands: option parsing and what each prints. The work is in the library.

mod stack;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// chatcluster's command line: run the local stack, chat, publish, subscribe, bots, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "chatctl", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local stack (Redis, PostgreSQL, workers, gateways on Unix sockets, HAProxy)
    /// in the foreground, supervised; Ctrl-C stops it in order.
    Up(chatctl::stack::StackConfig),
    /// Stop the stack another `chatctl up` runs.
    Down(stack::DownArgs),
    /// Show the stack: URLs, processes, readiness, restarts.
    Status(stack::StatusArgs),
}

impl Command {
    /// Whether this command runs for long and logs as it goes (the supervisor), rather than
    /// printing results.
    fn is_service(&self) -> bool {
        matches!(self, Command::Up(_))
    }
}

/// Logs go to stderr: `info` for `up`, warnings only for the other commands, `RUST_LOG` wins.
pub fn init_tracing(cli: &Cli) {
    let default = if cli.command.is_service() {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(config) => stack::up(config).await,
        Command::Down(args) => stack::down(args).await,
        Command::Status(args) => stack::status(args).await,
    }
}
