//! Disruption budgets and network policies.
//!
//! Voluntary evictions (node drains) take gateway and worker pods one at a time. The managed
//! data stores accept connections only from the cluster's own pods; Redis also from the
//! operator's pods in the operator's namespace, which read the persistence lag from it.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    APP_NAME, BuildContext, Component, LABEL_INSTANCE, LABEL_NAME, MANAGER, POSTGRES_PORT,
    REDIS_PORT,
};

/// Label the API server puts on every namespace, holding its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A budget allowing one unavailable pod of `component` at a time.
pub(super) fn disruption_budget(
    ctx: &BuildContext<'_>,
    component: Component,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ctx.meta(component.object_name(&ctx.name), component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(ctx.selector(component)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// One policy per managed data store. Redis also admits the operator's pods, and only those in
/// `operator_namespace`.
pub(super) fn network_policies(
    ctx: &BuildContext<'_>,
    operator_namespace: &str,
) -> Vec<NetworkPolicy> {
    let spec = &ctx.cluster.spec;
    let mut policies = Vec::new();
    if spec.redis.managed.is_some() {
        policies.push(datastore_policy(
            ctx,
            Component::Redis,
            REDIS_PORT,
            Some(operator_namespace),
        ));
    }
    if spec.postgres.managed.is_some() {
        policies.push(datastore_policy(
            ctx,
            Component::Postgres,
            POSTGRES_PORT,
            None,
        ));
    }
    policies
}

fn datastore_policy(
    ctx: &BuildContext<'_>,
    component: Component,
    port: i32,
    operator_namespace: Option<&str>,
) -> NetworkPolicy {
    let labels = |pairs: &[(&str, &str)]| LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..LabelSelector::default()
    };
    let mut from = vec![NetworkPolicyPeer {
        pod_selector: Some(labels(&[
            (LABEL_NAME, APP_NAME),
            (LABEL_INSTANCE, &ctx.name),
        ])),
        ..NetworkPolicyPeer::default()
    }];
    if let Some(namespace) = operator_namespace {
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(labels(&[(NAMESPACE_NAME_LABEL, namespace)])),
            pod_selector: Some(labels(&[(LABEL_NAME, MANAGER)])),
            ..NetworkPolicyPeer::default()
        });
    }
    NetworkPolicy {
        metadata: ctx.meta(component.object_name(&ctx.name), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(ctx.selector(component)),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".to_owned()),
                    end_port: None,
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::build;
    use super::super::tests::{cluster, inputs};

    #[test]
    fn datastores_admit_only_the_cluster_and_redis_the_operator() {
        let children = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        let [redis, postgres] = &children.network_policies[..] else {
            panic!("two policies")
        };
        let rule = |p: &super::NetworkPolicy| p.spec.clone().unwrap().ingress.unwrap().remove(0);
        let redis_rule = rule(redis);
        let redis_from = redis_rule.from.unwrap();
        assert_eq!(redis_from.len(), 2);
        let cluster_pods = redis_from[0]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(cluster_pods["app.kubernetes.io/instance"], "demo");
        let operator = redis_from[1]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap();
        assert_eq!(operator["app.kubernetes.io/name"], "chatcluster-operator");
        let namespace = redis_from[1].namespace_selector.clone().unwrap();
        assert_eq!(
            namespace.match_labels.unwrap()["kubernetes.io/metadata.name"],
            "ops",
            "only the operator's own namespace"
        );
        let postgres_rule = rule(postgres);
        assert_eq!(postgres_rule.from.unwrap().len(), 1);
        let port = postgres_rule.ports.unwrap()[0].port.clone();
        assert_eq!(port, Some(super::IntOrString::Int(5432)));
    }

    #[test]
    fn budgets_allow_one_disruption_per_component() {
        let children = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        let names: Vec<_> = children
            .disruption_budgets
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["demo-gateway", "demo-worker"]);
        for budget in &children.disruption_budgets {
            let spec = budget.spec.as_ref().unwrap();
            assert_eq!(spec.max_unavailable, Some(super::IntOrString::Int(1)));
        }
    }
}
