//! `haproxy.cfg` of the gateway pod's sidecar.
//!
//! HAProxy listens on `:8080` for WebSocket clients and balances them (`leastconn`) over the
//! pod's gateway processes, one `unix@` server per process socket in the shared `sockets`
//! volume, health-checked with `GET /health`. `:8404` serves the stats page, the Prometheus
//! exporter at `/metrics`, `/healthz` (liveness) and `/ready` (readiness: some gateway up) for
//! the kubelet. The configuration itself comes from `chatcluster-haproxy`, shared with the
//! local stack and the test harness.

use std::path::PathBuf;
use std::time::Duration;

use chatcluster_haproxy::HaproxyConfig;

use super::{HAPROXY_PORT, HAPROXY_STATS_PORT, SOCKET_DIR};
use crate::crd::GatewaySpec;

/// File name of the configuration inside the ConfigMap and the mounted directory.
pub const CONFIG_FILE: &str = "haproxy.cfg";
/// Directory the ConfigMap is mounted at in the HAProxy container.
pub const CONFIG_DIR: &str = "/usr/local/etc/haproxy";
pub use chatcluster_haproxy::{LIVENESS_PATH, READINESS_PATH};

/// Socket path of gateway process `index`.
pub fn socket_path(index: i32) -> String {
    format!("{SOCKET_DIR}/gateway-{index}.sock")
}

/// The complete `haproxy.cfg` for a gateway spec.
pub fn config(gateway: &GatewaySpec) -> String {
    let sockets = (0..gateway.processes_per_pod)
        .map(|index| PathBuf::from(socket_path(index)))
        .collect();
    let mut cfg = HaproxyConfig::new(
        format!(":{HAPROXY_PORT}"),
        format!(":{HAPROXY_STATS_PORT}"),
        sockets,
    );
    cfg.max_conn = u32::try_from(gateway.haproxy.max_conn).unwrap_or(1);
    // Stop accepting after the gateways' own drain, so HAProxy outlives their goodbyes.
    cfg.hard_stop_after = Some(Duration::from_secs(
        u64::try_from(gateway.drain_timeout_seconds).unwrap_or(0) + 5,
    ));
    cfg.log_to_stdout = true;
    cfg.render()
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
    fn one_unix_server_per_process_in_the_socket_volume() {
        let cfg = config(&gateway(3));
        for index in 0..3 {
            let line =
                format!("server gw{index} unix@/var/run/chatcluster/gateway-{index}.sock check");
            assert!(cfg.contains(&line), "missing {line:?} in\n{cfg}");
        }
    }

    #[test]
    fn pod_ports_limits_and_drain_follow_the_spec() {
        let mut spec = gateway(1);
        spec.haproxy.max_conn = 1234;
        let cfg = config(&spec);
        for needle in [
            "bind :8080",
            "bind :8404",
            "hard-stop-after 15000ms",
            "log stdout",
        ] {
            assert!(cfg.contains(needle), "missing {needle:?} in\n{cfg}");
        }
        assert_eq!(cfg.matches("maxconn 1234").count(), 2);
    }

    /// A real HAProxy (2.6, as in the sidecar image) accepts what the operator generates.
    #[test]
    fn haproxy_accepts_the_config() {
        let haproxy = chatcluster_testkit::find_binary("haproxy", &["/usr/sbin"], "haproxy");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, config(&gateway(3))).unwrap();
        chatcluster_haproxy::check(&haproxy, &path).unwrap();
    }
}
