//! The open-file limit: raised to the hard limit at start, checked against what a run needs.
//!
//! Every WebSocket costs the load generator one descriptor and HAProxy two, so a run with
//! thousands of connections fails in confusing ways unless the limit is checked first.
//! Children inherit the raised limit.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-file limits after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FileLimit {
    /// The soft limit in force (what `open` is held to).
    pub soft: u64,
    /// The hard limit (how far an unprivileged process may raise the soft one).
    pub hard: u64,
}

/// Raises this process's soft open-file limit to its hard limit and returns both.
pub fn raise() -> FileLimit {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return FileLimit { soft: hard, hard };
    }
    FileLimit { soft, hard }
}

/// Descriptors a process keeps for itself beyond its connections (logs, runtime, listeners).
pub const RESERVED: u64 = 200;

/// Why a run cannot get the descriptors it needs.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} needs about {needed} open files but the limit is {soft} (hard limit {hard}); \
     raise it (`ulimit -n {hard}` or in /etc/security/limits.conf) or ask for fewer connections"
)]
pub struct LimitError {
    /// What needs them.
    pub what: String,
    /// How many.
    pub needed: u64,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

impl FileLimit {
    /// Checks that `connections` sockets (plus [`RESERVED`]) fit under the soft limit.
    pub fn check(&self, what: &str, connections: u64) -> Result<(), LimitError> {
        let needed = connections + RESERVED;
        if needed <= self.soft {
            return Ok(());
        }
        Err(LimitError {
            what: what.to_owned(),
            needed,
            soft: self.soft,
            hard: self.hard,
        })
    }

    /// The most client connections an HAProxy under this limit can proxy (two descriptors
    /// each), at least 100.
    pub fn haproxy_max_conn(&self) -> u32 {
        let fit = self.hard.saturating_sub(RESERVED * 5) / 2;
        u32::try_from(fit.clamp(100, 50_000)).unwrap_or(50_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_numbers() {
        let limit = FileLimit {
            soft: 1000,
            hard: 20_000,
        };
        assert!(limit.check("x", 700).is_ok());
        let err = limit.check("the bench", 5000).expect_err("too many");
        let text = err.to_string();
        assert!(
            text.contains("5200") && text.contains("1000") && text.contains("20000"),
            "{text}"
        );
    }

    #[test]
    fn haproxy_gets_two_descriptors_per_connection() {
        let limit = FileLimit {
            soft: 20_000,
            hard: 20_000,
        };
        assert_eq!(limit.haproxy_max_conn(), 9_500);
        let tiny = FileLimit {
            soft: 256,
            hard: 256,
        };
        assert_eq!(tiny.haproxy_max_conn(), 100);
    }

    #[test]
    fn raise_reaches_the_hard_limit() {
        let limit = raise();
        assert_eq!(limit.soft, limit.hard);
    }
}
