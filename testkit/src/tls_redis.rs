//! A real `redis-server` that speaks TLS only, with a certificate for
//! `localhost` signed by a throwaway CA (made with the `openssl` command).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{Guarded, Output};

/// A running TLS-only `redis-server`; stopped on drop.
#[derive(Debug)]
pub struct TlsRedis {
    _process: Guarded,
    port: u16,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running openssl (apt-get install -y openssl)");
    assert!(status.success(), "openssl {args:?} failed");
}

impl TlsRedis {
    /// Makes a CA and a server certificate, starts the server and waits
    /// until it listens.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cc-tls-redis")
            .tempdir()
            .expect("temp dir");
        let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let (ca_key, ca_crt) = (path("ca.key"), path("ca.crt"));
        let (key, csr, crt, ext) = (path("s.key"), path("s.csr"), path("s.crt"), path("s.ext"));
        let subject = |cn: &str| format!("/CN={cn}");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
            "-days",
            "1",
            "-subj",
            &subject("test-ca"),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject("localhost"),
        ]);
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("ext file");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
        let binary = crate::find_binary("redis-server", &[], "redis-server");
        let (process, port) = Guarded::spawn_listening(
            "redis-server (tls)",
            Output::Capture,
            Duration::from_secs(10),
            |port| {
                let mut command = Command::new(&binary);
                command
                    .args([
                        "--port",
                        "0",
                        "--tls-port",
                        &port.to_string(),
                        "--bind",
                        "127.0.0.1",
                    ])
                    .args(["--tls-cert-file", &crt, "--tls-key-file", &key])
                    .args(["--tls-ca-cert-file", &ca_crt, "--tls-auth-clients", "no"])
                    .args(["--save", "", "--appendonly", "no"]);
                command
            },
        );
        Self {
            _process: process,
            port,
            ca_file: PathBuf::from(ca_crt),
            _dir: dir,
        }
    }

    /// `rediss://localhost:<port>`.
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_file).expect("read CA certificate")
    }
}
