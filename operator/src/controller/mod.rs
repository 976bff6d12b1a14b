//! The reconciler: fetch → validate → build (pure) → apply (server-side) → prune → status.
//!
//! One `ChatCluster` at a time, the controller reads what the build needs (secret values that
//! must stay stable, the data volume claims, the persistence lag), builds every child with
//! [`crate::build`], applies each child whose applied hash changed, removes the children the
//! spec no longer asks for, and grows data volumes. The status is patched only when it
//! changed, so a steady cluster costs no writes at all. A failure becomes a `Degraded`
//! condition, a Warning event and a retry with exponential backoff; a child that fails does
//! not keep the others from being applied.
//!
//! [`watch`] sets up the watches and caches, [`apply`] is the apply and prune engine,
//! [`credentials`] reads Secrets, [`storage`] handles data volumes, [`scaling`] is the
//! autoscaler glue and [`report`] writes status and events.

mod apply;
mod credentials;
mod report;
mod scaling;
mod storage;
mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, ResourceExt};
use tracing::{Instrument, field, info, info_span, warn};

pub use apply::{APPLIED_HASH_ANNOTATION, ChildFailure};
use watch::Stores;

use crate::autoscale::{self, LagSource};
use crate::build::{self, BuildInputs, Component, JWT_SECRET_KEY, PASSWORD_KEY, names};
use crate::crd::{AuthMode, ChatCluster};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::status;

/// Longest wait between retries of a failing cluster.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// Tunables of the controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a healthy cluster is reconciled again (to re-read the lag).
    pub resync: Duration,
    /// Namespace to watch; `None` watches all namespaces.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// The operator's own namespace: its pods there may reach the managed Redis.
    pub operator_namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(15),
            namespace: None,
            concurrency: 4,
            operator_namespace: "chatcluster-system".to_owned(),
        }
    }
}

/// Everything a reconcile uses.
pub(crate) struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
    stores: Stores,
    lag: Arc<dyn LagSource>,
    settings: Settings,
    scaling: Mutex<HashMap<ObjectRef<ChatCluster>, scaling::ScaleState>>,
    failures: Mutex<HashMap<ObjectRef<ChatCluster>, u32>>,
}

/// Runs the controller until `shutdown` completes; reconciles under way finish first.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    reporter: Reporter,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = settings.namespace.clone();
    let scope = scope.as_deref();
    let (clusters, cluster_writer) = reflector::store();
    let cluster_stream = reflector::reflector(
        cluster_writer,
        watcher(
            watch::api::<ChatCluster>(&client, scope),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());

    let (service_accounts, sa_stream) = watch::owned::<ServiceAccount>(&client, scope);
    let (config_maps, cm_stream) = watch::owned::<ConfigMap>(&client, scope);
    let (services, svc_stream) = watch::owned::<Service>(&client, scope);
    let (deployments, deploy_stream) = watch::owned::<Deployment>(&client, scope);
    let (statefulsets, sts_stream) = watch::owned::<StatefulSet>(&client, scope);
    let (disruption_budgets, pdb_stream) = watch::owned::<PodDisruptionBudget>(&client, scope);
    let (network_policies, np_stream) = watch::owned::<NetworkPolicy>(&client, scope);
    let secret_stream = watch::secrets(&client, scope)
        .predicate_filter(predicates::resource_version, Default::default());
    let stores = Stores {
        clusters: clusters.clone(),
        service_accounts,
        config_maps,
        services,
        deployments,
        statefulsets,
        disruption_budgets,
        network_policies,
    };
    let concurrency = settings.concurrency;
    let context = Arc::new(Context::new(
        client,
        reporter,
        metrics,
        stores,
        Arc::new(autoscale::RedisLag),
        settings,
    ));
    let referrers = clusters.clone();
    Controller::for_stream(cluster_stream, clusters)
        .owns_stream(sa_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(cm_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(svc_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(pdb_stream.predicate_filter(predicates::generation, Default::default()))
        .owns_stream(np_stream.predicate_filter(predicates::generation, Default::default()))
        .owns_stream(deploy_stream.predicate_filter(watch::deployment_progress, Default::default()))
        .owns_stream(sts_stream.predicate_filter(watch::statefulset_progress, Default::default()))
        .watches_stream(secret_stream, move |secret| {
            watch::clusters_referring_to(&referrers, &secret)
        })
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(object = %object, "reconciled"),
                Err(error) => tracing::debug!(%error, "reconcile failed"),
            }
        })
        .await;
}

impl Context {
    /// A context over the given client and caches.
    pub(crate) fn new(
        client: Client,
        reporter: Reporter,
        metrics: Metrics,
        stores: Stores,
        lag: Arc<dyn LagSource>,
        settings: Settings,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            stores,
            lag,
            settings,
            scaling: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Drops the autoscaler memory and failure counts of clusters that no longer exist.
    fn forget_deleted(&self) {
        let exists = |key: &ObjectRef<ChatCluster>| self.stores.clusters.get(key).is_some();
        lock(&self.scaling).retain(|key, _| exists(key));
        lock(&self.failures).retain(|key, _| exists(key));
    }
}

/// Reconciles one `ChatCluster`; failures are reported on the object before they are returned.
pub(crate) async fn reconcile(cluster: Arc<ChatCluster>, ctx: Arc<Context>) -> Result<Action> {
    let key = ObjectRef::from_obj(&*cluster);
    let span = info_span!("reconcile", object = %key, generation = field::Empty);
    if let Some(generation) = cluster.metadata.generation {
        span.record("generation", generation);
    }
    async move {
        ctx.metrics.reconciles.inc();
        let started = Instant::now();
        let result = reconcile_cluster(&cluster, &ctx).await;
        ctx.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(action) => {
                lock(&ctx.failures).remove(&key);
                Ok(action)
            }
            Err(error) => {
                ctx.metrics.failed(&error);
                warn!(%error, "reconcile failed");
                ctx.publish(
                    &cluster,
                    EventType::Warning,
                    error.reason(),
                    "Reconcile",
                    error.to_string(),
                )
                .await;
                report::report_failure(&cluster, &ctx, &error).await;
                Err(error)
            }
        }
    }
    .instrument(span)
    .await
}

/// Requeues a failed cluster with exponential backoff (5 s doubling to 5 min).
pub(crate) fn error_policy(cluster: Arc<ChatCluster>, _error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = lock(&ctx.failures);
    let count = failures.entry(ObjectRef::from_obj(&*cluster)).or_insert(0);
    *count = count.saturating_add(1);
    Action::requeue(backoff(*count))
}

/// Wait before retry number `failures` (1-based).
fn backoff(failures: u32) -> Duration {
    let factor = 2_u32.saturating_pow(failures.saturating_sub(1));
    FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn reconcile_cluster(cluster: &ChatCluster, ctx: &Context) -> Result<Action> {
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let name = cluster.name_any();
    let spec = &cluster.spec;
    ctx.forget_deleted();
    spec.validate().map_err(Error::InvalidSpec)?;

    // Fetch: referenced Secrets must exist; generated ones keep their values.
    for reference in credentials::referenced_secrets(cluster) {
        credentials::secret_value(ctx, &namespace, reference).await?;
    }
    let (redis_url, redis_ca) = match &spec.redis.external {
        Some(external) => {
            let url = credentials::secret_value(ctx, &namespace, &external.url_secret_ref).await?;
            let ca = match &external.ca_secret_ref {
                Some(reference) => {
                    Some(credentials::secret_value(ctx, &namespace, reference).await?)
                }
                None => None,
            };
            (url, ca)
        }
        None => (build::managed_redis_url(&name, &namespace), None),
    };
    let postgres_secret = match spec.postgres.managed {
        Some(_) => {
            let secret_name = Component::Postgres.object_name(&name);
            credentials::get_secret(ctx, &namespace, &secret_name).await?
        }
        None => None,
    };
    let auth_secret = match (spec.auth.mode, &spec.auth.jwt_secret_ref) {
        (AuthMode::Jwt, None) => {
            credentials::get_secret(ctx, &namespace, &names::auth(&name)).await?
        }
        _ => None,
    };
    let claims = storage::data_claims(ctx, cluster).await?;
    let lag = scaling::read_lag(ctx, cluster, &redis_url, redis_ca.as_deref()).await;
    let deployments = &ctx.stores.deployments;
    let worker_name = Component::Worker.object_name(&name);
    let observed_worker = apply::cached(deployments, &worker_name, &namespace);
    let current_workers = observed_worker
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(spec.worker.min_replicas);
    let worker_replicas = scaling::scale_workers(ctx, cluster, current_workers, lag.value());
    let gateway_name = Component::Gateway.object_name(&name);
    let current_gateways = apply::cached(deployments, &gateway_name, &namespace)
        .and_then(|d| d.spec.as_ref()?.replicas);

    // Build, then apply what changed, remove what is no longer wanted, grow volumes.
    let inputs = BuildInputs {
        worker_replicas,
        postgres_password: credentials::existing_or_random(postgres_secret.as_ref(), PASSWORD_KEY),
        jwt_secret: credentials::existing_or_random(auth_secret.as_ref(), JWT_SECRET_KEY),
        operator_namespace: ctx.settings.operator_namespace.clone(),
    };
    let mut children = build::build(cluster, &inputs)?;
    storage::freeze_claim_templates(ctx, &namespace, &mut children);
    let postgres_secret_name = Component::Postgres.object_name(&name);
    for secret in &mut children.secrets {
        if secret.name_any() == postgres_secret_name
            && let Some(claim) = claims.get(Component::Postgres.as_str())
        {
            credentials::bind_to_claim(secret, claim);
        }
    }
    apply::stamp_all(&mut children)?;
    let live_secrets: Vec<_> = [postgres_secret, auth_secret]
        .into_iter()
        .flatten()
        .collect();
    let mut outcome = apply::apply_children(ctx, &namespace, &children, &live_secrets).await;
    let pruned = apply::prune(ctx, cluster, &children).await;
    outcome.removed = pruned.removed;
    outcome.failures.extend(pruned.failures);
    outcome
        .failures
        .extend(storage::grow_volumes(ctx, cluster, &claims).await);
    let gateway_change = current_gateways
        .filter(|c| *c != spec.gateway.replicas)
        .map(|c| (c, spec.gateway.replicas));
    let worker_change = (observed_worker.is_some() && worker_replicas != current_workers)
        .then_some((current_workers, worker_replicas));
    announce(
        cluster,
        ctx,
        &outcome,
        gateway_change,
        worker_change,
        lag.value(),
    )
    .await;

    // Status.
    let failure = (!outcome.failures.is_empty()).then(|| Error::Children(outcome.failures));
    let inputs = status::Inputs {
        generation: cluster.metadata.generation,
        gateway_replicas: spec.gateway.replicas,
        worker_replicas,
        lag: lag.value(),
        selector: build::gateway_selector(&name),
        failure: failure
            .as_ref()
            .map(|error| (error.reason().to_owned(), error.to_string())),
        lag_error: match &lag {
            scaling::Lag::Known(_) => None,
            scaling::Lag::Unavailable(error) => Some(error.clone()),
        },
    };
    report::patch_status(cluster, ctx, &inputs).await?;
    match failure {
        Some(error) => Err(error),
        None => Ok(Action::requeue(ctx.settings.resync)),
    }
}

/// Events for what this round changed: creations, removals, scaling (`(from, to)`).
async fn announce(
    cluster: &ChatCluster,
    ctx: &Context,
    outcome: &apply::Outcome,
    gateways: Option<(i32, i32)>,
    workers: Option<(i32, i32)>,
    lag: Option<i64>,
) {
    if !outcome.created.is_empty() {
        info!(objects = ?outcome.created, "created");
        let note = format!("Created {}", outcome.created.join(", "));
        ctx.publish(cluster, EventType::Normal, "Created", "Create", note)
            .await;
    }
    if !outcome.removed.is_empty() {
        let note = format!(
            "Removed {} (no longer in the spec)",
            outcome.removed.join(", ")
        );
        ctx.publish(cluster, EventType::Normal, "Removed", "Delete", note)
            .await;
    }
    if let Some((from, to)) = gateways {
        info!(from, to, "scaled gateways");
        let note = format!("Scaled gateways from {from} to {to}");
        ctx.publish(cluster, EventType::Normal, "ScaledGateways", "Scale", note)
            .await;
    }
    if let Some((from, to)) = workers {
        let lag_text = lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
        info!(from, to, ?lag, "scaled workers");
        let note = format!("Scaled workers from {from} to {to} (lag {lag_text})");
        ctx.publish(cluster, EventType::Normal, "ScaledWorkers", "Scale", note)
            .await;
    }
}

#[cfg(test)]
mod tests;
