//! `redis-server` of the local stack: append-only file in the state directory, a password,
//! loopback only, and `SHUTDOWN` to stop (which flushes the append-only file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::child::{ChildSpec, Readiness, Role, StopRequest};
use super::secrets::Secret;

/// How often Redis forces the append-only file to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After every write: an acknowledged message survives a power cut (the product's promise).
    Always,
    /// Once a second: faster; a crash of the machine may lose the last second.
    Everysec,
}

impl Fsync {
    /// The `appendfsync` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
        }
    }
}

/// `redis.conf` for a stack. Written each run (it holds the password: mode 0600).
pub fn config(port: u16, dir: &Path, fsync: Fsync, password: &Secret) -> String {
    format!(
        "# Written by chatctl up; rewritten at every start.
port {port}
bind 127.0.0.1
protected-mode yes
daemonize no
logfile \"\"
dir \"{dir}\"
appendonly yes
appendfsync {fsync}
save \"\"
requirepass {password}
",
        dir = dir.display(),
        fsync = fsync.as_str(),
        password = password.expose(),
    )
}

/// Writes `redis.conf` into `dir` and returns its path.
pub fn write_config(
    dir: &Path,
    port: u16,
    fsync: Fsync,
    password: &Secret,
) -> std::io::Result<PathBuf> {
    let path = dir.join("redis.conf");
    super::secrets::write_private(&path, config(port, dir, fsync, password).as_bytes())?;
    Ok(path)
}

/// The child spec of `redis-server <config>`.
pub fn spec(program: PathBuf, config: &Path, port: u16, password: &Secret) -> ChildSpec {
    ChildSpec {
        name: "redis".to_owned(),
        role: Role::Redis,
        program,
        args: vec![config.as_os_str().to_owned()],
        env: Vec::new(),
        run_as: None,
        ready: Readiness::Redis {
            port,
            password: password.clone(),
        },
        start_timeout: Duration::from_secs(30),
        stop: StopRequest::RedisShutdown {
            port,
            password: password.clone(),
        },
        stop_timeout: Duration::from_secs(30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_aof_fsync_and_password() {
        let secrets = super::super::secrets::Secrets::load_or_create(
            &tempfile::tempdir().expect("dir").path().join("s"),
        )
        .expect("secrets");
        let text = config(
            6390,
            Path::new("/s/redis"),
            Fsync::Always,
            &secrets.redis_password,
        );
        for needle in [
            "port 6390",
            "bind 127.0.0.1",
            "appendonly yes",
            "appendfsync always",
            "dir \"/s/redis\"",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(text.contains(&format!("requirepass {}", secrets.redis_password.expose())));
        assert!(
            config(1, Path::new("/"), Fsync::Everysec, &secrets.redis_password)
                .contains("appendfsync everysec")
        );
    }
}
