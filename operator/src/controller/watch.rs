//! What the controller watches: ChatClusters, the children it owns (label-filtered, cached
//! so reconciles compare against them without reads), and the Secrets ChatClusters refer to.
//!
//! Owned workloads trigger a reconcile on spec or readiness changes only, not on every status
//! heartbeat; the other children on any change of their resourceVersion; our own skipped
//! applies change neither.

use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures_util::Stream;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::credentials::referenced_secrets;
use crate::build::MANAGED_SELECTOR;
use crate::crd::ChatCluster;

/// Caches of the ChatClusters and of the owned objects, fed by the controller's watches.
#[derive(Clone)]
pub(crate) struct Stores {
    pub(crate) clusters: Store<ChatCluster>,
    pub(crate) service_accounts: Store<ServiceAccount>,
    pub(crate) config_maps: Store<ConfigMap>,
    pub(crate) services: Store<Service>,
    pub(crate) deployments: Store<Deployment>,
    pub(crate) statefulsets: Store<StatefulSet>,
    pub(crate) disruption_budgets: Store<PodDisruptionBudget>,
    pub(crate) network_policies: Store<NetworkPolicy>,
}

/// An `Api` over one namespace, or all of them.
pub(crate) fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A cache and watch stream of one kind of owned object, limited to objects we manage.
pub(crate) fn owned<K>(
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

/// Metadata of every Secret in scope: a Secret a ChatCluster refers to may appear at any time.
/// Only metadata is fetched; the values are read one by one when a reconcile needs them.
pub(crate) fn secrets(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static {
    watcher(
        api::<PartialObjectMeta<Secret>>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects()
}

/// The ChatClusters in `clusters` that refer to `secret`.
pub(crate) fn clusters_referring_to(
    clusters: &Store<ChatCluster>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<ChatCluster>> {
    let name = secret.name_any();
    let namespace = secret.namespace();
    clusters
        .state()
        .iter()
        .filter(|cluster| cluster.namespace() == namespace)
        .filter(|cluster| referenced_secrets(cluster).any(|r| r.name == name))
        .map(|cluster| ObjectRef::from_obj(&**cluster))
        .collect()
}

fn hash_of(value: impl Hash) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    Some(hasher.finish())
}

/// Changes of a Deployment worth a reconcile: its spec and its rollout progress.
pub(crate) fn deployment_progress(deployment: &Deployment) -> Option<u64> {
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

/// Changes of a StatefulSet worth a reconcile: its spec and its rollout progress.
pub(crate) fn statefulset_progress(statefulset: &StatefulSet) -> Option<u64> {
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
