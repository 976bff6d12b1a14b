//! The operator library's error type.
//!
//! Every failure of a reconcile ends up here, is counted under its [`Error::metric_label`],
//! reported as a `Degraded` condition and a Warning event, and retried with backoff.

use crate::controller::ChildFailure;

/// Errors of the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),

    /// An object could not be (de)serialized.
    #[error("serialization failed: {0}")]
    Serialization(#[source] serde_json::Error),

    /// The `ChatCluster` object lacks a field the API server always sets.
    #[error("ChatCluster has no metadata.{0}; it must be read from the API server")]
    MissingObjectKey(&'static str),

    /// The spec breaks a rule the CRD schema could not enforce (e.g. an old CRD is installed).
    #[error("invalid spec: {0}; fix the ChatCluster spec")]
    InvalidSpec(String),

    /// A Secret the spec refers to does not exist or lacks the key.
    #[error("Secret {name} has no key {key}; create it or fix the reference in the spec")]
    MissingSecret {
        /// Secret name.
        name: String,
        /// Key the spec refers to.
        key: String,
    },

    /// Redis could not be read for the persistence lag.
    #[error("reading the persistence lag from Redis failed: {0}")]
    Redis(#[source] redis::RedisError),

    /// Leader election could not talk to its Lease, or lost it.
    #[error("leader election failed: {reason}")]
    Lease {
        /// What went wrong.
        reason: &'static str,
        /// The API error behind it, if any.
        #[source]
        source: Option<kube::Error>,
    },

    /// Some children could not be applied or removed; the others were.
    #[error("{} of the children failed: {}", .0.len(), join(.0))]
    Children(Vec<ChildFailure>),
}

fn join(failures: &[ChildFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// Short, bounded label for the `errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Serialization(_) => "serialization",
            Self::MissingObjectKey(_) => "missing_object_key",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::MissingSecret { .. } => "missing_secret",
            Self::Redis(_) => "redis",
            Self::Lease { .. } => "lease",
            Self::Children(_) => "children",
        }
    }

    /// `reason` of the `Degraded` condition and the Warning event for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) | Self::Serialization(_) | Self::MissingObjectKey(_) => "ReconcileFailed",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::MissingSecret { .. } => "SecretNotFound",
            Self::Redis(_) => "RedisUnavailable",
            Self::Lease { .. } => "LeaderElectionFailed",
            Self::Children(_) => "ApplyFailed",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Self::Kube(error)
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Self::Serialization(error)
    }
}

/// Result alias of the operator library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
