//! A real `haproxy` in front of gateway processes on Unix sockets, as in a pod.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chatcluster_haproxy::HaproxyConfig;

use crate::process::{Guarded, Output};

/// A running HAProxy with a WebSocket frontend and a stats/Prometheus frontend.
#[derive(Debug)]
pub struct Haproxy {
    port: u16,
    stats_port: u16,
    _dir: tempfile::TempDir,
    _process: Guarded,
}

/// The configuration the test harness uses: the operator's, on loopback, with fast checks.
pub fn config(port: u16, stats_port: u16, sockets: &[PathBuf]) -> String {
    let mut cfg = HaproxyConfig::new(
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{stats_port}"),
        sockets.to_vec(),
    );
    // HAProxy needs two descriptors per connection; the hard open-file limit here is 20,000.
    cfg.max_conn = 9_000;
    cfg.check_interval = Duration::from_millis(500);
    cfg.check_fall = 2;
    cfg.check_rise = 1;
    cfg.client_fin = Duration::from_secs(5);
    cfg.render()
}

impl Haproxy {
    /// Starts HAProxy balancing over `sockets` and waits until this very
    /// process listens on both its ports (drawing new ports when another
    /// process took one first).
    pub fn start(sockets: &[PathBuf]) -> Self {
        const ATTEMPTS: usize = 8;
        let binary = crate::find_binary("haproxy", &["/usr/sbin"], "haproxy");
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg_path = dir.path().join("haproxy.cfg");
        for _ in 0..ATTEMPTS {
            let (port, stats_port) = (crate::free_port(), crate::free_port());
            std::fs::write(&cfg_path, config(port, stats_port, sockets))
                .expect("write haproxy.cfg");
            if let Err(e) = chatcluster_haproxy::check(&binary, &cfg_path) {
                panic!("{e}");
            }
            let mut process = Guarded::spawn_with(
                "haproxy",
                Command::new(&binary).arg("-db").arg("-f").arg(&cfg_path),
                Output::Capture,
            );
            if process.wait_listening(&[port, stats_port], Duration::from_secs(10)) {
                return Self {
                    port,
                    stats_port,
                    _dir: dir,
                    _process: process,
                };
            }
            assert!(
                process.has_exited(),
                "haproxy did not listen on ports {port} and {stats_port}:\n{}",
                process.output()
            );
        }
        panic!("haproxy could not bind free ports in {ATTEMPTS} attempts");
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
