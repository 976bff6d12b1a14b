//! Managed Redis and PostgreSQL: single-replica StatefulSets with a data volume, their
//! Services and the generated PostgreSQL credentials.
//!
//! Both stores share one StatefulSet shape; what differs (image, user, port, command, probes,
//! where the data lives) is described by a [`Store`] value.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, Secret, Service, ServicePort,
    ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    BuildContext, Component, DATABASE_URL_KEY, PASSWORD_KEY, POSTGRES_PORT, POSTGRES_USER,
    REDIS_PORT, hardened_container, names, placed, plain_env, pod_security, resources_or,
};
use crate::crd::{ManagedDatastore, ManagedRedis, PvcRetention, SecretKeyRef};

/// Name of the data volume claim template.
pub const DATA_VOLUME: &str = "data";
/// Data volume size of a managed Redis without `storage`.
const REDIS_DEFAULT_STORAGE: &str = "1Gi";
/// Data volume size of a managed PostgreSQL without `storage`.
const POSTGRES_DEFAULT_STORAGE: &str = "5Gi";
/// Period of the data stores' startup probes.
const STARTUP_PERIOD_SECONDS: i32 = 5;
/// Longest Redis start (loading its append-only file).
const REDIS_STARTUP_SECONDS: i32 = 300;
/// Longest PostgreSQL start (`initdb` on a slow volume, crash recovery).
const POSTGRES_STARTUP_SECONDS: i32 = 600;

/// What distinguishes one managed store from the other.
struct Store {
    component: Component,
    default_image: &'static str,
    /// UID/GID the image's server runs as.
    uid: i64,
    port: i32,
    data_path: &'static str,
    /// Writable scratch directories the server needs besides its data volume.
    scratch: &'static [&'static str],
    args: Vec<String>,
    env: Vec<EnvVar>,
    readiness: Vec<String>,
    /// Longest first start (an `initdb`, a large AOF to load) before liveness checks begin.
    startup_seconds: i32,
}

/// The managed Redis: AOF persistence on the data volume, flushed as `appendFsync` says.
pub(super) fn redis_statefulset(ctx: &BuildContext<'_>, managed: &ManagedRedis) -> StatefulSet {
    let args = [
        "redis-server",
        "--appendonly",
        "yes",
        "--appendfsync",
        managed.append_fsync.as_arg(),
        "--dir",
        "/data",
        "--protected-mode",
        "no",
    ];
    statefulset(
        ctx,
        &managed.store,
        Store {
            component: Component::Redis,
            default_image: "redis:7.4-alpine",

            uid: 999,
            port: REDIS_PORT,
            data_path: "/data",
            scratch: &[],
            args: args.map(str::to_owned).to_vec(),
            env: Vec::new(),
            readiness: ["redis-cli", "ping"].map(str::to_owned).to_vec(),
            startup_seconds: REDIS_STARTUP_SECONDS,
        },
    )
}

/// The managed PostgreSQL, its password from the generated Secret.
pub(super) fn postgres_statefulset(
    ctx: &BuildContext<'_>,
    managed: &ManagedDatastore,
) -> StatefulSet {
    let password = SecretKeyRef {
        name: Component::Postgres.object_name(&ctx.name),
        key: PASSWORD_KEY.to_owned(),
    };
    statefulset(
        ctx,
        managed,
        Store {
            component: Component::Postgres,
            default_image: "postgres:17-alpine",

            uid: 70,
            port: POSTGRES_PORT,
            data_path: "/var/lib/postgresql/data",
            scratch: &["/var/run/postgresql", "/tmp"],
            args: Vec::new(),
            env: vec![
                plain_env("POSTGRES_USER", POSTGRES_USER),
                plain_env("POSTGRES_DB", POSTGRES_USER),
                super::secret_env("POSTGRES_PASSWORD", &password),
                plain_env("PGDATA", "/var/lib/postgresql/data/pgdata"),
            ],
            readiness: [
                "pg_isready",
                "-h",
                "127.0.0.1",
                "-U",
                POSTGRES_USER,
                "-d",
                POSTGRES_USER,
            ]
            .map(str::to_owned)
            .to_vec(),
            startup_seconds: POSTGRES_STARTUP_SECONDS,
        },
    )
}

/// The Service of a managed store.
pub(super) fn service(ctx: &BuildContext<'_>, component: Component, port: i32) -> Service {
    Service {
        metadata: ctx.meta(component.object_name(&ctx.name), component),
        spec: Some(ServiceSpec {
            selector: Some(ctx.pod_labels(component)),
            ports: Some(vec![ServicePort {
                name: Some(component.as_str().to_owned()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The generated credentials of the managed PostgreSQL, with the full `DATABASE_URL`.
pub(super) fn postgres_secret(ctx: &BuildContext<'_>, password: &str) -> Secret {
    let name = Component::Postgres.object_name(&ctx.name);
    let url = format!(
        "postgres://{POSTGRES_USER}:{password}@{name}.{}.svc:{POSTGRES_PORT}/{POSTGRES_USER}",
        ctx.namespace
    );
    ctx.secret(
        name,
        Component::Postgres,
        [
            ("username", POSTGRES_USER),
            (PASSWORD_KEY, password),
            (DATABASE_URL_KEY, url.as_str()),
        ],
    )
}

/// Size of a managed store's data volume: the spec's, or the store's default.
pub fn storage_request(component: Component, managed: &ManagedDatastore) -> Quantity {
    let default = match component {
        Component::Redis => REDIS_DEFAULT_STORAGE,
        _ => POSTGRES_DEFAULT_STORAGE,
    };
    managed
        .storage
        .clone()
        .unwrap_or_else(|| Quantity(default.to_owned()))
}

/// Name of the data volume claim the StatefulSet controller makes for pod 0 of `component`.
pub fn data_claim_name(component: Component, cluster: &str) -> String {
    format!("{DATA_VOLUME}-{}-0", component.object_name(cluster))
}

fn statefulset(ctx: &BuildContext<'_>, managed: &ManagedDatastore, store: Store) -> StatefulSet {
    let name = store.component.object_name(&ctx.name);
    let image = managed.image.as_deref().unwrap_or(store.default_image);
    let storage = storage_request(store.component, managed);
    let retention = match managed.pvc_retention {
        PvcRetention::Retain => "Retain",
        PvcRetention::Delete => "Delete",
    };
    let mut mounts = vec![VolumeMount {
        name: DATA_VOLUME.to_owned(),
        mount_path: store.data_path.to_owned(),
        ..VolumeMount::default()
    }];
    let mut volumes = Vec::new();
    for (index, path) in store.scratch.iter().enumerate() {
        let volume = format!("scratch-{index}");
        mounts.push(VolumeMount {
            name: volume.clone(),
            mount_path: (*path).to_owned(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: volume,
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
    let container = Container {
        args: (!store.args.is_empty()).then_some(store.args),
        env: (!store.env.is_empty()).then_some(store.env),
        ports: Some(vec![ContainerPort {
            name: Some(store.component.as_str().to_owned()),
            container_port: store.port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(store.readiness.clone()),
            }),
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            timeout_seconds: Some(3),
            failure_threshold: Some(store.startup_seconds / STARTUP_PERIOD_SECONDS),
            ..Probe::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(store.readiness),
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(store.port),
                host: None,
            }),
            period_seconds: Some(10),
            ..Probe::default()
        }),
        resources: Some(resources_or(
            managed.resources.as_ref(),
            "100m",
            "256Mi",
            "1Gi",
        )),
        volume_mounts: Some(mounts),
        ..hardened_container(ctx, store.component.as_str(), image)
    };
    StatefulSet {
        metadata: ctx.meta(name.clone(), store.component),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(name),
            selector: ctx.selector(store.component),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.to_owned()),
                    when_scaled: Some("Retain".to_owned()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.pod_labels(store.component)),
                    ..ObjectMeta::default()
                }),
                spec: Some(placed(
                    PodSpec {
                        service_account_name: Some(names::service_account(&ctx.name)),
                        automount_service_account_token: Some(false),
                        security_context: Some(pod_security(store.uid, store.uid)),
                        containers: vec![container],
                        volumes: (!volumes.is_empty()).then_some(volumes),
                        ..PodSpec::default()
                    },
                    &managed.placement,
                )),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.to_owned()),
                    labels: Some(ctx.pod_labels(store.component)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    storage_class_name: managed.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_owned(), storage)])),
                        limits: None,
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::build;
    use super::super::tests::{cluster, inputs};
    use super::*;

    fn statefulsets(spec: serde_json::Value) -> Vec<StatefulSet> {
        build(&cluster(spec), &inputs()).unwrap().statefulsets
    }

    #[test]
    fn redis_uses_aof_on_its_volume() {
        let redis = &statefulsets(serde_json::json!({}))[0];
        let spec = redis.spec.as_ref().unwrap();
        let container = &spec.template.spec.as_ref().unwrap().containers[0];
        let args = container.args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--appendonly yes") && args.contains("--dir /data"),
            "{args}"
        );
        assert!(
            args.contains("--appendfsync always"),
            "acknowledged publishes survive a crash by default: {args}"
        );
        assert_eq!(container.image.as_deref(), Some("redis:7.4-alpine"));
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        let requests = claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref();
        assert_eq!(requests.unwrap()["storage"], Quantity("1Gi".to_owned()));
        assert_eq!(
            container.volume_mounts.as_ref().unwrap()[0].mount_path,
            "/data"
        );
    }

    #[test]
    fn append_fsync_follows_the_spec() {
        let spec = serde_json::json!({"redis": {"managed": {"appendFsync": "everysec"}}});
        let redis = &statefulsets(spec)[0];
        let container = &redis
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let args = container.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--appendfsync everysec"), "{args}");
    }

    #[test]
    fn stores_get_a_startup_probe_for_slow_first_starts() {
        let postgres = &statefulsets(serde_json::json!({}))[1];
        let container = &postgres
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        let startup = container.startup_probe.as_ref().unwrap();
        assert_eq!(
            startup.exec.as_ref().unwrap().command.as_ref().unwrap()[0],
            "pg_isready"
        );
        assert_eq!(
            startup.period_seconds.unwrap() * startup.failure_threshold.unwrap(),
            600,
            "ten minutes for initdb"
        );
        assert!(
            container
                .liveness_probe
                .as_ref()
                .unwrap()
                .initial_delay_seconds
                .is_none()
        );
    }

    #[test]
    fn claim_names_and_default_sizes() {
        assert_eq!(
            data_claim_name(Component::Postgres, "demo"),
            "data-demo-postgres-0"
        );
        let default = ManagedDatastore::default();
        assert_eq!(storage_request(Component::Redis, &default).0, "1Gi");
        assert_eq!(storage_request(Component::Postgres, &default).0, "5Gi");
    }

    #[test]
    fn pvc_retention_and_storage_follow_the_spec() {
        let spec = serde_json::json!({"postgres": {"managed": {
            "storage": "20Gi", "storageClassName": "fast", "pvcRetention": "Delete"}}});
        let postgres = &statefulsets(spec)[1];
        let spec = postgres.spec.as_ref().unwrap();
        let policy = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .unwrap();
        assert_eq!(policy.when_deleted.as_deref(), Some("Delete"));
        let claim = spec.volume_claim_templates.as_ref().unwrap()[0]
            .spec
            .clone()
            .unwrap();
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim.resources.unwrap().requests.unwrap()["storage"],
            Quantity("20Gi".to_owned())
        );
        let default = &statefulsets(serde_json::json!({}))[0];
        let default_policy = default
            .spec
            .as_ref()
            .unwrap()
            .persistent_volume_claim_retention_policy
            .clone();
        assert_eq!(
            default_policy.unwrap().when_deleted.as_deref(),
            Some("Retain")
        );
    }

    #[test]
    fn postgres_gets_writable_scratch_and_secret_password() {
        let postgres = &statefulsets(serde_json::json!({}))[1];
        let pod = postgres
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .clone()
            .unwrap();
        let container = &pod.containers[0];
        let paths: Vec<&str> = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(
            paths,
            ["/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"]
        );
        let password = container
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "POSTGRES_PASSWORD");
        let selector = password
            .unwrap()
            .value_from
            .clone()
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            ("demo-postgres", "password")
        );
    }

    #[test]
    fn postgres_secret_holds_a_complete_url() {
        let children = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        let data = children.secrets[0].data.clone().unwrap();
        assert_eq!(
            String::from_utf8(data[DATABASE_URL_KEY].0.clone()).unwrap(),
            "postgres://chat:pw@demo-postgres.chat.svc:5432/chat"
        );
        assert_eq!(data[PASSWORD_KEY].0, b"pw");
    }
}
