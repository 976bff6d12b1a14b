//! Where everything of one local stack lives inside its state directory.
//!
//! ```text
//! <state>/chatctl.lock     held (flock) by the running `chatctl up`
//! <state>/stack.json       what is running: pids, ports, URLs (read by status, down, bench)
//! <state>/secrets/         generated passwords and the JWT secret (mode 0600)
//! <state>/redis/           redis.conf and the append-only file
//! <state>/postgres/data    the PostgreSQL cluster (initdb on first run)
//! <state>/run/             gateway Unix sockets, haproxy.cfg (rewritten each run)
//! <state>/logs/<run>/      one directory of logs per run; logs/latest points at the newest
//! ```

use std::path::{Path, PathBuf};

/// Paths inside a state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

impl Layout {
    /// The layout of `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock file.
    pub fn lock(&self) -> PathBuf {
        self.root.join("chatctl.lock")
    }

    /// The state file written by the supervisor.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("stack.json")
    }

    /// Generated secrets.
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }

    /// Redis's configuration and data.
    pub fn redis(&self) -> PathBuf {
        self.root.join("redis")
    }

    /// The parent of PostgreSQL's data directory (owned by the PostgreSQL user).
    pub fn postgres(&self) -> PathBuf {
        self.root.join("postgres")
    }

    /// PostgreSQL's data directory.
    pub fn postgres_data(&self) -> PathBuf {
        self.postgres().join("data")
    }

    /// Runtime files: sockets and the generated HAProxy configuration.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The Unix socket of gateway `index`.
    pub fn gateway_socket(&self, index: usize) -> PathBuf {
        self.run().join(format!("gateway-{index}.sock"))
    }

    /// The generated `haproxy.cfg`.
    pub fn haproxy_config(&self) -> PathBuf {
        self.run().join("haproxy.cfg")
    }

    /// All runs' logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
}

/// The default state directory: `$XDG_DATA_HOME/chatcluster` (or `~/.local/share/chatcluster`)
/// for a user; `/var/lib/chatcluster` for root, because PostgreSQL then runs as the
/// `postgres` user, who cannot enter `/root`.
pub fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/chatcluster");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("chatcluster")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_inside_the_root() {
        let layout = Layout::new("/s");
        assert_eq!(layout.gateway_socket(1), Path::new("/s/run/gateway-1.sock"));
        assert_eq!(layout.postgres_data(), Path::new("/s/postgres/data"));
        assert_eq!(layout.lock(), Path::new("/s/chatctl.lock"));
    }
}
