//! The gateway Deployment and Service: the shared-socket sidecar layout.
//!
//! Each pod runs `processesPerPod` gateway containers, container `i` listening on
//! `/var/run/chatcluster/gateway-<i>.sock` with its admin server on port `9100 + i`, and one
//! HAProxy container in front of them. All containers mount the emptyDir `sockets`; the pod's
//! `fsGroup` makes the 0660 sockets reachable by HAProxy.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, Lifecycle,
    LifecycleHandler, PodSpec, PodTemplateSpec, Service, ServicePort, ServiceSpec, SleepAction,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::haproxy::{self, CONFIG_DIR, LIVENESS_PATH, READINESS_PATH};
use super::{
    APP_UID, BuildContext, CONFIG_HASH_ANNOTATION, Component, GATEWAY_ADMIN_PORT, HAPROXY_PORT,
    HAPROXY_STATS_PORT, SOCKET_DIR, SOCKET_VOLUME, hardened_container, http_probe, names, placed,
    plain_env, pod_name_env, pod_security, resources_or, secret_env, with_admin_endpoint,
};
use crate::crd::{AuthMode, SecretKeyRef, ServiceType};

/// Name of the volume with HAProxy's configuration.
const CONFIG_VOLUME: &str = "haproxy-config";
/// Name of HAProxy's writable runtime volume (its root filesystem is read-only).
const HAPROXY_RUN_VOLUME: &str = "haproxy-run";
/// Extra grace beyond the gateways' drain timeout before the kubelet kills the pod.
const GRACE_MARGIN_SECONDS: i32 = 15;
/// HAProxy's preStop pause: long enough for kube-proxy and ingress controllers to drop the pod
/// from the Service endpoints before HAProxy stops accepting.
pub const PRE_STOP_DELAY_SECONDS: i32 = 5;

/// The gateway Deployment. `config_hash` is the hash of `haproxy.cfg`; a change rolls the pods.
pub(super) fn deployment(ctx: &BuildContext<'_>, config_hash: &str) -> Deployment {
    let spec = &ctx.cluster.spec.gateway;
    let mut containers: Vec<Container> = (0..spec.processes_per_pod)
        .map(|index| gateway_container(ctx, index))
        .collect();
    containers.push(haproxy_container(ctx));
    let annotations = BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned()),
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        (
            "prometheus.io/port".to_owned(),
            HAPROXY_STATS_PORT.to_string(),
        ),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    let mut volumes = vec![
        empty_dir(SOCKET_VOLUME),
        empty_dir(HAPROXY_RUN_VOLUME),
        Volume {
            name: CONFIG_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::haproxy_config(&ctx.name),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.extend(ctx.ca_volume().into_iter().flatten());
    Deployment {
        metadata: ctx.meta(
            Component::Gateway.object_name(&ctx.name),
            Component::Gateway,
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: ctx.selector(Component::Gateway),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.pod_labels(Component::Gateway)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(placed(
                    PodSpec {
                        service_account_name: Some(names::service_account(&ctx.name)),
                        automount_service_account_token: Some(false),
                        security_context: Some(pod_security(APP_UID, APP_UID)),
                        termination_grace_period_seconds: Some(i64::from(
                            spec.drain_timeout_seconds
                                + PRE_STOP_DELAY_SECONDS
                                + GRACE_MARGIN_SECONDS,
                        )),
                        containers,
                        volumes: Some(volumes),
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

/// The gateway Service clients connect to: the WebSocket port only.
pub(super) fn service(ctx: &BuildContext<'_>) -> Service {
    let spec = &ctx.cluster.spec.gateway.service;
    let type_ = match spec.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    let http = service_port("http", spec.port, IntOrString::String("http".to_owned()));
    gateway_service(
        ctx,
        Component::Gateway.object_name(&ctx.name),
        type_,
        vec![http],
    )
}

/// The in-cluster Service of the gateway pods' metrics: HAProxy's stats page and exporter
/// (unauthenticated, so never on the client Service) and every gateway process's admin port.
pub(super) fn metrics_service(ctx: &BuildContext<'_>) -> Service {
    let metrics = IntOrString::String("metrics".to_owned());
    let mut ports = vec![service_port("metrics", HAPROXY_STATS_PORT, metrics)];
    ports.extend(
        (0..ctx.cluster.spec.gateway.processes_per_pod).map(|index| {
            let port = GATEWAY_ADMIN_PORT + index;
            service_port(&admin_port_name(index), port, IntOrString::Int(port))
        }),
    );
    gateway_service(ctx, names::gateway_metrics(&ctx.name), "ClusterIP", ports)
}

fn gateway_service(
    ctx: &BuildContext<'_>,
    name: String,
    type_: &str,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: ctx.meta(name, Component::Gateway),
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(ctx.pod_labels(Component::Gateway)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn service_port(name: &str, port: i32, target: IntOrString) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(target),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Name of gateway process `index`'s admin port.
fn admin_port_name(index: i32) -> String {
    format!("admin-{index}")
}

fn gateway_container(ctx: &BuildContext<'_>, index: i32) -> Container {
    let cluster = &ctx.cluster.spec;
    let spec = &cluster.gateway;
    let admin_port = GATEWAY_ADMIN_PORT + index;
    let mut env = vec![
        pod_name_env("POD_NAME"),
        plain_env("INSTANCE_ID", format!("$(POD_NAME)-{index}")),
        plain_env("SOCKET_PATH", haproxy::socket_path(index)),
        plain_env("ADMIN_ADDR", format!("0.0.0.0:{admin_port}")),
        ctx.redis_url_env(),
        ctx.database_url_env(),
        plain_env("AUTH_MODE", cluster.auth.mode.as_env()),
        plain_env("STREAM_SHARDS", cluster.stream_shards.to_string()),
        plain_env("HISTORY_SIZE", cluster.history_size.to_string()),
        plain_env("DRAIN_TIMEOUT", format!("{}s", spec.drain_timeout_seconds)),
        plain_env("LOG_FORMAT", "json"),
    ];
    env.extend(ctx.ca_env());
    if cluster.auth.mode == AuthMode::Jwt {
        let generated = SecretKeyRef {
            name: names::auth(&ctx.name),
            key: super::JWT_SECRET_KEY.to_owned(),
        };
        env.push(secret_env(
            "JWT_SECRET",
            cluster.auth.jwt_secret_ref.as_ref().unwrap_or(&generated),
        ));
    }
    if let Some(api_key) = &cluster.auth.api_key_secret_ref {
        env.push(secret_env("API_KEY", api_key));
    }
    let container = Container {
        env: Some(env),
        resources: Some(resources_or(
            spec.resources.as_ref(),
            "100m",
            "128Mi",
            "512Mi",
        )),
        volume_mounts: Some(
            std::iter::once(mount(SOCKET_VOLUME, SOCKET_DIR))
                .chain(ctx.ca_mount().into_iter().flatten())
                .collect(),
        ),
        ..hardened_container(ctx, &format!("gateway-{index}"), &spec.image)
    };
    with_admin_endpoint(container, &admin_port_name(index), admin_port)
}

fn haproxy_container(ctx: &BuildContext<'_>) -> Container {
    let spec = &ctx.cluster.spec.gateway.haproxy;
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    };
    let metrics = IntOrString::String("metrics".to_owned());
    Container {
        ports: Some(vec![
            port("http", HAPROXY_PORT),
            port("metrics", HAPROXY_STATS_PORT),
        ]),
        readiness_probe: Some(http_probe(READINESS_PATH, metrics.clone(), 5)),
        liveness_probe: Some(http_probe(LIVENESS_PATH, metrics, 10)),
        // Keep serving while the endpoint controllers take the pod out of the Services.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(PRE_STOP_DELAY_SECONDS),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: Some(resources_or(
            spec.resources.as_ref(),
            "50m",
            "64Mi",
            "256Mi",
        )),
        volume_mounts: Some(vec![
            mount(SOCKET_VOLUME, SOCKET_DIR),
            VolumeMount {
                read_only: Some(true),
                ..mount(CONFIG_VOLUME, CONFIG_DIR)
            },
            mount(HAPROXY_RUN_VOLUME, "/var/lib/haproxy"),
        ]),
        ..hardened_container(ctx, "haproxy", &spec.image)
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        ..VolumeMount::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, inputs};
    use super::super::{build, config_hash};
    use super::*;

    fn pod(spec: serde_json::Value) -> PodSpec {
        let children = build(&cluster(spec), &inputs()).unwrap();
        children.deployments[0]
            .spec
            .clone()
            .unwrap()
            .template
            .spec
            .unwrap()
    }

    fn env<'a>(container: &'a Container, name: &str) -> &'a str {
        let vars = container.env.as_ref().unwrap();
        vars.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .unwrap()
    }

    #[test]
    fn sidecar_layout_shares_the_socket_volume() {
        let pod = pod(serde_json::json!({"gateway": {"processesPerPod": 3}}));
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["gateway-0", "gateway-1", "gateway-2", "haproxy"]);
        for container in &pod.containers {
            let mounts = container.volume_mounts.as_ref().unwrap();
            assert!(
                mounts
                    .iter()
                    .any(|m| m.name == "sockets" && m.mount_path == "/var/run/chatcluster"),
                "{} lacks the socket volume",
                container.name
            );
        }
        let volumes = pod.volumes.as_ref().unwrap();
        let sockets = volumes.iter().find(|v| v.name == "sockets").unwrap();
        assert!(sockets.empty_dir.is_some());
        assert_eq!(pod.security_context.unwrap().fs_group, Some(APP_UID));
    }

    #[test]
    fn each_process_gets_its_socket_and_admin_port() {
        let pod = pod(serde_json::json!({"gateway": {"processesPerPod": 2}}));
        let second = &pod.containers[1];
        assert_eq!(
            env(second, "SOCKET_PATH"),
            "/var/run/chatcluster/gateway-1.sock"
        );
        assert_eq!(env(second, "ADMIN_ADDR"), "0.0.0.0:9101");
        assert_eq!(env(second, "INSTANCE_ID"), "$(POD_NAME)-1");
        assert_eq!(env(second, "STREAM_SHARDS"), "4");
        assert_eq!(env(second, "REDIS_URL"), "redis://demo-redis.chat.svc:6379");
        let readiness = second
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(readiness.path.as_deref(), Some("/ready"));
        assert_eq!(readiness.port, IntOrString::Int(9101));
        assert!(env_names(second).contains(&"DATABASE_URL"));
        assert!(!env_names(second).contains(&"JWT_SECRET"));
    }

    fn env_names(container: &Container) -> Vec<&str> {
        container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect()
    }

    #[test]
    fn haproxy_is_probed_on_its_stats_port_and_has_writable_runtime_dir() {
        let pod = pod(serde_json::json!({}));
        let haproxy = pod.containers.last().unwrap();
        let probe = haproxy
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/healthz"));
        assert_eq!(probe.port, IntOrString::String("metrics".to_owned()));
        let readiness = haproxy.readiness_probe.as_ref().unwrap();
        let readiness = readiness.http_get.as_ref().unwrap();
        assert_eq!(
            readiness.path.as_deref(),
            Some("/ready"),
            "ready only with a gateway up"
        );
        let mounts = haproxy.volume_mounts.as_ref().unwrap();
        assert!(mounts.iter().any(|m| m.mount_path == "/var/lib/haproxy"));
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == CONFIG_DIR && m.read_only == Some(true))
        );
    }

    #[test]
    fn metrics_stay_on_a_cluster_internal_service() {
        let spec = serde_json::json!({"gateway": {"processesPerPod": 2, "service": {"type": "LoadBalancer"}}});
        let children = build(&cluster(spec), &inputs()).unwrap();
        let metrics = &children.services[1];
        assert_eq!(
            metrics.metadata.name.as_deref(),
            Some("demo-gateway-metrics")
        );
        let spec = metrics.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        let ports: Vec<(Option<&str>, i32)> = spec
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("metrics"), 8404),
                (Some("admin-0"), 9100),
                (Some("admin-1"), 9101)
            ]
        );
    }

    #[test]
    fn haproxy_waits_before_stopping_so_endpoints_drop_first() {
        let pod = pod(serde_json::json!({}));
        let haproxy = pod.containers.last().unwrap();
        let pre_stop = haproxy
            .lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap();
        assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 5);
    }

    #[test]
    fn grace_period_exceeds_the_drain_timeout() {
        let pod = pod(serde_json::json!({"gateway": {"drainTimeoutSeconds": 30}}));
        assert_eq!(pod.termination_grace_period_seconds, Some(50));
        assert_eq!(env(&pod.containers[0], "DRAIN_TIMEOUT"), "30s");
    }

    #[test]
    fn jwt_mode_wires_the_secret_into_every_process() {
        let pod =
            pod(serde_json::json!({"auth": {"mode": "jwt"}, "gateway": {"processesPerPod": 2}}));
        for container in &pod.containers[..2] {
            assert_eq!(env(container, "AUTH_MODE"), "jwt");
            let jwt = container
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == "JWT_SECRET")
                .unwrap();
            let selector = jwt
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(
                (selector.name.as_str(), selector.key.as_str()),
                ("demo-auth", "jwt-secret")
            );
        }
    }

    #[test]
    fn config_hash_annotation_follows_haproxy_config() {
        let hash_of = |spec: serde_json::Value| {
            let children = build(&cluster(spec), &inputs()).unwrap();
            let template = children.deployments[0].spec.clone().unwrap().template;
            let hash =
                template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone();
            let cfg = &children.haproxy_config.data.as_ref().unwrap()[haproxy::CONFIG_FILE];
            assert_eq!(hash, config_hash(cfg));
            hash
        };
        let one = hash_of(serde_json::json!({}));
        assert_eq!(one, hash_of(serde_json::json!({})));
        assert_ne!(
            one,
            hash_of(serde_json::json!({"gateway": {"processesPerPod": 2}}))
        );
        assert_ne!(
            one,
            hash_of(serde_json::json!({"gateway": {"haproxy": {"maxConn": 10}}}))
        );
    }

    #[test]
    fn replicas_and_service_follow_the_spec() {
        let spec = serde_json::json!({"gateway": {"replicas": 5, "service": {"type": "NodePort", "port": 8000}}});
        let children = build(&cluster(spec), &inputs()).unwrap();
        assert_eq!(
            children.deployments[0].spec.as_ref().unwrap().replicas,
            Some(5)
        );
        let service = children.services[0].spec.as_ref().unwrap();
        assert_eq!(service.type_.as_deref(), Some("NodePort"));
        let ports = service.ports.as_ref().unwrap();
        assert_eq!(
            ports.len(),
            1,
            "clients reach the WebSocket port only: {ports:?}"
        );
        assert_eq!(ports[0].port, 8000);
        assert_eq!(
            service.selector.as_ref().unwrap()["app.kubernetes.io/component"],
            "gateway"
        );
    }
}
