//! Day-2 storage of the managed stores.
//!
//! A StatefulSet's `volumeClaimTemplates` cannot change once it exists: an apply that touches
//! them is refused (422). So the templates are frozen at creation: an existing StatefulSet is
//! always applied with its live templates. A larger `storage` is carried out the way
//! CloudNativePG does it, by resizing the PersistentVolumeClaim itself (which needs a
//! StorageClass with `allowVolumeExpansion`); shrinking and changing `storageClassName` are
//! refused by the CRD's rules, and reported here too in case an older CRD let them through.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::Context;
use super::apply::{ChildFailure, cached};
use crate::build::datastore::{data_claim_name, storage_request};
use crate::build::{Children, Component, MANAGER};
use crate::crd::{ChatCluster, ManagedDatastore};
use crate::error::Result;
use crate::quantity;

/// The managed stores of `cluster` with their spec.
pub(crate) fn managed_stores(cluster: &ChatCluster) -> Vec<(Component, &ManagedDatastore)> {
    let spec = &cluster.spec;
    let redis = spec
        .redis
        .managed
        .as_ref()
        .map(|m| (Component::Redis, &m.store));
    let postgres = spec
        .postgres
        .managed
        .as_ref()
        .map(|m| (Component::Postgres, m));
    redis.into_iter().chain(postgres).collect()
}

/// The data volume claims of the managed stores that exist.
pub(crate) async fn data_claims(
    ctx: &Context,
    cluster: &ChatCluster,
) -> Result<BTreeMap<&'static str, PersistentVolumeClaim>> {
    let namespace = cluster.namespace().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut claims = BTreeMap::new();
    for (component, _) in managed_stores(cluster) {
        if let Some(claim) = api
            .get_opt(&data_claim_name(component, &cluster.name_any()))
            .await?
        {
            claims.insert(component.as_str(), claim);
        }
    }
    Ok(claims)
}

/// Replaces the claim templates of every desired StatefulSet that exists with the live ones.
pub(crate) fn freeze_claim_templates(ctx: &Context, namespace: &str, children: &mut Children) {
    for desired in &mut children.statefulsets {
        let Some(live) = cached(&ctx.stores.statefulsets, &desired.name_any(), namespace) else {
            continue;
        };
        let templates = live
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.clone());
        if let Some(spec) = desired.spec.as_mut() {
            spec.volume_claim_templates = templates;
        }
    }
}

/// Grows the data volume claims smaller than the spec asks; reports what it cannot do.
pub(crate) async fn grow_volumes(
    ctx: &Context,
    cluster: &ChatCluster,
    claims: &BTreeMap<&'static str, PersistentVolumeClaim>,
) -> Vec<ChildFailure> {
    let mut failures = Vec::new();
    for (component, managed) in managed_stores(cluster) {
        let Some(claim) = claims.get(component.as_str()) else {
            continue;
        };
        let name = claim.name_any();
        let failure = |error: String| ChildFailure {
            kind: "PersistentVolumeClaim",
            name: name.clone(),
            error,
        };
        let spec = claim.spec.as_ref();
        let live_class = spec.and_then(|s| s.storage_class_name.as_deref());
        if let Some(class) = managed.storage_class_name.as_deref()
            && live_class.is_some_and(|live| live != class)
        {
            failures.push(failure(format!(
                "storageClassName is immutable: the volume is of class {}, the spec asks for \
                 {class}; set it back",
                live_class.unwrap_or_default()
            )));
        }
        let wanted = storage_request(component, managed);
        let current = spec
            .and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_default();
        let grow = match (quantity::bytes(&wanted.0), quantity::bytes(&current)) {
            (Ok(wanted), Ok(current)) => wanted > current,
            (Err(error), _) => {
                failures.push(failure(error.to_string()));
                false
            }
            (_, Err(_)) => false,
        };
        if !grow {
            continue;
        }
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": PersistentVolumeClaim::api_version(&()),
            "kind": PersistentVolumeClaim::kind(&()),
            "metadata": {"name": name},
            "spec": {"resources": {"requests": {"storage": wanted}}},
        });
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                info!(claim = %name, from = %current, to = %wanted.0, "growing data volume");
                let note = format!("Growing {name} from {current} to {}", wanted.0);
                ctx.publish(cluster, EventType::Normal, "ResizingVolume", "Resize", note)
                    .await;
            }
            Err(error) => failures.push(failure(format!(
                "cannot grow to {}: {error} (the StorageClass needs allowVolumeExpansion: true)",
                wanted.0
            ))),
        }
    }
    failures
}
