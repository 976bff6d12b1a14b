//! The local stack: the pod layout of the design as local processes, supervised.
//!
//! `redis-server` (append-only file), PostgreSQL (initdb into the state directory on first
//! run), M workers, N gateways on Unix sockets, and HAProxy in front of them, configured by
//! the same generator as the operator's pods. Children that crash are restarted with
//! backoff; a stop runs in order (HAProxy and gateways drain, workers finish their batches,
//! then Redis and PostgreSQL shut down cleanly). One stack per state directory (a lock).

pub mod child;
pub mod components;
pub mod config;
pub mod control;
pub mod keeper;
pub mod layout;
pub mod lock;
pub mod logs;
pub mod orphans;
pub mod ports;
pub mod postgres;
pub mod probe;
pub mod programs;
pub mod redis;
pub mod secrets;
pub mod state;
pub mod supervisor;

pub use config::{Auth, StackConfig};
pub use layout::Layout;
pub use state::{Phase, ShutdownReport, StackInfo};
pub use supervisor::Stack;

/// Why a stack could not start or be controlled.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// Another `chatctl up` holds the state directory.
    #[error(
        "a stack is already running in {state_dir}{detail}; nothing was changed. \
         Stop it with `chatctl down --state-dir {state_dir}`, or use another --state-dir"
    )]
    AlreadyRunning {
        /// The state directory.
        state_dir: String,
        /// Its supervisor and page, when known.
        detail: String,
    },
    /// No stack runs there.
    #[error("no stack is running in {0} (start one with `chatctl up`)")]
    NotRunning(String),
    /// A program is missing.
    #[error(transparent)]
    Missing(#[from] programs::MissingProgram),
    /// A port is taken.
    #[error(transparent)]
    Port(#[from] ports::PortInUse),
    /// The lock file could not be used.
    #[error(transparent)]
    Lock(lock::LockError),
    /// PostgreSQL could not be prepared.
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresError),
    /// HAProxy refused the generated configuration.
    #[error(transparent)]
    Haproxy(#[from] chatcluster_haproxy::CheckError),
    /// A child did not come up.
    #[error("{name} {source}; last lines of {log}:\n{tail}")]
    Start {
        /// The child.
        name: String,
        /// What went wrong.
        #[source]
        source: child::StartError,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// An option does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}
