//! `chatcluster-operator`: parses its flags, then runs the admin server, leader election and
//! the controller until SIGTERM/ctrl-c or loss of leadership. On SIGTERM the controller
//! finishes its reconciles first, then the Lease is released.

use std::time::Duration;

use anyhow::Context as _;
use chatcluster_operator::config::Args;
use chatcluster_operator::controller::{self, Settings};
use chatcluster_operator::leader::{self, LeaseSettings};
use chatcluster_operator::metrics::Metrics;
use chatcluster_operator::server::{self, AdminState};
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter);
    if args.log_json {
        subscriber.json().init()
    } else {
        subscriber.init()
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop_tx.send_replace(true);
    });
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            // An error means the sender is gone, which also means stop.
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let admin = AdminState::new(registry);
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin server to {}", args.admin_addr))?;
    tokio::spawn(server::serve(listener, admin.clone(), stopped()));

    let mut config = kube::Config::infer()
        .await
        .context("reading the Kubernetes client configuration")?;
    config.connect_timeout = Some(Duration::from_secs(10));
    let client = Client::try_from(config).context("connecting to the Kubernetes API")?;
    client
        .apiserver_version()
        .await
        .context("reaching the Kubernetes API server")?;
    admin.set_ready();

    let (leading_tx, mut leading_rx) = watch::channel(!args.leader_election);
    // Completes once the controller has stopped and its reconciles have finished: only then
    // may the Lease be released.
    let (controller_done_tx, controller_done_rx) = tokio::sync::oneshot::channel::<()>();
    // Without leader election the sender just stays alive (and `true`) until the end.
    let (election, _always_leading) = if args.leader_election {
        let api: Api<Lease> = Api::namespaced(client.clone(), &args.operator_namespace);
        let settings = LeaseSettings {
            name: args.lease_name.clone(),
            identity: args.identity.clone(),
            duration: args.lease_duration(),
        };
        let done = async {
            let _ = controller_done_rx.await;
        };
        (
            Some(tokio::spawn(leader::hold(api, settings, leading_tx, done))),
            None,
        )
    } else {
        (None, Some(leading_tx))
    };
    tokio::select! {
        () = stopped() => return Ok(()),
        changed = leading_rx.wait_for(|leading| *leading) => {
            changed.context("leader election ended before this instance led")?;
        }
    }
    metrics.leader.set(1);
    tracing::info!(identity = %args.identity, "leading: starting the controller");

    let settings = Settings {
        resync: args.resync(),
        namespace: args.watch_namespace.clone().filter(|ns| !ns.is_empty()),
        concurrency: args.concurrency,
        operator_namespace: args.operator_namespace.clone(),
    };
    let reporter = Reporter {
        controller: "chatcluster-operator".to_owned(),
        instance: Some(args.identity.clone()),
    };
    let mut lost = leading_rx.clone();
    let stop_or_lost = {
        let stopped = stopped();
        async move {
            tokio::select! {
                () = stopped => {}
                _ = lost.wait_for(|leading| !*leading) => {}
            }
        }
    };
    controller::run(client, settings, metrics.clone(), reporter, stop_or_lost).await;
    metrics.leader.set(0);
    let _ = controller_done_tx.send(());
    if let Some(election) = election {
        let result = election.await.context("leader election task panicked")?;
        result.context("lost leadership")?;
    }
    Ok(())
}

/// Completes on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
