//! The `ChatCluster` status, computed from what the children report.
//!
//! Pure and deterministic: the same observations give the same status, and a condition's
//! `lastTransitionTime` changes only when its `status` flips. That is what lets the controller
//! skip the status patch of a steady cluster, and lets a script trust `kubectl wait
//! --for=condition=Ready`.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::build::Component;
use crate::crd::{ChatClusterStatus, GatewayStatus, WorkerStatus};

/// Condition type: every component serves.
pub const READY: &str = "Ready";
/// Condition type: a rollout or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: the operator cannot bring the cluster to its spec.
pub const DEGRADED: &str = "Degraded";
/// Condition type: the worker autoscaler can read the persistence lag.
pub const SCALING_ACTIVE: &str = "ScalingActive";
/// Start of the `ScalingActive=False` message; the read error follows.
const LAG_UNAVAILABLE_PREFIX: &str =
    "keeping the worker count: the persistence lag cannot be read: ";

/// The lag read error a status reports, if it reports one.
pub fn lag_error(status: &ChatClusterStatus) -> Option<String> {
    let condition = find(status, SCALING_ACTIVE).filter(|c| c.status == "False")?;
    let message = &condition.message;
    Some(
        message
            .strip_prefix(LAG_UNAVAILABLE_PREFIX)
            .unwrap_or(message)
            .to_owned(),
    )
}

/// What the status is computed from, besides the observed workloads.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// `metadata.generation` of the `ChatCluster`.
    pub generation: Option<i64>,
    /// Gateway pods asked for.
    pub gateway_replicas: i32,
    /// Worker pods asked for (the autoscaler's choice).
    pub worker_replicas: i32,
    /// Total persistence lag, when it could be read.
    pub lag: Option<i64>,
    /// Label selector of the gateway pods.
    pub selector: String,
    /// The reconcile failure to report, as `(reason, message)`.
    pub failure: Option<(String, String)>,
    /// Why the persistence lag could not be read, when it could not.
    pub lag_error: Option<String>,
}

/// The workloads as last observed (absent until created).
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed<'a> {
    /// Gateway Deployment.
    pub gateway: Option<&'a Deployment>,
    /// Worker Deployment.
    pub worker: Option<&'a Deployment>,
    /// Managed data store StatefulSets, with their component.
    pub datastores: &'a [(Component, Option<&'a StatefulSet>)],
}

/// How one workload is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Health {
    replicas: i32,
    ready: i32,
    rolled_out: bool,
    stalled: bool,
}

fn deployment_health(deployment: Option<&Deployment>, desired: i32) -> Health {
    let Some(deployment) = deployment else {
        return Health::default();
    };
    let Some(status) = &deployment.status else {
        return Health::default();
    };
    let replicas = status.replicas.unwrap_or(0);
    let current_generation = status.observed_generation >= deployment.metadata.generation;
    let stalled = status.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    Health {
        replicas,
        ready: status.ready_replicas.unwrap_or(0),
        rolled_out: current_generation
            && status.updated_replicas.unwrap_or(0) >= desired
            && replicas == desired
            && status.available_replicas.unwrap_or(0) >= desired,
        stalled,
    }
}

fn statefulset_health(statefulset: Option<&StatefulSet>) -> Health {
    let Some(statefulset) = statefulset else {
        return Health::default();
    };
    let Some(status) = &statefulset.status else {
        return Health::default();
    };
    let desired = statefulset
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    Health {
        replicas: status.replicas,
        ready: status.ready_replicas.unwrap_or(0),
        rolled_out: status.observed_generation >= statefulset.metadata.generation
            && status.current_revision == status.update_revision
            && status.ready_replicas.unwrap_or(0) >= desired,
        stalled: false,
    }
}

/// Computes the status; `previous` supplies the transition times of unchanged conditions.
pub fn compute(
    previous: Option<&ChatClusterStatus>,
    inputs: &Inputs,
    observed: Observed<'_>,
    now: &Time,
) -> ChatClusterStatus {
    let gateway = deployment_health(observed.gateway, inputs.gateway_replicas);
    let worker = deployment_health(observed.worker, inputs.worker_replicas);
    let mut not_ready = Vec::new();
    let mut rolling = Vec::new();
    let mut stalled = Vec::new();
    let mut check = |name: &str, health: Health, ready_needed: i32| {
        if health.ready < ready_needed {
            not_ready.push(format!("{name} {}/{ready_needed} ready", health.ready));
        }
        if !health.rolled_out {
            rolling.push(name.to_owned());
        }
        if health.stalled {
            stalled.push(name.to_owned());
        }
    };
    check("gateway", gateway, inputs.gateway_replicas);
    check("worker", worker, inputs.worker_replicas.min(1));
    for (component, statefulset) in observed.datastores {
        check(component.as_str(), statefulset_health(*statefulset), 1);
    }

    let previous_conditions = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let last_transition_time = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: inputs.generation,
            last_transition_time,
        }
    };

    // Ready follows the workloads alone: a failed API call does not stop pods from serving.
    let ready = if not_ready.is_empty() {
        condition(
            READY,
            true,
            "AllComponentsReady",
            "every component is ready".to_owned(),
        )
    } else {
        condition(READY, false, "ComponentsNotReady", not_ready.join(", "))
    };
    let progressing = if rolling.is_empty() {
        condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            "every component runs its spec".to_owned(),
        )
    } else {
        condition(
            PROGRESSING,
            true,
            "RollingOut",
            format!("rolling out: {}", rolling.join(", ")),
        )
    };
    let degraded = if let Some((reason, message)) = &inputs.failure {
        condition(DEGRADED, true, reason, message.clone())
    } else if !stalled.is_empty() {
        condition(
            DEGRADED,
            true,
            "RolloutStalled",
            format!("progress deadline exceeded: {}", stalled.join(", ")),
        )
    } else {
        condition(DEGRADED, false, "AsExpected", "no failures".to_owned())
    };

    let scaling = match &inputs.lag_error {
        None => condition(
            SCALING_ACTIVE,
            true,
            "LagRead",
            "the worker count follows the persistence lag".to_owned(),
        ),
        Some(error) => condition(
            SCALING_ACTIVE,
            false,
            "LagUnavailable",
            format!("{LAG_UNAVAILABLE_PREFIX}{error}"),
        ),
    };

    ChatClusterStatus {
        observed_generation: inputs.generation,
        conditions: vec![ready, progressing, degraded, scaling],
        gateway: GatewayStatus {
            replicas: gateway.replicas,
            ready_replicas: gateway.ready,
        },
        worker: WorkerStatus {
            replicas: inputs.worker_replicas,
            ready_replicas: worker.ready,
            lag: inputs.lag,
        },
        selector: Some(inputs.selector.clone()),
    }
}

/// The condition of type `type_`, if present.
pub fn find<'a>(status: &'a ChatClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DeploymentCondition, DeploymentStatus, StatefulSetSpec, StatefulSetStatus,
    };
    use k8s_openapi::jiff::Timestamp;

    fn time(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    fn deployment(ready: i32, replicas: i32) -> Deployment {
        let mut deployment = Deployment::default();
        deployment.metadata.generation = Some(1);
        deployment.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(replicas),
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            updated_replicas: Some(replicas),
            ..DeploymentStatus::default()
        });
        deployment
    }

    fn statefulset(ready: i32) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                ..StatefulSetSpec::default()
            }),
            status: Some(StatefulSetStatus {
                replicas: 1,
                ready_replicas: Some(ready),
                current_revision: Some("r1".to_owned()),
                update_revision: Some("r1".to_owned()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn inputs() -> Inputs {
        Inputs {
            generation: Some(3),
            gateway_replicas: 2,
            worker_replicas: 1,
            lag: Some(42),
            selector: "a=b".to_owned(),
            failure: None,
            lag_error: None,
        }
    }

    fn status_of(condition: &ChatClusterStatus, type_: &str) -> (String, String) {
        let c = find(condition, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn all_ready_reports_ready_and_complete() {
        let (g, w, redis) = (deployment(2, 2), deployment(1, 1), statefulset(1));
        let stores = [(Component::Redis, Some(&redis))];
        let observed = Observed {
            gateway: Some(&g),
            worker: Some(&w),
            datastores: &stores,
        };
        let status = compute(None, &inputs(), observed, &time(10));
        assert_eq!(
            status_of(&status, READY),
            ("True".into(), "AllComponentsReady".into())
        );
        assert_eq!(
            status_of(&status, PROGRESSING),
            ("False".into(), "RolloutComplete".into())
        );
        assert_eq!(
            status_of(&status, DEGRADED),
            ("False".into(), "AsExpected".into())
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(
            status.gateway,
            GatewayStatus {
                replicas: 2,
                ready_replicas: 2
            }
        );
        assert_eq!(status.worker.lag, Some(42));
        assert_eq!(status.selector.as_deref(), Some("a=b"));
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn missing_children_are_not_ready_and_progressing() {
        let stores = [(Component::Postgres, None)];
        let observed = Observed {
            datastores: &stores,
            ..Observed::default()
        };
        let status = compute(None, &inputs(), observed, &time(10));
        let ready = find(&status, READY).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message,
            "gateway 0/2 ready, worker 0/1 ready, postgres 0/1 ready"
        );
        assert_eq!(status_of(&status, PROGRESSING).0, "True");
    }

    #[test]
    fn transition_time_changes_only_when_status_flips() {
        let (g, w) = (deployment(2, 2), deployment(1, 1));
        let observed = Observed {
            gateway: Some(&g),
            worker: Some(&w),
            datastores: &[],
        };
        let first = compute(None, &inputs(), observed, &time(10));
        let again = compute(Some(&first), &inputs(), observed, &time(20));
        assert_eq!(
            first, again,
            "an unchanged cluster gives an identical status"
        );
        let g_down = deployment(1, 2);
        let degraded = Observed {
            gateway: Some(&g_down),
            ..observed
        };
        let flipped = compute(Some(&again), &inputs(), degraded, &time(30));
        assert_eq!(
            find(&flipped, READY).unwrap().last_transition_time,
            time(30)
        );
        assert_eq!(
            find(&flipped, DEGRADED).unwrap().last_transition_time,
            time(10)
        );
    }

    #[test]
    fn failures_degrade_but_readiness_follows_the_workloads() {
        let mut inputs = inputs();
        inputs.failure = Some((
            "ReconcileFailed".to_owned(),
            "Kubernetes API call failed: etcd timeout".to_owned(),
        ));
        let (g, w) = (deployment(2, 2), deployment(1, 1));
        let serving = Observed {
            gateway: Some(&g),
            worker: Some(&w),
            datastores: &[],
        };
        let status = compute(None, &inputs, serving, &time(10));
        assert_eq!(
            status_of(&status, DEGRADED),
            ("True".into(), "ReconcileFailed".into())
        );
        assert_eq!(
            status_of(&status, READY),
            ("True".into(), "AllComponentsReady".into()),
            "a transient API error does not make serving pods unready"
        );
        let status = compute(None, &inputs, Observed::default(), &time(10));
        assert_eq!(status_of(&status, READY).1, "ComponentsNotReady");
    }

    #[test]
    fn unreadable_lag_is_said_once_in_scaling_active() {
        let mut inputs = inputs();
        assert_eq!(
            status_of(
                &compute(None, &inputs, Observed::default(), &time(10)),
                SCALING_ACTIVE
            ),
            ("True".into(), "LagRead".into())
        );
        inputs.lag_error = Some("connection refused".to_owned());
        let first = compute(None, &inputs, Observed::default(), &time(10));
        let condition = find(&first, SCALING_ACTIVE).unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "LagUnavailable")
        );
        assert!(condition.message.ends_with("connection refused"));
        let again = compute(Some(&first), &inputs, Observed::default(), &time(20));
        assert_eq!(first, again, "a lasting outage does not rewrite the status");
    }

    #[test]
    fn stalled_rollout_is_degraded() {
        let mut g = deployment(1, 2);
        if let Some(status) = g.status.as_mut() {
            status.conditions = Some(vec![DeploymentCondition {
                type_: "Progressing".to_owned(),
                status: "False".to_owned(),
                reason: Some("ProgressDeadlineExceeded".to_owned()),
                ..DeploymentCondition::default()
            }]);
        }
        let w = deployment(1, 1);
        let observed = Observed {
            gateway: Some(&g),
            worker: Some(&w),
            datastores: &[],
        };
        let status = compute(None, &inputs(), observed, &time(10));
        assert_eq!(
            status_of(&status, DEGRADED),
            ("True".into(), "RolloutStalled".into())
        );
    }
}
