//! `haproxy.cfg` of the gateway pod's sidecar.
//!
//! HAProxy listens on `:8080` for WebSocket clients and balances them (`leastconn`) over the
//! pod's gateway processes, one `unix@` server per process socket in the shared `sockets`
//! volume, health-checked with `GET /health`. `:8404` serves the stats page, the Prometheus
//! exporter at `/metrics` and `/healthz` for the kubelet.

use std::fmt::Write as _;

use super::{HAPROXY_PORT, HAPROXY_STATS_PORT, SOCKET_DIR};
use crate::crd::GatewaySpec;

/// File name of the configuration inside the ConfigMap and the mounted directory.
pub const CONFIG_FILE: &str = "haproxy.cfg";
/// Directory the ConfigMap is mounted at in the HAProxy container.
pub const CONFIG_DIR: &str = "/usr/local/etc/haproxy";
/// Path of HAProxy's own liveness/readiness endpoint on the stats port.
pub const HEALTH_PATH: &str = "/healthz";

/// Socket path of gateway process `index`.
pub fn socket_path(index: i32) -> String {
    format!("{SOCKET_DIR}/gateway-{index}.sock")
}

/// The complete `haproxy.cfg` for a gateway spec.
pub fn config(gateway: &GatewaySpec) -> String {
    let max_conn = gateway.haproxy.max_conn;
    // Stop accepting after the gateways' own drain, so HAProxy outlives their goodbyes.
    let hard_stop = gateway.drain_timeout_seconds + 5;
    let mut cfg = format!(
        "\
global
    log stdout format raw local0 info
    maxconn {max_conn}
    hard-stop-after {hard_stop}s

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # Chat frames are small and latency-bound: send them now, do not wait for more.
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
    timeout client-fin 30s
    timeout server-fin 30s

frontend stats
    bind :{HAPROXY_STATS_PORT}
    monitor-uri {HEALTH_PATH}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 10s

frontend websocket
    bind :{HAPROXY_PORT}
    maxconn {max_conn}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    default-server inter 2s fall 3 rise 2
"
    );
    for index in 0..gateway.processes_per_pod {
        // Writing to a String cannot fail.
        let _ = writeln!(
            cfg,
            "    server gw{index} unix@{} check",
            socket_path(index)
        );
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(processes: i32) -> GatewaySpec {
        GatewaySpec {
            processes_per_pod: processes,
            ..GatewaySpec::default()
        }
    }

    #[test]
    fn one_unix_server_per_process() {
        let cfg = config(&gateway(3));
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
    fn websocket_balancing_health_and_metrics_are_configured() {
        let cfg = config(&gateway(1));
        for needle in [
            "balance leastconn",
            "option httpchk GET /health",
            "timeout tunnel 1h",
            "timeout client-fin 30s",
            "bind :8080",
            "bind :8404",
            "http-request use-service prometheus-exporter if { path /metrics }",
            "monitor-uri /healthz",
            "maxconn 50000",
            "hard-stop-after 15s",
        ] {
            assert!(cfg.contains(needle), "missing {needle:?} in\n{cfg}");
        }
    }

    #[test]
    fn max_conn_follows_the_spec() {
        let mut spec = gateway(1);
        spec.haproxy.max_conn = 1234;
        assert_eq!(config(&spec).matches("maxconn 1234").count(), 2);
    }

    /// Lets a real HAProxy (2.6, as in the sidecar image) check the generated config.
    #[test]
    fn haproxy_accepts_the_config() {
        let haproxy = chatcluster_testkit::find_binary("haproxy", &["/usr/sbin"], "haproxy");
        let dir = std::env::temp_dir().join(format!("cc-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CONFIG_FILE);
        std::fs::write(&path, config(&gateway(3))).unwrap();
        let output = std::process::Command::new(&haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            output.status.success(),
            "haproxy -c failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
