//! The library's error type.
//!
//! Most failures of Redis or PostgreSQL are not errors of the worker: they are
//! retried with backoff where they happen. What reaches [`Error`] stops the
//! worker (a bad URL, an admin port in use) or is reported before a retry.

use std::net::SocketAddr;

/// Everything that can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `REDIS_URL` is not a Redis URL.
    #[error("invalid REDIS_URL {url:?}: {source} (expected redis://host:port)")]
    RedisUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        #[source]
        source: redis::RedisError,
    },
    /// `DATABASE_URL` is not a PostgreSQL URL.
    #[error("invalid DATABASE_URL: {source} (expected postgres://user:password@host:5432/db)")]
    DatabaseUrl {
        /// Why it was rejected.
        #[source]
        source: sqlx::Error,
    },
    /// A Redis command failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something the worker cannot read.
    #[error("unexpected Redis reply to {command}: {detail}")]
    Reply {
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A PostgreSQL statement failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The schema migrations failed.
    #[error("PostgreSQL migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The admin server cannot listen.
    #[error("cannot listen on ADMIN_ADDR {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin server stopped with an error.
    #[error("admin server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// A task of the pipeline panicked (a bug): the worker stops, so that its
    /// pod restarts; what it held stays pending and is delivered again.
    #[error(
        "the {task} task panicked; stopping (entries it held stay pending and are delivered again)"
    )]
    TaskPanicked {
        /// Which task.
        task: &'static str,
    },
    /// A command-line tool was given something it cannot use.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::RedisUrl { .. } | Self::DatabaseUrl { .. } => "config",
            Self::Redis(_) | Self::Reply { .. } => "redis",
            Self::Postgres(_) => "postgres",
            Self::Migrate(_) => "migrate",
            Self::Bind { .. } | Self::Serve(_) => "admin",
            Self::TaskPanicked { .. } => "panic",
            Self::Usage(_) => "usage",
        }
    }
}

/// The result type of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
