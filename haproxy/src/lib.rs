//! `haproxy.cfg` for HAProxy in front of gateway processes on Unix sockets.
//!
//! One generator, three users: the operator's gateway-pod sidecar, `chatctl up`'s local
//! stack and the test harness. They differ only in addresses, timeouts and sizes, which
//! are fields of [`HaproxyConfig`]; the shape of the configuration (WebSocket frontend,
//! `leastconn` over `unix@` servers health-checked with `GET /health`, redispatch while a
//! process drains, stats and Prometheus exporter, liveness and readiness endpoints) is
//! written once, here.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Path of HAProxy's liveness endpoint on the stats frontend: 200 while HAProxy runs.
pub const LIVENESS_PATH: &str = "/healthz";
/// Path of HAProxy's readiness endpoint on the stats frontend: 200 only while at least one
/// gateway server passes its health check, 503 otherwise.
pub const READINESS_PATH: &str = "/ready";
/// Path of the Prometheus exporter on the stats frontend.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the HTML stats page on the stats frontend.
pub const STATS_PATH: &str = "/stats";
/// Name of the backend holding the gateway servers.
pub const BACKEND: &str = "gateways";

/// Everything that varies between the places HAProxy runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyConfig {
    /// `bind` address of the WebSocket frontend, such as `:8080` or `127.0.0.1:8080`.
    pub listen: String,
    /// `bind` address of the stats, metrics and probe frontend.
    pub stats_listen: String,
    /// Gateway Unix sockets, one server each.
    pub sockets: Vec<PathBuf>,
    /// Maximum concurrent client connections (global and frontend).
    pub max_conn: u32,
    /// Worker threads; `None` lets HAProxy use one per available CPU.
    pub threads: Option<u32>,
    /// Interval between health checks of each gateway socket.
    pub check_interval: Duration,
    /// Failed checks before a server is taken out.
    pub check_fall: u32,
    /// Passed checks before a server is put back.
    pub check_rise: u32,
    /// How long a closing connection may linger half-closed.
    pub client_fin: Duration,
    /// After a soft stop, how long existing connections may live before HAProxy exits.
    pub hard_stop_after: Option<Duration>,
    /// Log each connection to stdout (the container log or the local stack's log file).
    pub log_to_stdout: bool,
}

impl HaproxyConfig {
    /// A configuration with production timeouts for the given addresses and sockets.
    pub fn new(
        listen: impl Into<String>,
        stats_listen: impl Into<String>,
        sockets: Vec<PathBuf>,
    ) -> Self {
        Self {
            listen: listen.into(),
            stats_listen: stats_listen.into(),
            sockets,
            max_conn: 50_000,
            threads: None,
            check_interval: Duration::from_secs(2),
            check_fall: 3,
            check_rise: 2,
            client_fin: Duration::from_secs(30),
            hard_stop_after: None,
            log_to_stdout: false,
        }
    }

    /// The complete `haproxy.cfg`.
    pub fn render(&self) -> String {
        let mut cfg = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_global(&mut cfg);
        let _ = self.write_defaults(&mut cfg);
        let _ = self.write_stats_frontend(&mut cfg);
        let _ = self.write_websocket_frontend(&mut cfg);
        let _ = self.write_backend(&mut cfg);
        cfg
    }

    fn write_global(&self, cfg: &mut String) -> std::fmt::Result {
        writeln!(cfg, "global")?;
        if self.log_to_stdout {
            writeln!(cfg, "    log stdout format raw local0 info")?;
        }
        writeln!(cfg, "    maxconn {}", self.max_conn)?;
        if let Some(threads) = self.threads {
            writeln!(cfg, "    nbthread {threads}")?;
        }
        if let Some(after) = self.hard_stop_after {
            writeln!(cfg, "    hard-stop-after {}", millis(after))?;
        }
        writeln!(cfg)
    }

    fn write_defaults(&self, cfg: &mut String) -> std::fmt::Result {
        writeln!(cfg, "defaults")?;
        writeln!(cfg, "    mode http")?;
        if self.log_to_stdout {
            writeln!(cfg, "    log global")?;
            writeln!(cfg, "    option httplog")?;
            writeln!(cfg, "    option dontlognull")?;
        }
        cfg.write_str(
            "    # Chat frames are small and latency-bound: send them now, do not wait for more.
    option http-no-delay
    # A draining gateway process removes its socket: retry the connect on another one.
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 10s
    # WebSocket connections become tunnels after the upgrade.
    timeout tunnel 1h
",
        )?;
        writeln!(cfg, "    timeout client-fin {}", millis(self.client_fin))?;
        writeln!(cfg, "    timeout server-fin {}", millis(self.client_fin))?;
        writeln!(cfg)
    }

    fn write_stats_frontend(&self, cfg: &mut String) -> std::fmt::Result {
        writeln!(
            cfg,
            "frontend stats
    bind {stats}
    monitor-uri {LIVENESS_PATH}
    # Ready only while some gateway process passes its health check.
    http-request return status 503 content-type text/plain string \"no gateway up\" if {{ path {READINESS_PATH} }} {{ nbsrv({BACKEND}) lt 1 }}
    http-request return status 200 content-type text/plain string \"ok\" if {{ path {READINESS_PATH} }}
    http-request use-service prometheus-exporter if {{ path {METRICS_PATH} }}
    stats enable
    stats uri {STATS_PATH}
    stats refresh 10s
",
            stats = self.stats_listen
        )
    }

    fn write_websocket_frontend(&self, cfg: &mut String) -> std::fmt::Result {
        writeln!(
            cfg,
            "frontend websocket
    bind {listen}
    maxconn {max_conn}
    default_backend {BACKEND}
",
            listen = self.listen,
            max_conn = self.max_conn
        )
    }

    fn write_backend(&self, cfg: &mut String) -> std::fmt::Result {
        writeln!(
            cfg,
            "backend {BACKEND}
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter {inter} fall {fall} rise {rise}",
            inter = millis(self.check_interval),
            fall = self.check_fall,
            rise = self.check_rise,
        )?;
        for (index, socket) in self.sockets.iter().enumerate() {
            writeln!(cfg, "    server gw{index} unix@{} check", socket.display())?;
        }
        Ok(())
    }
}

/// A duration in HAProxy's syntax, in milliseconds so no precision is lost.
fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// Why `haproxy -c` refused a configuration.
#[derive(Debug)]
pub struct CheckError(pub String);

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "haproxy rejected the configuration: {}", self.0)
    }
}

impl std::error::Error for CheckError {}

/// Runs `haproxy -c -f <config>` with the given binary.
pub fn check(binary: &Path, config: &Path) -> Result<(), CheckError> {
    let output = std::process::Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(config)
        .output()
        .map_err(|e| CheckError(format!("cannot run {}: {e}", binary.display())))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CheckError(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(processes: usize) -> HaproxyConfig {
        let sockets = (0..processes)
            .map(|i| PathBuf::from(format!("/var/run/chatcluster/gateway-{i}.sock")))
            .collect();
        HaproxyConfig::new(":8080", ":8404", sockets)
    }

    #[test]
    fn one_unix_server_per_socket() {
        let cfg = config(3).render();
        let servers: Vec<&str> = cfg
            .lines()
            .filter(|l| l.trim_start().starts_with("server "))
            .collect();
        assert_eq!(
            servers,
            [
                "    server gw0 unix@/var/run/chatcluster/gateway-0.sock check",
                "    server gw1 unix@/var/run/chatcluster/gateway-1.sock check",
                "    server gw2 unix@/var/run/chatcluster/gateway-2.sock check",
            ]
        );
    }

    #[test]
    fn balancing_health_probes_and_metrics_are_configured() {
        let mut spec = config(1);
        spec.hard_stop_after = Some(Duration::from_secs(15));
        spec.threads = Some(2);
        let cfg = spec.render();
        for needle in [
            "balance leastconn",
            "option httpchk GET /health",
            "option redispatch",
            "timeout tunnel 1h",
            "timeout client-fin 30000ms",
            "bind :8080",
            "bind :8404",
            "http-request use-service prometheus-exporter if { path /metrics }",
            "monitor-uri /healthz",
            "if { path /ready } { nbsrv(gateways) lt 1 }",
            "maxconn 50000",
            "nbthread 2",
            "hard-stop-after 15000ms",
            "default-server inter 2000ms fall 3 rise 2",
        ] {
            assert!(cfg.contains(needle), "missing {needle:?} in\n{cfg}");
        }
        assert!(!cfg.contains("log stdout"), "logging is off unless asked");
    }

    #[test]
    fn max_conn_applies_globally_and_to_the_frontend() {
        let mut spec = config(1);
        spec.max_conn = 1234;
        assert_eq!(spec.render().matches("maxconn 1234").count(), 2);
    }

    /// A real HAProxy (2.6, as in the sidecar image) accepts what we generate.
    #[test]
    fn haproxy_accepts_the_config() {
        let haproxy = chatcluster_testkit::find_binary("haproxy", &["/usr/sbin"], "haproxy");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("haproxy.cfg");
        let mut spec = config(3);
        spec.log_to_stdout = true;
        spec.threads = Some(2);
        spec.hard_stop_after = Some(Duration::from_secs(15));
        std::fs::write(&path, spec.render()).expect("write config");
        if let Err(e) = check(&haproxy, &path) {
            panic!("{e}");
        }
    }
}
