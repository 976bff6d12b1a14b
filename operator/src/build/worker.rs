//! The worker Deployment. Its replica count comes from the autoscaler, not from the spec.

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    APP_UID, BuildContext, Component, WORKER_ADMIN_PORT, hardened_container, names, placed,
    plain_env, pod_name_env, pod_security, resources_or, with_admin_endpoint,
};

/// The worker Deployment with `replicas` pods.
pub(super) fn deployment(ctx: &BuildContext<'_>, replicas: i32) -> Deployment {
    let cluster = &ctx.cluster.spec;
    let spec = &cluster.worker;
    let mut env = vec![
        ctx.redis_url_env(),
        ctx.database_url_env(),
        pod_name_env("WORKER_ID"),
        plain_env("BATCH_SIZE", spec.batch_size.to_string()),
        plain_env("BATCH_TIMEOUT", spec.batch_timeout.clone()),
        plain_env("CLAIM_IDLE", spec.claim_idle.clone()),
        plain_env("STREAM_SHARDS", cluster.stream_shards.to_string()),
        plain_env("ADMIN_ADDR", format!("0.0.0.0:{WORKER_ADMIN_PORT}")),
        plain_env("LOG_FORMAT", "json"),
    ];
    env.extend(ctx.ca_env());
    let container = Container {
        env: Some(env),
        volume_mounts: ctx.ca_mount(),
        resources: Some(resources_or(
            spec.resources.as_ref(),
            "50m",
            "64Mi",
            "256Mi",
        )),
        ..hardened_container(ctx, "worker", &spec.image)
    };
    let container = with_admin_endpoint(container, "admin", WORKER_ADMIN_PORT);
    Deployment {
        metadata: ctx.meta(Component::Worker.object_name(&ctx.name), Component::Worker),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: ctx.selector(Component::Worker),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.pod_labels(Component::Worker)),
                    ..ObjectMeta::default()
                }),
                spec: Some(placed(
                    PodSpec {
                        service_account_name: Some(names::service_account(&ctx.name)),
                        automount_service_account_token: Some(false),
                        security_context: Some(pod_security(APP_UID, APP_UID)),
                        containers: vec![container],
                        volumes: ctx.ca_volume(),
                        ..PodSpec::default()
                    },
                    &spec.placement,
                )),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::build;
    use super::super::tests::{cluster, inputs};

    #[test]
    fn worker_runs_the_autoscaled_count_with_its_settings() {
        let spec = serde_json::json!({"worker": {"batchSize": 250, "batchTimeout": "2s"}, "streamShards": 8});
        let children = build(&cluster(spec), &inputs()).unwrap();
        let worker = children.deployments[1].spec.clone().unwrap();
        assert_eq!(
            worker.replicas,
            Some(2),
            "replicas come from the autoscaler input"
        );
        let container = &worker.template.spec.unwrap().containers[0];
        let env = container.env.as_ref().unwrap();
        let value = |name: &str| env.iter().find(|e| e.name == name).unwrap().value.clone();
        assert_eq!(value("BATCH_SIZE").as_deref(), Some("250"));
        assert_eq!(value("BATCH_TIMEOUT").as_deref(), Some("2s"));
        assert_eq!(value("CLAIM_IDLE").as_deref(), Some("30s"));
        assert_eq!(value("STREAM_SHARDS").as_deref(), Some("8"));
        assert_eq!(value("ADMIN_ADDR").as_deref(), Some("0.0.0.0:9091"));
        let worker_id = env.iter().find(|e| e.name == "WORKER_ID").unwrap();
        let field = worker_id
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap();
        assert_eq!(field.field_path, "metadata.name");
    }
}
