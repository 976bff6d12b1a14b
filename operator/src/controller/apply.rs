//! The apply engine: server-side apply of every child, each on its own, and removal of the
//! children the spec no longer asks for.
//!
//! Each desired child carries the annotation [`APPLIED_HASH_ANNOTATION`], a hash of the object
//! as built. A child whose live copy carries the same hash is not sent again, so a steady
//! cluster costs no writes, a value the API server rewrites (`cpu: 0.5` → `500m`) does not
//! cause an apply on every resync, and a field dropped from the spec changes the hash: the
//! apply then omits it and server-side apply removes it from the child, because our field
//! manager owned it. A child that fails does not stop the others; every failure is returned.

use std::fmt::{self, Debug};
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::Context;
use crate::build::{self, Children, Component, LABEL_INSTANCE, MANAGER, names};
use crate::crd::ChatCluster;
use crate::error::Result;

/// Annotation on every child: hash of the object as the operator last built it.
pub const APPLIED_HASH_ANNOTATION: &str = "chatcluster.dev/applied-hash";

/// One child that could not be applied or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildFailure {
    /// Kind of the child.
    pub kind: &'static str,
    /// Name of the child.
    pub name: String,
    /// What the API server said.
    pub error: String,
}

impl fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.name, self.error)
    }
}

/// What one round of applies did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// `Kind name` of every child created.
    pub(crate) created: Vec<String>,
    /// `Kind name` of every child removed because the spec no longer asks for it.
    pub(crate) removed: Vec<String>,
    /// Children that failed.
    pub(crate) failures: Vec<ChildFailure>,
}

impl Outcome {
    fn failed(&mut self, kind: &'static str, name: String, error: impl fmt::Display) {
        warn!(kind, name, %error, "child failed");
        self.failures.push(ChildFailure {
            kind,
            name,
            error: error.to_string(),
        });
    }
}

/// Puts the hash of `object` (as built, without the annotation) into its annotations.
pub(crate) fn stamp<K: Resource + Serialize>(object: &mut K) -> Result<()> {
    let hash = build::config_hash(&serde_json::to_string(&*object)?);
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash);
    Ok(())
}

/// Stamps every child with its hash (see [`stamp`]).
pub(crate) fn stamp_all(children: &mut Children) -> Result<()> {
    stamp(&mut children.service_account)?;
    stamp(&mut children.haproxy_config)?;
    children.secrets.iter_mut().try_for_each(stamp)?;
    children.network_policies.iter_mut().try_for_each(stamp)?;
    children.statefulsets.iter_mut().try_for_each(stamp)?;
    children.services.iter_mut().try_for_each(stamp)?;
    children.deployments.iter_mut().try_for_each(stamp)?;
    children.disruption_budgets.iter_mut().try_for_each(stamp)
}

fn applied_hash<K: Resource>(object: &K) -> Option<&String> {
    object
        .meta()
        .annotations
        .as_ref()?
        .get(APPLIED_HASH_ANNOTATION)
}

/// Applies every child in dependency order (NetworkPolicies before the stores they fence,
/// Secrets and ConfigMaps before the pods that mount them). `secrets` are the live generated
/// Secrets (they are not watched).
pub(crate) async fn apply_children(
    ctx: &Context,
    namespace: &str,
    children: &Children,
    secrets: &[Secret],
) -> Outcome {
    let stores = &ctx.stores;
    let mut outcome = Outcome::default();
    // One kind after another, each against its own cache.
    macro_rules! apply {
        ($objects:expr, $store:ident) => {
            apply_kind(ctx, $objects, &stores.$store, namespace, &mut outcome).await
        };
    }
    apply!(
        std::slice::from_ref(&children.service_account),
        service_accounts
    );
    let live_secret = |name: &str| {
        secrets
            .iter()
            .find(|s| s.name_any() == name)
            .cloned()
            .map(Arc::new)
    };
    apply_all(ctx, &children.secrets, live_secret, &mut outcome).await;
    apply!(std::slice::from_ref(&children.haproxy_config), config_maps);
    apply!(&children.network_policies, network_policies);
    apply!(&children.statefulsets, statefulsets);
    apply!(&children.services, services);
    apply!(&children.deployments, deployments);
    apply!(&children.disruption_budgets, disruption_budgets);
    outcome
}

/// Applies each of `objects` that differs from its cached copy in `store`.
async fn apply_kind<K>(
    ctx: &Context,
    objects: &[K],
    store: &Store<K>,
    namespace: &str,
    outcome: &mut Outcome,
) where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    apply_all(ctx, objects, |n| cached(store, n, namespace), outcome).await;
}

/// Applies each of `objects` that differs from `observe(name)`; records what happened.
async fn apply_all<K>(
    ctx: &Context,
    objects: &[K],
    observe: impl Fn(&str) -> Option<Arc<K>>,
    outcome: &mut Outcome,
) where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let kind = kind_of::<K>();
    for object in objects {
        let name = object.name_any();
        let observed = observe(&name);
        if observed.as_deref().is_some_and(|live| {
            applied_hash(live).is_some() && applied_hash(live) == applied_hash(object)
        }) {
            continue;
        }
        match server_side_apply(ctx, object).await {
            Ok(()) if observed.is_none() => outcome.created.push(format!("{kind} {name}")),
            Ok(()) => info!(kind, name, "updated"),
            Err(error) => outcome.failed(kind, name, error),
        }
    }
}

async fn server_side_apply<K>(ctx: &Context, object: &K) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let namespace = object.meta().namespace.as_deref().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// A cached child by name.
pub(crate) fn cached<K>(store: &Store<K>, name: &str, namespace: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// Removes the children of `cluster` the spec no longer asks for (after a switch to an
/// external store, from `jwt` to `none`, …): objects in the caches with the cluster's instance
/// label and its controller owner reference that are not among `children`. The generated
/// Secrets are not cached and are looked up by name; the PostgreSQL credentials stay while
/// their data volume does.
pub(crate) async fn prune(ctx: &Context, cluster: &ChatCluster, children: &Children) -> Outcome {
    let mut outcome = Outcome::default();
    let Some(uid) = cluster.uid() else {
        return outcome;
    };
    let namespace = cluster.namespace().unwrap_or_default();
    let ours = |meta: &kube::api::ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace.as_str())
            && meta.labels.as_ref().and_then(|l| l.get(LABEL_INSTANCE)) == Some(&cluster.name_any())
            && meta
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.uid == uid)
    };
    let stores = &ctx.stores;
    prune_kind(
        ctx,
        &stores.network_policies,
        &children.network_policies,
        &ours,
        &mut outcome,
    )
    .await;
    prune_kind(
        ctx,
        &stores.statefulsets,
        &children.statefulsets,
        &ours,
        &mut outcome,
    )
    .await;
    prune_kind(
        ctx,
        &stores.services,
        &children.services,
        &ours,
        &mut outcome,
    )
    .await;
    prune_kind(
        ctx,
        &stores.deployments,
        &children.deployments,
        &ours,
        &mut outcome,
    )
    .await;
    let pdbs = &children.disruption_budgets;
    prune_kind(ctx, &stores.disruption_budgets, pdbs, &ours, &mut outcome).await;
    let generated = [
        names::auth(&cluster.name_any()),
        Component::Postgres.object_name(&cluster.name_any()),
    ];
    for name in generated {
        if children.secrets.iter().any(|s| s.name_any() == name) {
            continue;
        }
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        match api.get_opt(&name).await {
            Ok(Some(secret)) if ours(secret.meta()) && !held_by_claim(&secret) => {
                delete(ctx, &secret, &mut outcome).await;
            }
            Ok(_) => {}
            Err(error) => outcome.failed("Secret", name, error),
        }
    }
    outcome
}

/// Deletes the cached objects of one kind that `ours` claims and `desired` lacks.
async fn prune_kind<K>(
    ctx: &Context,
    store: &Store<K>,
    desired: &[K],
    ours: &impl Fn(&kube::api::ObjectMeta) -> bool,
    outcome: &mut Outcome,
) where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    for object in store.state() {
        let name = object.name_any();
        if ours(object.meta()) && !desired.iter().any(|d| d.name_any() == name) {
            delete(ctx, &*object, outcome).await;
        }
    }
}

/// Whether a data volume claim also owns `secret` (the PostgreSQL credentials while the data
/// they open exists).
fn held_by_claim(secret: &Secret) -> bool {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "PersistentVolumeClaim")
}

async fn delete<K>(ctx: &Context, object: &K, outcome: &mut Outcome)
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let kind = kind_of::<K>();
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {
            info!(kind, name, "removed: the spec no longer asks for it");
            outcome.removed.push(format!("{kind} {name}"));
        }
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => outcome.failed(kind, name, error),
    }
}

fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}
