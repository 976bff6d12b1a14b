//! The subcommands: option parsing and what each prints. The work is in the library.

/// Prints a line of command output on stdout; a closed pipe (`chatctl status | head -1`)
/// ends the process quietly instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::commands::print_line(format_args!($($arg)*))
    };
}

mod bench;
mod client;
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
    /// Print a JWT for a user of a stack running with --auth jwt.
    Token(client::TokenArgs),
    /// Interactive chat: users, channels, subscribe, publish, direct messages.
    Chat(client::ChatArgs),
    /// Publish messages (arguments, or one per line of stdin).
    Publish(client::PublishArgs),
    /// Stream a channel's messages as lines or JSON; reconnects and recovers by offset.
    Subscribe(client::SubscribeArgs),
    /// Bots that log in as bot_XXXXX and publish to random channels.
    Bots(client::BotsArgs),
    /// Benchmarks with HDR latency histograms, loss/duplicate/order checks, CPU and memory
    /// per server process; they start their own stack unless given --url or --stack.
    #[command(subcommand)]
    Bench(bench::Bench),
}

impl Command {
    /// Whether this command runs for long and logs as it goes (the supervisor), rather than
    /// printing results.
    fn is_service(&self) -> bool {
        matches!(self, Command::Up(_))
    }
}

/// Writes one line to stdout; exits quietly when the reader has gone.
pub fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush())
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
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
        Command::Token(args) => client::token(args),
        Command::Chat(args) => client::chat(args).await,
        Command::Publish(args) => client::publish(args).await,
        Command::Subscribe(args) => client::subscribe(args).await,
        Command::Bots(args) => client::bots(args).await,
        Command::Bench(bench) => bench::run(bench).await,
    }
}
