//! `up`, `down` and `status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chatctl::stack::control::{self, Down};
use chatctl::stack::state::ChildInfo;
use chatctl::stack::{ShutdownReport, Stack, StackConfig, StackInfo, child::Role, layout};

/// Options of `chatctl down`.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// State directory of the stack [default: as `chatctl up`].
    #[arg(long, env = "CHATCTL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How long to wait for the ordered shutdown.
    #[arg(long, env = "CHATCTL_DOWN_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Options of `chatctl status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// State directory of the stack [default: as `chatctl up`].
    #[arg(long, env = "CHATCTL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print the state file and probes as JSON.
    #[arg(long)]
    json: bool,
}

fn state_dir(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(layout::default_state_dir)
}

fn admin_url(child: &ChildInfo) -> String {
    child
        .port
        .map(|p| format!("http://127.0.0.1:{p}/metrics"))
        .unwrap_or_default()
}

fn print_banner(info: &StackInfo) {
    let dir = info.state_dir.display();
    say!("\nchatcluster is running (state {dir})");
    if let (Some(page), Some(ws)) = (&info.page_url, &info.ws_url) {
        say!("  web chat     {page}");
        say!("  WebSocket    {ws}");
    }
    if let (Some(stats), Some(metrics)) = (&info.stats_url, &info.metrics_url) {
        say!("  HAProxy      {stats}   metrics {metrics}");
    }
    for (label, role) in [("gateways", Role::Gateway), ("workers", Role::Worker)] {
        for (i, child) in info.of_role(role).enumerate() {
            let label = if i == 0 { label } else { "" };
            let pid = child.pid.unwrap_or(0);
            say!(
                "  {label:<12} {:<10} pid {pid:<7} metrics {}",
                child.name,
                admin_url(child)
            );
        }
    }
    say!(
        "  Redis        127.0.0.1:{} (password in {dir}/secrets/redis-password)",
        info.redis_port
    );
    if let Some(port) = info.postgres_port {
        say!(
            "  PostgreSQL   127.0.0.1:{port}, user chatcluster, database postgres (password in {dir}/secrets/postgres-password)"
        );
    }
    if info.auth == "jwt" {
        say!(
            "  auth         jwt: `chatctl token --user alice` prints a token; open the page with ?token=<token>"
        );
    }
    say!("  logs         {}", info.log_dir.display());
    say!("Ctrl-C here or `chatctl down` stops it.");
}

/// Prints how the stack stopped; failure unless everything stopped cleanly.
fn report_exit(report: &ShutdownReport) -> ExitCode {
    say!("stopped:");
    print_report(report);
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_report(report: &ShutdownReport) {
    for child in &report.children {
        let mark = if child.clean { "ok " } else { "!! " };
        say!("  {mark} {:<10} {}", child.name, child.detail);
    }
    match report.postgres_clean {
        Some(true) => say!("  ok  postgres log: database system is shut down"),
        Some(false) => say!("  !!  postgres log shows no normal shutdown"),
        None => {}
    }
}

/// `chatctl up`.
pub async fn up(config: StackConfig) -> anyhow::Result<ExitCode> {
    let stack = Stack::start(&config).await?;
    print_banner(stack.info());
    let report = stack.run(chatctl::shutdown::requested()).await;
    Ok(report_exit(&report))
}

/// `chatctl down`.
pub async fn down(args: DownArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(args.state_dir);
    eprintln!("stopping the stack in {} ...", dir.display());
    match control::down(&dir, args.timeout).await? {
        Down::Stopped(Some(report)) => Ok(report_exit(&report)),
        Down::Stopped(None) => {
            say!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Down::Leftovers(names) => {
            say!(
                "no chatctl was running, but it had left {} running; stopped them",
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Down::NothingRunning => {
            say!("no stack is running in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `chatctl status`: exit 0 when running and every child is ready, 3 when not running, 1
/// when something is down.
pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(args.state_dir);
    let status = control::status(&dir).await;
    let healthy = status.running && status.children.iter().all(|c| c.ready);
    if args.json {
        say!("{}", serde_json::to_string_pretty(&status)?);
    } else if !status.running {
        say!("no stack is running in {}", dir.display());
    } else if let Some(info) = &status.stack {
        say!(
            "stack in {} ({:?}, chatctl pid {}, since {})",
            dir.display(),
            info.phase,
            info.supervisor_pid,
            info.started_at
        );
        if let Some(page) = &info.page_url {
            say!(
                "  web chat {page}   stats {}",
                info.stats_url.as_deref().unwrap_or("")
            );
        }
        say!(
            "  {:<10} {:<8} {:<6} {:>8} {:>9}  last exit",
            "process",
            "pid",
            "ready",
            "restarts",
            "rss"
        );
        for child in &status.children {
            say!(
                "  {:<10} {:<8} {:<6} {:>8} {:>7} M  {}",
                child.name,
                child
                    .pid
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                if child.ready { "yes" } else { "NO" },
                child.restarts,
                child.rss_bytes.map(|b| b / (1024 * 1024)).unwrap_or(0),
                child.last_exit.as_deref().unwrap_or("")
            );
        }
    }
    Ok(if !status.running {
        ExitCode::from(3)
    } else if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
