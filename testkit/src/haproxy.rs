//! A real `haproxy` in front of gateway processes on Unix sockets, as in a pod.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Guarded;

/// A running HAProxy with a WebSocket frontend and a stats/Prometheus frontend.
#[derive(Debug)]
pub struct Haproxy {
    port: u16,
    stats_port: u16,
    _dir: tempfile::TempDir,
    _process: Guarded,
}

/// The configuration the test harness uses: the same shape the operator generates.
pub fn config(port: u16, stats_port: u16, sockets: &[PathBuf]) -> String {
    let mut cfg = format!(
        "global\n  maxconn 4000\n\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  \
         timeout tunnel 1h\n  timeout client-fin 5s\n  timeout http-request 10s\n  option http-server-close\n  option http-no-delay\n  option redispatch\n  retries 3\n\n\
         frontend ws\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\n\
         frontend stats\n  bind 127.0.0.1:{stats_port}\n  http-request use-service prometheus-exporter if {{ path /metrics }}\n  \
         stats enable\n  stats uri /stats\n\n\
         backend gateways\n  balance leastconn\n  option httpchk GET /health\n  \
         default-server inter 500ms fall 2 rise 1\n"
    );
    for (i, socket) in sockets.iter().enumerate() {
        let _ = writeln!(cfg, "  server gw{i} unix@{} check", socket.display());
    }
    cfg
}

impl Haproxy {
    /// Starts HAProxy balancing over `sockets` and waits until it listens.
    pub fn start(sockets: &[PathBuf]) -> Self {
        let binary = crate::find_binary("haproxy", &["/usr/sbin"], "haproxy");
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, stats_port) = (crate::free_port(), crate::free_port());
        let cfg_path = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg_path, config(port, stats_port, sockets)).expect("write haproxy.cfg");
        check_config(&binary, &cfg_path);
        let process = Guarded::spawn(
            "haproxy",
            Command::new(&binary).arg("-db").arg("-f").arg(&cfg_path),
        );
        assert!(
            crate::wait_until(Duration::from_secs(10), || crate::port_open(port)),
            "haproxy did not listen on port {port}"
        );
        Self {
            port,
            stats_port,
            _dir: dir,
            _process: process,
        }
    }

    /// The WebSocket URL of the frontend.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The frontend port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The stats/Prometheus port.
    pub fn stats_port(&self) -> u16 {
        self.stats_port
    }
}

fn check_config(binary: &Path, cfg: &Path) {
    let out = Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(cfg)
        .output()
        .expect("run haproxy -c");
    assert!(
        out.status.success(),
        "invalid haproxy.cfg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
