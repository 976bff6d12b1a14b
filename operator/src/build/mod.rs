//! The pure "build" step: every child object of a `ChatCluster`, computed from its spec.
//!
//! No I/O happens here. The controller fetches what the build needs (the worker replica count
//! chosen by the autoscaler, secret values that must stay stable), calls [`build`], and
//! server-side-applies the result. Keeping this pure is what lets most tests run without an
//! API server.

pub mod datastore;
mod gateway;
pub mod haproxy;
mod policy;
mod worker;

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretProjection,
    SecurityContext, Service, ServiceAccount, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::{AuthMode, ChatCluster, Placement, PullPolicy, SecretKeyRef};
use crate::error::{Error, Result};

/// Label naming the application, on every child.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// Label naming the `ChatCluster` a child belongs to.
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
/// Label naming the component (`gateway`, `worker`, `redis`, `postgres`).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Label naming the manager of a child.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_NAME`].
pub const APP_NAME: &str = "chatcluster";
/// Value of [`LABEL_MANAGED_BY`]; also the server-side-apply field manager.
pub const MANAGER: &str = "chatcluster-operator";
/// Label selector matching every object this operator manages (used to scope its watches).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=chatcluster-operator";
/// Pod template annotation holding the hash of the configuration the pods were started with.
pub const CONFIG_HASH_ANNOTATION: &str = "chatcluster.dev/config-hash";
/// Where every gateway-pod container mounts the shared socket directory.
pub const SOCKET_DIR: &str = "/var/run/chatcluster";
/// Name of the shared emptyDir volume of the gateway pod.
pub const SOCKET_VOLUME: &str = "sockets";
/// Key of the generated JWT secret in the `<name>-auth` Secret.
pub const JWT_SECRET_KEY: &str = "jwt-secret";
/// Key of the connection URL in the generated PostgreSQL Secret.
pub const DATABASE_URL_KEY: &str = "database-url";
/// Key of the password in the generated PostgreSQL Secret.
pub const PASSWORD_KEY: &str = "password";
/// Database user and database name of a managed PostgreSQL.
pub const POSTGRES_USER: &str = "chat";
/// Port of the worker's admin server (`/health`, `/ready`, `/metrics`).
pub const WORKER_ADMIN_PORT: i32 = 9091;
/// Port of the first gateway process's admin server; process `i` uses this plus `i`.
pub const GATEWAY_ADMIN_PORT: i32 = 9100;
/// HAProxy's WebSocket port.
pub const HAPROXY_PORT: i32 = 8080;
/// HAProxy's stats and Prometheus port.
pub const HAPROXY_STATS_PORT: i32 = 8404;
/// Redis port.
pub const REDIS_PORT: i32 = 6379;
/// PostgreSQL port.
pub const POSTGRES_PORT: i32 = 5432;
/// UID/GID our own images (gateway, worker) run as; also the gateway pod's `fsGroup`.
pub const APP_UID: i64 = 10001;
/// Where gateway and worker containers find the external stores' CA certificates.
pub const CA_DIR: &str = "/etc/chatcluster/ca";
/// File of the external Redis's CA in [`CA_DIR`].
pub const REDIS_CA_FILE: &str = "redis-ca.crt";
/// File of the external PostgreSQL's CA in [`CA_DIR`].
pub const POSTGRES_CA_FILE: &str = "postgres-ca.crt";
/// Name of the projected volume with the CA certificates.
const CA_VOLUME: &str = "tls-ca";

/// Names of the children of a `ChatCluster` called `cluster` that belong to no single
/// component's workload; a component's own objects are named by [`Component::object_name`].
pub mod names {
    /// ServiceAccount of every pod.
    pub fn service_account(cluster: &str) -> String {
        cluster.to_owned()
    }
    /// ConfigMap with `haproxy.cfg`.
    pub fn haproxy_config(cluster: &str) -> String {
        format!("{cluster}-haproxy")
    }
    /// ClusterIP Service of the gateway pods' metrics and stats (never exposed to clients).
    pub fn gateway_metrics(cluster: &str) -> String {
        format!("{cluster}-gateway-metrics")
    }
    /// Generated auth Secret.
    pub fn auth(cluster: &str) -> String {
        format!("{cluster}-auth")
    }
}

/// The components of a chatcluster, each with its own pods and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// WebSocket gateway pods (gateway processes + HAProxy).
    Gateway,
    /// Persistence workers.
    Worker,
    /// Managed Redis.
    Redis,
    /// Managed PostgreSQL.
    Postgres,
}

impl Component {
    /// Value of the component label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Worker => "worker",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        }
    }

    /// Name of the component's workload and of its Service, PodDisruptionBudget and
    /// NetworkPolicy where it has them (`<cluster>-<component>`); for PostgreSQL also the
    /// credentials Secret.
    pub fn object_name(self, cluster: &str) -> String {
        format!("{cluster}-{}", self.as_str())
    }
}

/// Values the controller looked up for the build: they must stay stable across reconciles, so
/// they come from the existing Secrets when those exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInputs {
    /// Worker replicas chosen by the autoscaler.
    pub worker_replicas: i32,
    /// Password of the managed PostgreSQL (used only when PostgreSQL is managed).
    pub postgres_password: String,
    /// Generated JWT secret (used only with `auth.mode: jwt` and no `jwtSecretRef`).
    pub jwt_secret: String,
    /// Namespace the operator runs in: the only one whose operator pods may reach Redis.
    pub operator_namespace: String,
}

/// Every object a `ChatCluster` owns, in apply order (what others depend on comes first).
#[derive(Clone, Debug)]
pub struct Children {
    /// ServiceAccount shared by the cluster's pods.
    pub service_account: ServiceAccount,
    /// Generated Secrets (PostgreSQL credentials, JWT secret).
    pub secrets: Vec<Secret>,
    /// ConfigMap holding `haproxy.cfg`.
    pub haproxy_config: ConfigMap,
    /// NetworkPolicies fencing the managed data stores (applied before the stores start).
    pub network_policies: Vec<NetworkPolicy>,
    /// Managed Redis and PostgreSQL StatefulSets.
    pub statefulsets: Vec<StatefulSet>,
    /// Gateway Services (clients; metrics) and the managed data stores' Services.
    pub services: Vec<Service>,
    /// Gateway and worker Deployments.
    pub deployments: Vec<Deployment>,
    /// PodDisruptionBudgets of the gateways and workers.
    pub disruption_budgets: Vec<PodDisruptionBudget>,
}

/// Builds every child of `cluster`. Fails only when the object lacks a namespace or UID
/// (i.e. was not read from the API server).
pub fn build(cluster: &ChatCluster, inputs: &BuildInputs) -> Result<Children> {
    let ctx = BuildContext::new(cluster)?;
    let haproxy_cfg = haproxy::config(&cluster.spec.gateway);
    let haproxy_config = ConfigMap {
        metadata: ctx.meta(names::haproxy_config(&ctx.name), Component::Gateway),
        data: Some(BTreeMap::from([(
            haproxy::CONFIG_FILE.to_owned(),
            haproxy_cfg.clone(),
        )])),
        ..ConfigMap::default()
    };
    let mut secrets = Vec::new();
    let mut statefulsets = Vec::new();
    let mut services = vec![gateway::service(&ctx), gateway::metrics_service(&ctx)];
    if let Some(managed) = &cluster.spec.redis.managed {
        statefulsets.push(datastore::redis_statefulset(&ctx, managed));
        services.push(datastore::service(&ctx, Component::Redis, REDIS_PORT));
    }
    if let Some(managed) = &cluster.spec.postgres.managed {
        secrets.push(datastore::postgres_secret(&ctx, &inputs.postgres_password));
        statefulsets.push(datastore::postgres_statefulset(&ctx, managed));
        services.push(datastore::service(&ctx, Component::Postgres, POSTGRES_PORT));
    }
    if cluster.spec.auth.mode == AuthMode::Jwt && cluster.spec.auth.jwt_secret_ref.is_none() {
        secrets.push(ctx.secret(
            names::auth(&ctx.name),
            Component::Gateway,
            [(JWT_SECRET_KEY, inputs.jwt_secret.as_str())],
        ));
    }
    Ok(Children {
        service_account: ServiceAccount {
            metadata: ctx.meta(names::service_account(&ctx.name), Component::Gateway),
            automount_service_account_token: Some(false),
            ..ServiceAccount::default()
        },
        secrets,
        haproxy_config,
        network_policies: policy::network_policies(&ctx, &inputs.operator_namespace),
        statefulsets,
        services,
        deployments: vec![
            gateway::deployment(&ctx, &config_hash(&haproxy_cfg)),
            worker::deployment(&ctx, inputs.worker_replicas),
        ],
        disruption_budgets: vec![
            policy::disruption_budget(&ctx, Component::Gateway),
            policy::disruption_budget(&ctx, Component::Worker),
        ],
    })
}

/// Label selector (string form) of the gateway pods of a cluster, for the scale subresource.
pub fn gateway_selector(cluster: &str) -> String {
    selector_labels(cluster, Component::Gateway)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Hex SHA-256 of configuration text, put on pod templates so a change rolls the pods.
pub fn config_hash(config: &str) -> String {
    Sha256::digest(config.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The labels that select a component's pods. Immutable once a workload exists.
fn selector_labels(cluster: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_INSTANCE.to_owned(), cluster.to_owned()),
        (LABEL_COMPONENT.to_owned(), component.as_str().to_owned()),
    ])
}

/// What every builder needs: the owner's identity and spec.
pub(crate) struct BuildContext<'a> {
    pub(crate) cluster: &'a ChatCluster,
    pub(crate) name: String,
    pub(crate) namespace: String,
}

impl<'a> BuildContext<'a> {
    fn new(cluster: &'a ChatCluster) -> Result<Self> {
        let namespace = cluster
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        if cluster.controller_owner_ref(&()).is_none() {
            return Err(Error::MissingObjectKey("uid"));
        }
        Ok(Self {
            cluster,
            name: cluster.name_any(),
            namespace,
        })
    }

    /// Metadata of a child: name, namespace, labels and the controller owner reference.
    pub(crate) fn meta(&self, name: String, component: Component) -> ObjectMeta {
        let mut labels = selector_labels(&self.name, component);
        labels.insert(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned());
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: self
                .cluster
                .controller_owner_ref(&())
                .map(|owner| vec![owner]),
            ..ObjectMeta::default()
        }
    }

    /// The selector of a component's pods.
    pub(crate) fn selector(&self, component: Component) -> LabelSelector {
        LabelSelector {
            match_labels: Some(selector_labels(&self.name, component)),
            ..LabelSelector::default()
        }
    }

    /// Labels of a component's pod template.
    pub(crate) fn pod_labels(&self, component: Component) -> BTreeMap<String, String> {
        selector_labels(&self.name, component)
    }

    /// An Opaque Secret with the given string values.
    pub(crate) fn secret<'k>(
        &self,
        name: String,
        component: Component,
        values: impl IntoIterator<Item = (&'k str, &'k str)>,
    ) -> Secret {
        Secret {
            metadata: self.meta(name, component),
            type_: Some("Opaque".to_owned()),
            data: Some(
                values
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    /// Image pull policy from the spec, when set.
    pub(crate) fn pull_policy(&self) -> Option<String> {
        self.cluster.spec.image_pull_policy.map(|p| {
            match p {
                PullPolicy::Always => "Always",
                PullPolicy::IfNotPresent => "IfNotPresent",
                PullPolicy::Never => "Never",
            }
            .to_owned()
        })
    }

    /// `REDIS_URL`: the managed Service, or the external Secret.
    pub(crate) fn redis_url_env(&self) -> EnvVar {
        match &self.cluster.spec.redis.external {
            Some(external) => secret_env("REDIS_URL", &external.url_secret_ref),
            None => plain_env("REDIS_URL", managed_redis_url(&self.name, &self.namespace)),
        }
    }

    /// CA certificates of the external stores, as `(file name, Secret key)`.
    fn ca_files(&self) -> Vec<(&'static str, &SecretKeyRef)> {
        let spec = &self.cluster.spec;
        let redis = spec
            .redis
            .external
            .as_ref()
            .and_then(|e| e.ca_secret_ref.as_ref());
        let postgres = spec
            .postgres
            .external
            .as_ref()
            .and_then(|e| e.ca_secret_ref.as_ref());
        [(REDIS_CA_FILE, redis), (POSTGRES_CA_FILE, postgres)]
            .into_iter()
            .filter_map(|(file, reference)| Some((file, reference?)))
            .collect()
    }

    /// The projected volume holding the external stores' CA certificates, when any is set.
    pub(crate) fn ca_volume(&self) -> Option<Vec<Volume>> {
        let files = self.ca_files();
        if files.is_empty() {
            return None;
        }
        let sources = files
            .into_iter()
            .map(|(file, reference)| VolumeProjection {
                secret: Some(SecretProjection {
                    name: reference.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: reference.key.clone(),
                        path: file.to_owned(),
                        mode: None,
                    }]),
                    optional: None,
                }),
                ..VolumeProjection::default()
            })
            .collect();
        Some(vec![Volume {
            name: CA_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                default_mode: None,
            }),
            ..Volume::default()
        }])
    }

    /// The read-only mount of [`BuildContext::ca_volume`] at [`CA_DIR`].
    pub(crate) fn ca_mount(&self) -> Option<Vec<VolumeMount>> {
        self.ca_volume()?;
        Some(vec![VolumeMount {
            name: CA_VOLUME.to_owned(),
            mount_path: CA_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }])
    }

    /// Where the TLS clients find the CAs: rustls' `SSL_CERT_DIR` (the Redis client) and
    /// libpq's `PGSSLROOTCERT` (the PostgreSQL client).
    pub(crate) fn ca_env(&self) -> Vec<EnvVar> {
        let files = self.ca_files();
        let mut env = Vec::new();
        if files.iter().any(|(file, _)| *file == REDIS_CA_FILE) {
            env.push(plain_env("SSL_CERT_DIR", CA_DIR));
        }
        if files.iter().any(|(file, _)| *file == POSTGRES_CA_FILE) {
            env.push(plain_env(
                "PGSSLROOTCERT",
                format!("{CA_DIR}/{POSTGRES_CA_FILE}"),
            ));
        }
        env
    }

    /// `DATABASE_URL`: from the generated Secret of the managed PostgreSQL, or the external one.
    pub(crate) fn database_url_env(&self) -> EnvVar {
        let reference = match &self.cluster.spec.postgres.external {
            Some(external) => external.url_secret_ref.clone(),
            None => SecretKeyRef {
                name: Component::Postgres.object_name(&self.name),
                key: DATABASE_URL_KEY.to_owned(),
            },
        };
        secret_env("DATABASE_URL", &reference)
    }
}

/// URL of a managed Redis, reachable from any namespace (the operator's too).
pub fn managed_redis_url(cluster: &str, namespace: &str) -> String {
    format!(
        "redis://{}.{namespace}.svc:{REDIS_PORT}",
        Component::Redis.object_name(cluster)
    )
}

/// `spec` with the pod placement of a component (node selector, affinity, tolerations,
/// topology spread, priority class).
pub(crate) fn placed(spec: PodSpec, placement: &Placement) -> PodSpec {
    let Placement {
        node_selector,
        affinity,
        tolerations,
        topology_spread_constraints,
        priority_class_name,
    } = placement.clone();
    PodSpec {
        node_selector,
        affinity,
        tolerations,
        topology_spread_constraints,
        priority_class_name,
        ..spec
    }
}

/// An environment variable with a literal value.
pub(crate) fn plain_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// An environment variable read from a Secret key.
pub(crate) fn secret_env(name: &str, reference: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: reference.name.clone(),
                key: reference.key.clone(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// An environment variable holding the pod's name (downward API).
pub(crate) fn pod_name_env(name: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Pod-level hardening: non-root with the given IDs, `fsGroup` for shared volumes,
/// `RuntimeDefault` seccomp.
pub(crate) fn pod_security(uid: i64, gid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(gid),
        fs_group: Some(gid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// Container-level hardening: read-only root, no privilege escalation, no capabilities.
pub(crate) fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The spec's resources, or `requests` of `cpu`/`memory` and a memory limit as default.
pub(crate) fn resources_or(
    spec: Option<&ResourceRequirements>,
    cpu: &str,
    memory: &str,
    memory_limit: &str,
) -> ResourceRequirements {
    spec.cloned().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity(memory_limit.to_owned()),
        )])),
        ..ResourceRequirements::default()
    })
}

/// An HTTP GET probe on a named or numbered port.
pub(crate) fn http_probe(path: &str, port: IntOrString, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port,
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Adds a chatcluster binary's admin port (`name`, TCP `port`) to `container`,
/// with the readiness probe on `/ready` and the liveness probe on `/health`.
pub(crate) fn with_admin_endpoint(container: Container, name: &str, port: i32) -> Container {
    let probed = IntOrString::Int(port);
    Container {
        ports: Some(vec![ContainerPort {
            name: Some(name.to_owned()),
            container_port: port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/ready", probed.clone(), 5)),
        liveness_probe: Some(http_probe("/health", probed, 10)),
        ..container
    }
}

/// A container with the hardening and pull policy every container gets.
pub(crate) fn hardened_container(ctx: &BuildContext<'_>, name: &str, image: &str) -> Container {
    Container {
        name: name.to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: ctx.pull_policy(),
        security_context: Some(container_security()),
        ..Container::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{ChatClusterSpec, ExternalDatastore};

    /// A cluster as the API server would return it (namespace and UID set).
    pub(crate) fn cluster(spec: serde_json::Value) -> ChatCluster {
        let spec: ChatClusterSpec = serde_json::from_value(spec).unwrap();
        let mut cluster = ChatCluster::new("demo", spec);
        cluster.metadata.namespace = Some("chat".to_owned());
        cluster.metadata.uid = Some("0000-1111".to_owned());
        cluster.metadata.generation = Some(1);
        cluster
    }

    pub(crate) fn inputs() -> BuildInputs {
        BuildInputs {
            worker_replicas: 2,
            postgres_password: "pw".to_owned(),
            jwt_secret: "jwt".to_owned(),
            operator_namespace: "ops".to_owned(),
        }
    }

    fn all_pod_specs(children: &Children) -> Vec<&PodSpec> {
        let deployments = children
            .deployments
            .iter()
            .map(|d| &d.spec.as_ref().unwrap().template);
        let statefulsets = children
            .statefulsets
            .iter()
            .map(|s| &s.spec.as_ref().unwrap().template);
        deployments
            .chain(statefulsets)
            .map(|t| t.spec.as_ref().unwrap())
            .collect()
    }

    #[test]
    fn every_child_is_owned_labelled_and_namespaced() {
        let children = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        let metas: Vec<&ObjectMeta> = std::iter::once(&children.service_account.metadata)
            .chain(std::iter::once(&children.haproxy_config.metadata))
            .chain(children.secrets.iter().map(|o| &o.metadata))
            .chain(children.statefulsets.iter().map(|o| &o.metadata))
            .chain(children.services.iter().map(|o| &o.metadata))
            .chain(children.deployments.iter().map(|o| &o.metadata))
            .chain(children.disruption_budgets.iter().map(|o| &o.metadata))
            .chain(children.network_policies.iter().map(|o| &o.metadata))
            .collect();
        assert_eq!(metas.len(), 15);
        for meta in metas {
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str()),
                ("ChatCluster", "demo")
            );
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("chat"));
            assert_eq!(meta.labels.as_ref().unwrap()[LABEL_MANAGED_BY], MANAGER);
        }
    }

    #[test]
    fn every_pod_is_hardened_and_has_resources() {
        let children = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        let pods = all_pod_specs(&children);
        assert_eq!(pods.len(), 4);
        for pod in pods {
            let security = pod.security_context.as_ref().unwrap();
            assert_eq!(security.run_as_non_root, Some(true));
            assert!(security.fs_group.is_some());
            assert_eq!(
                security.seccomp_profile.as_ref().unwrap().type_,
                "RuntimeDefault"
            );
            for container in &pod.containers {
                let sc = container.security_context.as_ref().unwrap();
                assert_eq!(
                    sc.read_only_root_filesystem,
                    Some(true),
                    "{}",
                    container.name
                );
                assert_eq!(sc.allow_privilege_escalation, Some(false));
                assert_eq!(
                    sc.capabilities.as_ref().unwrap().drop,
                    Some(vec!["ALL".to_owned()])
                );
                let resources = container.resources.as_ref().unwrap();
                assert!(resources.requests.as_ref().unwrap().contains_key("memory"));
                assert!(resources.limits.as_ref().unwrap().contains_key("memory"));
            }
        }
    }

    #[test]
    fn external_datastores_replace_managed_children_and_env() {
        let reference = |name: &str| SecretKeyRef {
            name: name.to_owned(),
            key: "url".to_owned(),
        };
        let spec = serde_json::json!({
            "redis": { "external": ExternalDatastore { url_secret_ref: reference("r"), ca_secret_ref: None } },
            "postgres": { "external": ExternalDatastore { url_secret_ref: reference("p"), ca_secret_ref: Some(reference("p-ca")) } },
        });
        let children = build(&cluster(spec), &inputs()).unwrap();
        assert!(children.statefulsets.is_empty());
        assert!(children.secrets.is_empty());
        assert!(children.network_policies.is_empty());
        assert_eq!(
            children.services.len(),
            2,
            "the gateway's client and metrics Services"
        );
        let worker = &children.deployments[1].spec.as_ref().unwrap().template;
        let env = worker.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap();
        let secret_of = |name: &str| {
            let var = env.iter().find(|e| e.name == name).unwrap();
            var.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name
                .clone()
        };
        assert_eq!(secret_of("REDIS_URL"), "r");
        assert_eq!(secret_of("DATABASE_URL"), "p");
        let value = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            value("PGSSLROOTCERT").as_deref(),
            Some("/etc/chatcluster/ca/postgres-ca.crt"),
            "the PostgreSQL CA is trusted"
        );
        assert_eq!(value("SSL_CERT_DIR"), None, "no Redis CA was given");
        let pod = worker.spec.as_ref().unwrap();
        let projected = pod.volumes.as_ref().unwrap()[0].projected.clone().unwrap();
        let source = projected.sources.unwrap()[0].secret.clone().unwrap();
        assert_eq!(source.name, "p-ca");
        assert_eq!(source.items.unwrap()[0].path, "postgres-ca.crt");
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/chatcluster/ca", Some(true))
        );
    }

    #[test]
    fn placement_reaches_every_pod() {
        let placement = serde_json::json!({
            "nodeSelector": {"pool": "chat"},
            "priorityClassName": "chat-critical",
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "chat", "effect": "NoSchedule"}],
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
        });
        let spec = serde_json::json!({
            "gateway": placement, "worker": placement,
            "redis": {"managed": placement}, "postgres": {"managed": placement},
        });
        let children = build(&cluster(spec), &inputs()).unwrap();
        for pod in all_pod_specs(&children) {
            assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "chat");
            assert_eq!(pod.priority_class_name.as_deref(), Some("chat-critical"));
            assert_eq!(
                pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
                Some("dedicated")
            );
            assert_eq!(
                pod.topology_spread_constraints.as_ref().unwrap()[0].max_skew,
                1
            );
            assert!(pod.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
        }
        let plain = build(&cluster(serde_json::json!({})), &inputs()).unwrap();
        for pod in all_pod_specs(&plain) {
            assert!(pod.affinity.is_none() && pod.tolerations.is_none());
        }
    }

    #[test]
    fn jwt_mode_without_reference_generates_a_secret() {
        let children = build(
            &cluster(serde_json::json!({"auth": {"mode": "jwt"}})),
            &inputs(),
        )
        .unwrap();
        let auth = children
            .secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("demo-auth"));
        let data = auth.unwrap().data.as_ref().unwrap();
        assert_eq!(data[JWT_SECRET_KEY].0, b"jwt");
        let with_ref = serde_json::json!({"auth": {"mode": "jwt", "jwtSecretRef": {"name": "mine", "key": "k"}}});
        let children = build(&cluster(with_ref), &inputs()).unwrap();
        assert!(
            children
                .secrets
                .iter()
                .all(|s| s.metadata.name.as_deref() != Some("demo-auth"))
        );
    }

    #[test]
    fn build_refuses_objects_not_read_from_the_api() {
        let mut unsaved = cluster(serde_json::json!({}));
        unsaved.metadata.uid = None;
        assert!(matches!(
            build(&unsaved, &inputs()),
            Err(Error::MissingObjectKey("uid"))
        ));
    }

    #[test]
    fn selector_string_matches_pod_labels() {
        assert_eq!(
            gateway_selector("demo"),
            "app.kubernetes.io/component=gateway,app.kubernetes.io/instance=demo,app.kubernetes.io/name=chatcluster"
        );
    }

    #[test]
    fn config_hash_is_stable_and_sensitive() {
        assert_eq!(config_hash("a"), config_hash("a"));
        assert_ne!(config_hash("a"), config_hash("b"));
        assert_eq!(config_hash("a").len(), 64);
    }
}
