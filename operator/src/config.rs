//! Command-line flags and environment of the operator binary, parsed once in `main`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Settings of `chatcluster-operator`; every flag also reads the environment variable shown.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "chatcluster-operator",
    version,
    about = "Runs ChatCluster objects on Kubernetes"
)]
pub struct Args {
    /// Address of the health and metrics server (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Watch only this namespace; empty watches all namespaces.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Seconds between reconciles of a healthy cluster (how often the lag is read).
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 15)]
    pub resync_seconds: u64,
    /// ChatClusters reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Take part in leader election (needed when more than one replica runs).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, env = "LEASE_NAME", default_value = "chatcluster-operator")]
    pub lease_name: String,
    /// The operator's own namespace: where its Lease lives, and the only namespace whose
    /// operator pods the managed Redis NetworkPolicies admit.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub operator_namespace: String,
    /// This instance's identity in the Lease and in events (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "chatcluster-operator")]
    pub identity: String,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "LOG_JSON", default_value_t = false, action = clap::ArgAction::Set)]
    pub log_json: bool,
}

impl Args {
    /// How often a healthy cluster is reconciled.
    pub fn resync(&self) -> Duration {
        Duration::from_secs(self.resync_seconds.max(1))
    }

    /// Validity of the leader Lease.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds.max(3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let args = Args::try_parse_from(["chatcluster-operator"]).unwrap();
        assert_eq!(args.admin_addr, "0.0.0.0:8080".parse().unwrap());
        assert!(args.leader_election);
        assert_eq!(args.resync(), Duration::from_secs(15));
        assert_eq!(args.watch_namespace, None);
    }

    #[test]
    fn flags_override() {
        let args = Args::try_parse_from([
            "chatcluster-operator",
            "--leader-election=false",
            "--watch-namespace=chat",
            "--lease-duration-seconds=1",
        ])
        .unwrap();
        assert!(!args.leader_election);
        assert_eq!(args.watch_namespace.as_deref(), Some("chat"));
        assert_eq!(
            args.lease_duration(),
            Duration::from_secs(3),
            "floored to 3s"
        );
    }
}
