//! The reconciler: fetch → validate → build (pure) → apply (server-side) → status.
//!
//! One `ChatCluster` at a time, the controller reads what the build needs (secret values that
//! must stay stable, the persistence lag), builds every child with [`crate::build`], and
//! server-side-applies those that differ from what its watches last saw. The status is patched
//! only when it changed, so a steady cluster costs no writes at all. A failure becomes a
//! `Degraded` condition, a Warning event and a retry with exponential backoff.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, field, info, info_span, warn};

use crate::autoscale::{self, LagSource, Stabilizer};
use crate::build::{
    self, BuildInputs, Children, Component, JWT_SECRET_KEY, MANAGED_SELECTOR, MANAGER,
    PASSWORD_KEY, names,
};
use crate::crd::{AuthMode, ChatCluster, ChatClusterStatus, SecretKeyRef};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::status::{self, Observed};

/// Length of generated passwords and secrets (alphanumeric, URL-safe).
const GENERATED_SECRET_LEN: usize = 32;
/// Longest event note the API server accepts is 1 kB; ours stay below it.
const MAX_NOTE_LEN: usize = 1000;
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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(15),
            namespace: None,
            concurrency: 4,
        }
    }
}

/// Caches of the owned objects, fed by the controller's watches.
#[derive(Clone)]
pub(crate) struct Stores {
    clusters: Store<ChatCluster>,
    service_accounts: Store<ServiceAccount>,
    config_maps: Store<ConfigMap>,
    services: Store<Service>,
    deployments: Store<Deployment>,
    statefulsets: Store<StatefulSet>,
    disruption_budgets: Store<PodDisruptionBudget>,
    network_policies: Store<NetworkPolicy>,
}

/// Everything a reconcile uses.
pub(crate) struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Metrics,
    stores: Stores,
    lag: Arc<dyn LagSource>,
    settings: Settings,
    stabilizers: Mutex<HashMap<ObjectRef<ChatCluster>, Stabilizer>>,
    failures: Mutex<HashMap<ObjectRef<ChatCluster>, u32>>,
}

/// Result of applying one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// The live object already matched; nothing was sent.
    Unchanged,
    /// The object did not exist and was created.
    Created,
    /// The object differed and was updated.
    Updated,
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    reporter: Reporter,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let scope = settings.namespace.clone();
    let (clusters, cluster_writer) = reflector::store();
    let cluster_stream = reflector::reflector(
        cluster_writer,
        watcher(
            api::<ChatCluster>(&client, scope.as_deref()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());

    let (service_accounts, sa_stream) = owned::<ServiceAccount>(&client, scope.as_deref());
    let (config_maps, cm_stream) = owned::<ConfigMap>(&client, scope.as_deref());
    let (services, svc_stream) = owned::<Service>(&client, scope.as_deref());
    let (deployments, deploy_stream) = owned::<Deployment>(&client, scope.as_deref());
    let (statefulsets, sts_stream) = owned::<StatefulSet>(&client, scope.as_deref());
    let (disruption_budgets, pdb_stream) = owned::<PodDisruptionBudget>(&client, scope.as_deref());
    let (network_policies, np_stream) = owned::<NetworkPolicy>(&client, scope.as_deref());
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
    // Workloads trigger on spec or readiness changes only, not on every status heartbeat;
    // the rest on any change of their resourceVersion. Our own no-op applies change neither.
    Controller::for_stream(cluster_stream, clusters)
        .owns_stream(sa_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(cm_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(svc_stream.predicate_filter(predicates::resource_version, Default::default()))
        .owns_stream(pdb_stream.predicate_filter(predicates::generation, Default::default()))
        .owns_stream(np_stream.predicate_filter(predicates::generation, Default::default()))
        .owns_stream(deploy_stream.predicate_filter(deployment_progress, Default::default()))
        .owns_stream(sts_stream.predicate_filter(statefulset_progress, Default::default()))
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

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A cache and watch stream of one kind of owned object, limited to objects we manage.
fn owned<K>(
    client: &Client,
    namespace: Option<&str>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(MANAGED_SELECTOR);
    let stream = reflector::reflector(writer, watcher(api::<K>(client, namespace), config))
        .default_backoff()
        .applied_objects();
    (store, stream)
}

fn hash_of(value: impl Hash) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    Some(hasher.finish())
}

fn deployment_progress(deployment: &Deployment) -> Option<u64> {
    let status = deployment.status.as_ref();
    hash_of((
        deployment.metadata.generation,
        status.map(|s| {
            (
                s.observed_generation,
                s.replicas,
                s.ready_replicas,
                s.updated_replicas,
                s.available_replicas,
            )
        }),
    ))
}

fn statefulset_progress(statefulset: &StatefulSet) -> Option<u64> {
    let status = statefulset.status.as_ref();
    hash_of((
        statefulset.metadata.generation,
        status.map(|s| {
            (
                s.observed_generation,
                s.replicas,
                s.ready_replicas,
                s.current_revision.clone(),
                s.update_revision.clone(),
            )
        }),
    ))
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
            stabilizers: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    async fn publish(
        &self,
        cluster: &ChatCluster,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder
            .publish(&event, &cluster.object_ref(&()))
            .await
        {
            warn!(%error, reason, "publishing an event failed");
        }
    }

    /// Server-side-applies `desired` unless `observed` already contains every field of it.
    async fn apply<K>(&self, desired: &K, observed: Option<&K>) -> Result<Applied>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Serialize
            + DeserializeOwned
            + Clone
            + Debug,
    {
        let body = serde_json::to_value(desired)?;
        if let Some(observed) = observed
            && contains(&serde_json::to_value(observed)?, &body)
        {
            return Ok(Applied::Unchanged);
        }
        let namespace = desired
            .meta()
            .namespace
            .as_deref()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        api.patch(
            &desired.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        Ok(if observed.is_some() {
            Applied::Updated
        } else {
            Applied::Created
        })
    }

    /// Drops the autoscaler history and failure counts of clusters that no longer exist.
    fn forget_deleted(&self) {
        let exists = |key: &ObjectRef<ChatCluster>| self.stores.clusters.get(key).is_some();
        lock(&self.stabilizers).retain(|key, _| exists(key));
        lock(&self.failures).retain(|key, _| exists(key));
    }

    async fn get_secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?)
    }
}

/// Whether `live` holds every field of `desired` with the same value (lists element-wise).
fn contains(live: &serde_json::Value, desired: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (live, desired) {
        (Value::Object(live), Value::Object(desired)) => desired
            .iter()
            .all(|(key, value)| live.get(key).is_some_and(|l| contains(l, value))),
        (Value::Array(live), Value::Array(desired)) => {
            live.len() == desired.len() && live.iter().zip(desired).all(|(l, d)| contains(l, d))
        }
        (live, desired) => live == desired,
    }
}

/// Looks children of one kind up by name in `namespace`.
fn lookup<'a, K>(store: &'a Store<K>, namespace: &'a str) -> impl Fn(String) -> Option<Arc<K>> + 'a
where
    K: Resource<DynamicType = ()> + Clone,
{
    move |name| cached(store, name, namespace)
}

fn cached<K>(store: &Store<K>, name: String, namespace: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(&name).within(namespace))
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
                report_failure(&cluster, &ctx, &error).await;
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
    for reference in referenced_secrets(cluster) {
        secret_value(ctx, &namespace, reference).await?;
    }
    let redis_url = match &spec.redis.external {
        Some(external) => secret_value(ctx, &namespace, &external.url_secret_ref).await?,
        None => build::managed_redis_url(&name, &namespace),
    };
    let postgres_secret = match spec.postgres.managed {
        Some(_) => ctx.get_secret(&namespace, &names::postgres(&name)).await?,
        None => None,
    };
    let auth_secret = match (spec.auth.mode, &spec.auth.jwt_secret_ref) {
        (AuthMode::Jwt, None) => ctx.get_secret(&namespace, &names::auth(&name)).await?,
        _ => None,
    };
    let lag = read_lag(ctx, &redis_url, spec.stream_shards).await;
    let observed_worker = cached(&ctx.stores.deployments, names::worker(&name), &namespace);
    let current_workers = observed_worker
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .unwrap_or(spec.worker.min_replicas);
    let worker_replicas = scale_workers(cluster, ctx, current_workers, lag);
    let current_gateways = cached(&ctx.stores.deployments, names::gateway(&name), &namespace)
        .and_then(|d| d.spec.as_ref()?.replicas);

    // Build, then apply what changed.
    let inputs = BuildInputs {
        worker_replicas,
        postgres_password: existing_or_random(postgres_secret.as_ref(), PASSWORD_KEY),
        jwt_secret: existing_or_random(auth_secret.as_ref(), JWT_SECRET_KEY),
    };
    let children = build::build(cluster, &inputs)?;
    let observed_secrets = [postgres_secret, auth_secret];
    apply_children(cluster, ctx, &children, &observed_secrets).await?;
    if let Some(current) = current_gateways.filter(|c| *c != spec.gateway.replicas) {
        let note = format!(
            "Scaled gateways from {current} to {}",
            spec.gateway.replicas
        );
        info!(
            from = current,
            to = spec.gateway.replicas,
            "scaled gateways"
        );
        ctx.publish(cluster, EventType::Normal, "ScaledGateways", "Scale", note)
            .await;
    }
    if worker_replicas != current_workers && observed_worker.is_some() {
        let lag_text = lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
        let note =
            format!("Scaled workers from {current_workers} to {worker_replicas} (lag {lag_text})");
        info!(from = current_workers, to = worker_replicas, lag = ?lag, "scaled workers");
        ctx.publish(cluster, EventType::Normal, "ScaledWorkers", "Scale", note)
            .await;
    }

    // Status.
    let inputs = status::Inputs {
        generation: cluster.metadata.generation,
        gateway_replicas: spec.gateway.replicas,
        worker_replicas,
        lag,
        selector: build::gateway_selector(&name),
        failure: None,
    };
    patch_status(cluster, ctx, &inputs).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// Secrets the spec names, besides the external Redis URL (which is read for the lag anyway).
fn referenced_secrets(cluster: &ChatCluster) -> impl Iterator<Item = &SecretKeyRef> {
    let spec = &cluster.spec;
    let jwt = match spec.auth.mode {
        AuthMode::Jwt => spec.auth.jwt_secret_ref.as_ref(),
        AuthMode::None => None,
    };
    [
        spec.postgres.external.as_ref().map(|e| &e.url_secret_ref),
        jwt,
        spec.auth.api_key_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
}

async fn secret_value(ctx: &Context, namespace: &str, reference: &SecretKeyRef) -> Result<String> {
    let missing = || Error::MissingSecret {
        name: reference.name.clone(),
        key: reference.key.clone(),
    };
    let secret = ctx
        .get_secret(namespace, &reference.name)
        .await?
        .ok_or_else(missing)?;
    let bytes = secret
        .data
        .and_then(|mut data| data.remove(&reference.key))
        .ok_or_else(missing)?;
    String::from_utf8(bytes.0).map_err(|_| missing())
}

fn existing_or_random(secret: Option<&Secret>, key: &str) -> String {
    secret
        .and_then(|s| s.data.as_ref()?.get(key))
        .and_then(|ByteString(bytes)| String::from_utf8(bytes.clone()).ok())
        .unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), GENERATED_SECRET_LEN))
}

/// The persistence lag, or `None` while Redis cannot be read (e.g. still starting).
async fn read_lag(ctx: &Context, redis_url: &str, shards: i32) -> Option<i64> {
    match ctx.lag.total_lag(redis_url, shards).await {
        Ok(lag) => Some(lag),
        Err(error) => {
            warn!(%error, "persistence lag unavailable; keeping the worker count");
            None
        }
    }
}

/// Worker replicas for this round: from the lag when known, else the current count, always
/// within the spec's bounds.
fn scale_workers(cluster: &ChatCluster, ctx: &Context, current: i32, lag: Option<i64>) -> i32 {
    let worker = &cluster.spec.worker;
    let bounded = |replicas: i32| replicas.clamp(worker.min_replicas, worker.max_replicas);
    let Some(lag) = lag else {
        return bounded(current);
    };
    let recommended = autoscale::replicas_for_lag(
        lag,
        worker.target_lag_per_replica,
        worker.min_replicas,
        worker.max_replicas,
    );
    let window =
        Duration::from_secs(u64::try_from(worker.scale_down_stabilization_seconds).unwrap_or(0));
    let now = Instant::now();
    let mut stabilizers = lock(&ctx.stabilizers);
    let stabilizer = stabilizers
        .entry(ObjectRef::from_obj(cluster))
        .or_insert_with(|| Stabilizer::new(now));
    bounded(stabilizer.stabilize(now, bounded(current), recommended, window))
}

async fn apply_children(
    cluster: &ChatCluster,
    ctx: &Context,
    children: &Children,
    observed_secrets: &[Option<Secret>],
) -> Result<()> {
    let stores = &ctx.stores;
    let namespace = cluster.namespace().unwrap_or_default();
    let mut outcomes = Vec::new();
    let sa = std::slice::from_ref(&children.service_account);
    apply_each(
        ctx,
        "ServiceAccount",
        sa,
        lookup(&stores.service_accounts, &namespace),
        &mut outcomes,
    )
    .await?;
    let secret = |name: String| {
        observed_secrets
            .iter()
            .flatten()
            .find(|s| s.name_any() == name)
            .cloned()
            .map(Arc::new)
    };
    apply_each(ctx, "Secret", &children.secrets, secret, &mut outcomes).await?;
    let cm = std::slice::from_ref(&children.haproxy_config);
    apply_each(
        ctx,
        "ConfigMap",
        cm,
        lookup(&stores.config_maps, &namespace),
        &mut outcomes,
    )
    .await?;
    apply_each(
        ctx,
        "StatefulSet",
        &children.statefulsets,
        lookup(&stores.statefulsets, &namespace),
        &mut outcomes,
    )
    .await?;
    apply_each(
        ctx,
        "Service",
        &children.services,
        lookup(&stores.services, &namespace),
        &mut outcomes,
    )
    .await?;
    apply_each(
        ctx,
        "Deployment",
        &children.deployments,
        lookup(&stores.deployments, &namespace),
        &mut outcomes,
    )
    .await?;
    let pdbs = &children.disruption_budgets;
    apply_each(
        ctx,
        "PodDisruptionBudget",
        pdbs,
        lookup(&stores.disruption_budgets, &namespace),
        &mut outcomes,
    )
    .await?;
    let policies = &children.network_policies;
    apply_each(
        ctx,
        "NetworkPolicy",
        policies,
        lookup(&stores.network_policies, &namespace),
        &mut outcomes,
    )
    .await?;
    if !outcomes.is_empty() {
        let created: Vec<String> = outcomes
            .iter()
            .map(|(kind, name)| format!("{kind} {name}"))
            .collect();
        info!(objects = ?created, "created");
        let mut note = format!("Created {}", created.join(", "));
        note.truncate(MAX_NOTE_LEN);
        ctx.publish(cluster, EventType::Normal, "Created", "Create", note)
            .await;
    }
    Ok(())
}

/// Applies `objects` of one kind, comparing each with `observe(name)`; records creations.
async fn apply_each<K>(
    ctx: &Context,
    kind: &'static str,
    objects: &[K],
    observe: impl Fn(String) -> Option<Arc<K>>,
    created: &mut Vec<(&'static str, String)>,
) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    for object in objects {
        let name = object.name_any();
        match ctx.apply(object, observe(name.clone()).as_deref()).await? {
            Applied::Unchanged => {}
            Applied::Updated => info!(kind, name, "updated"),
            Applied::Created => created.push((kind, name)),
        }
    }
    Ok(())
}

/// Patches the status when it differs from the object's; identical status means no write.
async fn patch_status(cluster: &ChatCluster, ctx: &Context, inputs: &status::Inputs) -> Result<()> {
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    let stores = &ctx.stores;
    let gateway = cached(&stores.deployments, names::gateway(&name), &namespace);
    let worker = cached(&stores.deployments, names::worker(&name), &namespace);
    let mut datastores = Vec::new();
    if cluster.spec.redis.managed.is_some() {
        datastores.push((
            Component::Redis,
            cached(&stores.statefulsets, names::redis(&name), &namespace),
        ));
    }
    if cluster.spec.postgres.managed.is_some() {
        datastores.push((
            Component::Postgres,
            cached(&stores.statefulsets, names::postgres(&name), &namespace),
        ));
    }
    let datastores: Vec<(Component, Option<&StatefulSet>)> =
        datastores.iter().map(|(c, s)| (*c, s.as_deref())).collect();
    let observed = Observed {
        gateway: gateway.as_deref(),
        worker: worker.as_deref(),
        datastores: &datastores,
    };
    let previous = cluster.status.as_ref();
    let next = status::compute(previous, inputs, observed, &Time(Timestamp::now()));
    if previous == Some(&next) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": ChatCluster::api_version(&()),
        "kind": ChatCluster::kind(&()),
        "status": next,
    });
    let api: Api<ChatCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    announce_readiness(cluster, ctx, previous, &next).await;
    Ok(())
}

/// An event when the `Ready` condition flips.
async fn announce_readiness(
    cluster: &ChatCluster,
    ctx: &Context,
    previous: Option<&ChatClusterStatus>,
    next: &ChatClusterStatus,
) {
    let ready = |status: Option<&ChatClusterStatus>| {
        status
            .and_then(|s| status::find(s, status::READY))
            .map(|c| c.status == "True")
    };
    let (before, after) = (ready(previous), ready(Some(next)));
    // A new cluster is not ready yet by definition: only report becoming ready and changes.
    if before == after || (before.is_none() && after != Some(true)) {
        return;
    }
    if let Some(condition) = status::find(next, status::READY) {
        let type_ = if after == Some(true) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let note = condition.message.clone();
        ctx.publish(cluster, type_, &condition.reason, "UpdateStatus", note)
            .await;
    }
}

/// Best effort: puts a failure into the status so `kubectl get` shows it.
async fn report_failure(cluster: &ChatCluster, ctx: &Context, error: &Error) {
    let previous = cluster.status.clone().unwrap_or_default();
    let inputs = status::Inputs {
        generation: cluster.metadata.generation,
        gateway_replicas: cluster.spec.gateway.replicas,
        worker_replicas: previous.worker.replicas,
        lag: previous.worker.lag,
        selector: build::gateway_selector(&cluster.name_any()),
        failure: Some((error.reason().to_owned(), error.to_string())),
    };
    if let Err(status_error) = patch_status(cluster, ctx, &inputs).await {
        warn!(error = %status_error, "recording the failure in the status failed");
    }
}

#[cfg(test)]
mod tests;
