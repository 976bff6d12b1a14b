//! The chatcluster children of a stack: gateways, workers and HAProxy, wired to Redis and
//! PostgreSQL. Required wiring is passed as flags; secrets as environment variables; the
//! user's `--gateway-arg`/`--worker-arg` come last.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chatcluster_haproxy::{HaproxyConfig, READINESS_PATH};
use nix::sys::signal::Signal;

use super::child::{ChildSpec, Readiness, Role, StopRequest};
use super::config::{Auth, StackConfig};

/// Connection details shared by gateways and workers (they hold passwords).
#[derive(Clone)]
pub struct Backends {
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `DATABASE_URL`, when PostgreSQL runs.
    pub database_url: Option<String>,
    /// `JWT_SECRET`, with `--auth jwt`.
    pub jwt_secret: Option<String>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backends(..)")
    }
}

fn env(backends: &Backends) -> Vec<(String, String)> {
    let mut env = vec![("REDIS_URL".to_owned(), backends.redis_url.clone())];
    if let Some(url) = &backends.database_url {
        env.push(("DATABASE_URL".to_owned(), url.clone()));
    }
    env
}

/// Gateway `index` on `socket`, with its admin server on `admin_port`.
pub fn gateway(
    config: &StackConfig,
    program: &Path,
    index: usize,
    socket: &Path,
    admin_port: u16,
    backends: &Backends,
) -> ChildSpec {
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        socket.as_os_str().to_owned(),
        "--admin-addr".into(),
        format!("127.0.0.1:{admin_port}").into(),
        "--instance-id".into(),
        format!("gateway-{index}").into(),
        "--drain-timeout".into(),
        format!("{}ms", config.drain_timeout.as_millis()).into(),
        "--auth-mode".into(),
        config.auth.as_str().into(),
    ];
    if backends.database_url.is_none() {
        // Without PostgreSQL (`--no-postgres`): history is what Redis keeps.
        args.push("--ephemeral".into());
    }
    args.extend(config.gateway_args.iter().map(OsString::from));
    let mut env = env(backends);
    if let (Auth::Jwt, Some(secret)) = (config.auth, &backends.jwt_secret) {
        env.push(("JWT_SECRET".to_owned(), secret.clone()));
    }
    served(
        Role::Gateway,
        format!("gateway-{index}"),
        program,
        (args, env),
        admin_port,
        (
            Duration::from_secs(30),
            config.drain_timeout + Duration::from_secs(10),
        ),
    )
}

/// A gateway or worker: ready when its admin port's `/ready` answers 200, stopped with
/// SIGTERM. `timeouts` are (start, stop).
fn served(
    role: Role,
    name: String,
    program: &Path,
    (args, env): (Vec<OsString>, Vec<(String, String)>),
    admin_port: u16,
    (start_timeout, stop_timeout): (Duration, Duration),
) -> ChildSpec {
    ChildSpec {
        name,
        role,
        program: program.to_owned(),
        args,
        env,
        run_as: None,
        ready: Readiness::Http {
            port: admin_port,
            path: "/ready",
        },
        start_timeout,
        stop: StopRequest::Signal(Signal::SIGTERM),
        stop_timeout,
    }
}

/// Worker `index`, with its admin server on `admin_port`.
pub fn worker(
    config: &StackConfig,
    program: &Path,
    index: usize,
    admin_port: u16,
    backends: &Backends,
) -> ChildSpec {
    let mut args: Vec<OsString> = vec![
        "--admin-addr".into(),
        format!("127.0.0.1:{admin_port}").into(),
        "--worker-id".into(),
        format!("worker-{index}").into(),
    ];
    args.extend(config.worker_args.iter().map(OsString::from));
    let mut env = env(backends);
    // A chat history should show a message within a moment, not after the production
    // default of 5 s; the user's environment or --worker-arg still wins.
    if std::env::var_os("BATCH_TIMEOUT").is_none() {
        env.push(("BATCH_TIMEOUT".to_owned(), "200ms".to_owned()));
    }
    // SIGTERM: stop reading, finish and acknowledge the batches in hand (DRAIN_TIMEOUT 20 s).
    served(
        Role::Worker,
        format!("worker-{index}"),
        program,
        (args, env),
        admin_port,
        (Duration::from_secs(60), Duration::from_secs(30)),
    )
}

/// `haproxy.cfg` of the stack, from the one generator the operator uses too, with fast
/// health checks so a restarted gateway is back in rotation within a second.
pub fn haproxy_config(
    config: &StackConfig,
    port: u16,
    stats_port: u16,
    sockets: Vec<PathBuf>,
    max_conn: u32,
) -> HaproxyConfig {
    let mut cfg = HaproxyConfig::new(
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{stats_port}"),
        sockets,
    );
    cfg.max_conn = max_conn;
    cfg.check_interval = Duration::from_millis(500);
    cfg.check_fall = 2;
    cfg.check_rise = 1;
    cfg.client_fin = Duration::from_secs(5);
    cfg.hard_stop_after = Some(config.drain_timeout + Duration::from_secs(2));
    cfg.log_to_stdout = config.haproxy_log;
    cfg
}

/// HAProxy running `cfg_path`, ready once some gateway passes its check.
pub fn haproxy(
    config: &StackConfig,
    program: &Path,
    cfg_path: &Path,
    stats_port: u16,
) -> ChildSpec {
    ChildSpec {
        name: "haproxy".to_owned(),
        role: Role::Haproxy,
        program: program.to_owned(),
        args: vec!["-db".into(), "-f".into(), cfg_path.as_os_str().to_owned()],
        env: Vec::new(),
        run_as: None,
        ready: Readiness::Http {
            port: stats_port,
            path: READINESS_PATH,
        },
        start_timeout: Duration::from_secs(20),
        // SIGUSR1: soft stop. Listeners close at once; HAProxy exits when the gateways have
        // closed the last tunnels, or at hard-stop-after.
        stop: StopRequest::Signal(Signal::SIGUSR1),
        stop_timeout: config.drain_timeout + Duration::from_secs(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Backends {
        Backends {
            redis_url: "redis://:pw@127.0.0.1:1/".into(),
            database_url: Some("postgres://u:pw@127.0.0.1:2/postgres".into()),
            jwt_secret: Some("s3cret".into()),
        }
    }

    #[test]
    fn secrets_travel_in_the_environment_not_the_arguments() {
        let config = StackConfig::from_args(["--auth", "jwt", "--gateway-arg=--write-delay=1ms"])
            .expect("config");
        let spec = gateway(
            &config,
            Path::new("/bin/gw"),
            1,
            Path::new("/s/run/gateway-1.sock"),
            9101,
            &backends(),
        );
        let args: Vec<String> = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            !args
                .iter()
                .any(|a| a.contains("pw") || a.contains("s3cret")),
            "{args:?}"
        );
        assert_eq!(args.last().map(String::as_str), Some("--write-delay=1ms"));
        assert!(args.windows(2).any(|w| w == ["--auth-mode", "jwt"]));
        let names: Vec<&str> = spec.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["REDIS_URL", "DATABASE_URL", "JWT_SECRET"]);
    }

    #[test]
    fn haproxy_uses_the_shared_generator_with_fast_checks() {
        let config = StackConfig::from_args(["--drain-timeout", "4s"]).expect("config");
        let cfg = haproxy_config(
            &config,
            8080,
            8404,
            vec!["/s/run/gateway-0.sock".into()],
            9000,
        )
        .render();
        assert!(cfg.contains("bind 127.0.0.1:8080"), "{cfg}");
        assert!(
            cfg.contains("server gw0 unix@/s/run/gateway-0.sock check"),
            "{cfg}"
        );
        assert!(
            cfg.contains("default-server inter 500ms fall 2 rise 1"),
            "{cfg}"
        );
        assert!(cfg.contains("hard-stop-after 6000ms"), "{cfg}");
    }
}
