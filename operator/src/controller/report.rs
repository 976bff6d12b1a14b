//! What a reconcile tells the user: the `ChatCluster` status (patched only when it changed)
//! and events on the object.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::Context;
use super::apply::cached;
use crate::build::{self, Component, MANAGER};
use crate::crd::{ChatCluster, ChatClusterStatus};
use crate::error::{Error, Result};
use crate::status::{self, Observed};

/// Longest event note the API server accepts is 1 kB; ours stay below it.
const MAX_NOTE_LEN: usize = 1000;

impl Context {
    /// Publishes an event on `cluster`; a failure to publish is only logged.
    pub(crate) async fn publish(
        &self,
        cluster: &ChatCluster,
        type_: EventType,
        reason: &str,
        action: &str,
        mut note: String,
    ) {
        if note.len() > MAX_NOTE_LEN {
            let mut end = MAX_NOTE_LEN;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
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
}

/// Patches the status when it differs from the object's; identical status means no write.
pub(crate) async fn patch_status(
    cluster: &ChatCluster,
    ctx: &Context,
    inputs: &status::Inputs,
) -> Result<()> {
    let namespace = cluster.namespace().unwrap_or_default();
    let name = cluster.name_any();
    let stores = &ctx.stores;
    let workload = |component: Component| {
        cached(
            &stores.deployments,
            &component.object_name(&name),
            &namespace,
        )
    };
    let (gateway, worker) = (workload(Component::Gateway), workload(Component::Worker));
    let mut datastores = Vec::new();
    if cluster.spec.redis.managed.is_some() {
        datastores.push(Component::Redis);
    }
    if cluster.spec.postgres.managed.is_some() {
        datastores.push(Component::Postgres);
    }
    let datastores: Vec<_> = datastores
        .into_iter()
        .map(|c| {
            (
                c,
                cached(&stores.statefulsets, &c.object_name(&name), &namespace),
            )
        })
        .collect();
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
pub(crate) async fn report_failure(cluster: &ChatCluster, ctx: &Context, error: &Error) {
    let previous = cluster.status.clone().unwrap_or_default();
    let lag_error = status::lag_error(&previous);
    let inputs = status::Inputs {
        generation: cluster.metadata.generation,
        gateway_replicas: cluster.spec.gateway.replicas,
        worker_replicas: previous.worker.replicas,
        lag: previous.worker.lag,
        selector: build::gateway_selector(&cluster.name_any()),
        failure: Some((error.reason().to_owned(), error.to_string())),
        lag_error,
    };
    if let Err(status_error) = patch_status(cluster, ctx, &inputs).await {
        warn!(error = %status_error, "recording the failure in the status failed");
    }
}
