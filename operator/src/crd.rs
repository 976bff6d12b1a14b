//! The `ChatCluster` custom resource: the one object a user writes to run a whole chatcluster.
//!
//! Plain data and schema only, no client code. Every field's `///` text becomes the CRD
//! description that `kubectl explain chatcluster.spec...` prints, so it is written for users.
//! Ranges, enums and defaults live in the schema; cross-field rules are CEL
//! `x-kubernetes-validations`, so the API server rejects a bad spec before the operator sees it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of one chatcluster: gateways, workers, their data stores and auth.
#[expect(
    clippy::duplicated_attributes,
    reason = "printcolumn entries repeat their type by design"
)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "chatcluster.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    namespaced,
    shortname = "chat",
    category = "chatcluster",
    status = "ChatClusterStatus",
    derive = "PartialEq",
    doc = "A chatcluster: WebSocket gateways behind HAProxy, persistence workers, Redis and PostgreSQL.",
    scale(
        spec_replicas_path = ".spec.gateway.replicas",
        status_replicas_path = ".status.gateway.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every component is ready"
    ),
    printcolumn(
        name = "Gateways",
        type_ = "integer",
        json_path = ".status.gateway.readyReplicas",
        description = "Ready gateway pods"
    ),
    printcolumn(
        name = "Workers",
        type_ = "integer",
        json_path = ".status.worker.replicas",
        description = "Worker pods the autoscaler asks for"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.worker.lag",
        description = "Entries of the persistence streams not yet read by the workers"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterSpec {
    /// WebSocket gateway pods: replicas, gateway processes per pod and the HAProxy sidecar.
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// Persistence workers that copy the Redis streams into PostgreSQL, autoscaled by stream lag.
    #[serde(default)]
    pub worker: WorkerSpec,
    /// Redis: run by the operator (`managed`) or an existing one (`external`). Exactly one.
    /// Switching between them is allowed; the operator removes what the old mode created
    /// (the data volume follows `managed.pvcRetention`).
    #[serde(default)]
    pub redis: RedisSpec,
    /// PostgreSQL: run by the operator (`managed`) or an existing one (`external`). Exactly one.
    /// Switching between them is allowed; the operator removes what the old mode created
    /// (the data volume and its credentials follow `managed.pvcRetention`).
    #[serde(default)]
    pub postgres: PostgresSpec,
    /// How clients authenticate to the gateways.
    #[serde(default)]
    pub auth: AuthSpec,
    /// Number of persistence stream shards (`STREAM_SHARDS`) in Redis. Immutable: changing it
    /// on a running cluster would strand entries in the old shards, so choose it up front.
    #[serde(default = "default_stream_shards")]
    #[schemars(range(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("streamShards is immutable: entries in the old shards would never reach PostgreSQL; create a new ChatCluster instead"))]
    pub stream_shards: i32,
    /// Messages kept per channel in the Redis history stream (`HISTORY_SIZE`).
    #[serde(default = "default_history_size")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub history_size: i32,
    /// Image pull policy of every container. Empty means the Kubernetes default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
}

/// Image pull policy of every container. Empty means the Kubernetes default.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every container start.
    Always,
    /// Pull only when the node lacks the image.
    IfNotPresent,
    /// Never pull; the image must be on the node (e.g. `kind load docker-image`).
    Never,
}

/// Gateway pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Number of gateway pods. Also the target of the scale subresource
    /// (`kubectl scale chatcluster/NAME --replicas=N`, HorizontalPodAutoscaler).
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Gateway processes (containers) per pod, each on its own Unix socket behind the pod's
    /// HAProxy sidecar.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub processes_per_pod: i32,
    /// Gateway container image.
    #[serde(default = "default_gateway_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Compute resources of each gateway container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Seconds a stopping gateway waits for its connections to drain (`DRAIN_TIMEOUT`).
    /// The pod's termination grace period is this plus 15 seconds.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub drain_timeout_seconds: i32,
    /// The HAProxy sidecar that balances the pod's gateway processes.
    #[serde(default)]
    pub haproxy: HaproxySpec,
    /// The Service in front of the gateway pods.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Where the gateway pods may run.
    #[serde(flatten)]
    pub placement: Placement,
}

/// Where a component's pods may run; each field is passed to the pod spec unchanged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Node labels the pods require (`nodeSelector` of the pod spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Node and pod affinity and anti-affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// How the pods spread over zones, nodes or other topology domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// The HAProxy sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaproxySpec {
    /// HAProxy image (the 2.6 family or newer).
    #[serde(default = "default_haproxy_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Maximum concurrent connections HAProxy accepts per pod.
    #[serde(default = "default_max_conn")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_conn: i32,
    /// Compute resources of the HAProxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// The gateway Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port clients connect to (WebSocket at `/ws`).
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Kubernetes Service types a gateway Service may have.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through the cloud's load balancer.
    LoadBalancer,
}

/// Persistence workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("worker.minReplicas must not be greater than worker.maxReplicas"))]
pub struct WorkerSpec {
    /// Fewest worker pods the autoscaler keeps. With 0, one worker still runs until the workers
    /// have migrated the schema (and created their Redis consumer groups): the gateways cannot
    /// publish before.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most worker pods the autoscaler starts.
    #[serde(default = "default_max_workers")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Unread persistence-stream entries one worker is expected to handle; the operator runs
    /// `ceil(lag / targetLagPerReplica)` workers within `[minReplicas, maxReplicas]`.
    #[serde(default = "default_target_lag")]
    #[schemars(range(min = 1))]
    pub target_lag_per_replica: i64,
    /// Seconds the lag must stay low before workers are scaled down (scale-up is immediate).
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// Entries written to PostgreSQL per batch (`BATCH_SIZE`).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 100_000))]
    pub batch_size: i32,
    /// Longest wait before a partial batch is written (`BATCH_TIMEOUT`), e.g. `5s`, `500ms`.
    #[serde(default = "default_batch_timeout")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(ms|s|m)$"))]
    pub batch_timeout: String,
    /// Idle time after which a live worker claims a dead worker's pending entries
    /// (`CLAIM_IDLE`), e.g. `30s`.
    #[serde(default = "default_claim_idle")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(ms|s|m)$"))]
    pub claim_idle: String,
    /// Worker container image.
    #[serde(default = "default_worker_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Compute resources of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the worker pods may run.
    #[serde(flatten)]
    pub placement: Placement,
}

/// Redis: set exactly one of `managed` or `external`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.managed) != has(self.external)").message("set exactly one of managed or external"))]
pub struct RedisSpec {
    /// Run it in the cluster: a single-replica StatefulSet with a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedis>,
    /// Use an existing Redis (7 or newer) whose URL (`redis://...`, or `rediss://...` for TLS)
    /// is in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalDatastore>,
}

/// PostgreSQL: set exactly one of `managed` or `external`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.managed) != has(self.external)").message("set exactly one of managed or external"))]
pub struct PostgresSpec {
    /// Run it in the cluster: a single-replica StatefulSet with a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedDatastore>,
    /// Use an existing PostgreSQL whose URL (`postgres://...`; add `?sslmode=verify-full` for
    /// TLS) is in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalDatastore>,
}

/// A data store run by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("storageClassName is immutable: a volume cannot move to another StorageClass; create a new ChatCluster instead"))]
#[x_kube(validation = Rule::new("!has(self.storage) || !has(oldSelf.storage) || quantity(self.storage).compareTo(quantity(oldSelf.storage)) >= 0").message("storage can only grow: a volume cannot shrink"))]
pub struct ManagedDatastore {
    /// Container image. Empty means `redis:7.4-alpine` for Redis and `postgres:17-alpine` for
    /// PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Size of the data volume, e.g. `10Gi`. Empty means 1Gi for Redis and 5Gi for
    /// PostgreSQL. Can only grow: the operator then resizes the PersistentVolumeClaim, which
    /// needs a StorageClass with `allowVolumeExpansion: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "storage_schema")]
    pub storage: Option<Quantity>,
    /// StorageClass of the data volume. Empty means the cluster's default class. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// What happens to the data volume when the ChatCluster is deleted: `Retain` (default)
    /// keeps the PersistentVolumeClaim and its data (and, for PostgreSQL, the credentials
    /// Secret, so a ChatCluster created again with the same name uses both), `Delete`
    /// removes it with the cluster.
    #[serde(default)]
    pub pvc_retention: PvcRetention,
    /// Compute resources of the data store container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where the data store pod may run.
    #[serde(flatten)]
    pub placement: Placement,
}

/// A Redis run by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    /// Image, volume, resources and placement, as for PostgreSQL.
    #[serde(flatten)]
    pub store: ManagedDatastore,
    /// When Redis flushes its append-only file to disk (`appendfsync`). `always` (default):
    /// every write is on disk before Redis answers, so a publish the gateway acknowledged
    /// survives a crash of Redis or its node. `everysec`: flushed once a second, faster, but
    /// up to about one second of acknowledged publishes can be lost in a crash.
    #[serde(default)]
    pub append_fsync: AppendFsync,
}

/// Redis `appendfsync` policies the operator offers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppendFsync {
    /// fsync after every write: no acknowledged publish is lost in a crash.
    #[default]
    Always,
    /// fsync once a second: up to about a second of acknowledged publishes can be lost.
    Everysec,
}

impl AppendFsync {
    /// The value of Redis's `--appendfsync` option.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Everysec => "everysec",
        }
    }
}

/// PersistentVolumeClaim retention on deletion of the ChatCluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PvcRetention {
    /// Keep the claim (and its data) after the ChatCluster is deleted.
    #[default]
    Retain,
    /// Delete the claim together with the ChatCluster.
    Delete,
}

/// An existing data store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalDatastore {
    /// The Secret key holding the connection URL.
    pub url_secret_ref: SecretKeyRef,
    /// The Secret key holding the PEM certificate of the CA that signed the server's TLS
    /// certificate, for a server whose certificate no public CA signed. It is mounted into the
    /// gateway and worker pods (`SSL_CERT_DIR` for Redis, `PGSSLROOTCERT` for PostgreSQL) and
    /// used by the operator when it reads the stream lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in the ChatCluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Client authentication.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// `none` lets a client name itself (development only); `jwt` requires an HS256 token.
    #[serde(default)]
    pub mode: AuthMode,
    /// Secret key with the JWT signing secret. With `mode: jwt` and no reference, the operator
    /// generates a random secret in the Secret `<name>-auth`, key `jwt-secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// Secret key with the API key for the gateways' `/api` endpoints (`API_KEY`). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

/// Authentication modes of the gateway (`AUTH_MODE`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: clients name themselves with `login`.
    #[default]
    None,
    /// JSON Web Tokens signed with the configured secret.
    Jwt,
}

impl ChatClusterSpec {
    /// Checks the cross-field rules the CRD also states in CEL, for API servers that were
    /// given an older CRD: `minReplicas <= maxReplicas`, one of `managed`/`external` per store.
    pub fn validate(&self) -> Result<(), String> {
        let worker = &self.worker;
        if worker.min_replicas > worker.max_replicas {
            return Err(format!(
                "worker.minReplicas ({}) is greater than worker.maxReplicas ({})",
                worker.min_replicas, worker.max_replicas
            ));
        }
        let stores = [
            (
                "redis",
                self.redis.managed.is_some(),
                self.redis.external.is_some(),
            ),
            (
                "postgres",
                self.postgres.managed.is_some(),
                self.postgres.external.is_some(),
            ),
        ];
        for (name, managed, external) in stores {
            if managed == external {
                return Err(format!("{name}: set exactly one of managed or external"));
            }
        }
        Ok(())
    }
}

impl AuthMode {
    /// The value of the gateway's `AUTH_MODE` variable.
    pub fn as_env(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Jwt => "jwt",
        }
    }
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, following the Kubernetes API conventions.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Gateway pods.
    #[serde(default)]
    pub gateway: GatewayStatus,
    /// Worker pods and the persistence lag that sizes them.
    #[serde(default)]
    pub worker: WorkerStatus,
    /// Label selector of the gateway pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// Gateway replica counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Gateway pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Gateway pods that pass their readiness probes.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// Worker replica counts and lag.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Worker pods the autoscaler asks for.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that pass their readiness probes.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Total lag of the `persist` consumer group over all shards; absent while Redis cannot
    /// be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: default_gateway_replicas(),
            processes_per_pod: one(),
            image: default_gateway_image(),
            resources: None,
            drain_timeout_seconds: default_drain_seconds(),
            haproxy: HaproxySpec::default(),
            service: ServiceSpec::default(),
            placement: Placement::default(),
        }
    }
}

impl Default for HaproxySpec {
    fn default() -> Self {
        Self {
            image: default_haproxy_image(),
            max_conn: default_max_conn(),
            resources: None,
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
        }
    }
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            min_replicas: one(),
            max_replicas: default_max_workers(),
            target_lag_per_replica: default_target_lag(),
            scale_down_stabilization_seconds: default_stabilization(),
            batch_size: default_batch_size(),
            batch_timeout: default_batch_timeout(),
            claim_idle: default_claim_idle(),
            image: default_worker_image(),
            resources: None,
            placement: Placement::default(),
        }
    }
}

impl Default for RedisSpec {
    fn default() -> Self {
        Self {
            managed: Some(ManagedRedis::default()),
            external: None,
        }
    }
}

impl Default for PostgresSpec {
    fn default() -> Self {
        Self {
            managed: Some(ManagedDatastore::default()),
            external: None,
        }
    }
}

/// A storage size: a string the CEL `quantity()` function accepts, short enough for the API
/// server's rule cost budget.
fn storage_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "nullable": true,
        "maxLength": 32,
        "pattern": "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
    })
}

fn one() -> i32 {
    1
}
fn default_stream_shards() -> i32 {
    4
}
fn default_history_size() -> i32 {
    1000
}
fn default_gateway_replicas() -> i32 {
    2
}
fn default_gateway_image() -> String {
    format!("ghcr.io/chatcluster/gateway:{}", env!("CARGO_PKG_VERSION"))
}
fn default_worker_image() -> String {
    format!("ghcr.io/chatcluster/worker:{}", env!("CARGO_PKG_VERSION"))
}
fn default_haproxy_image() -> String {
    "haproxy:2.6-alpine".to_owned()
}
fn default_drain_seconds() -> i32 {
    10
}
fn default_max_conn() -> i32 {
    50_000
}
fn default_service_port() -> i32 {
    80
}
fn default_max_workers() -> i32 {
    4
}
fn default_target_lag() -> i64 {
    5000
}
fn default_stabilization() -> i32 {
    300
}
fn default_batch_size() -> i32 {
    100
}
fn default_batch_timeout() -> String {
    "5s".to_owned()
}
fn default_claim_idle() -> String {
    "30s".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn crd_json() -> serde_json::Value {
        serde_json::to_value(ChatCluster::crd()).unwrap()
    }

    #[test]
    fn crd_has_names_scope_and_subresources() {
        let crd = crd_json();
        assert_eq!(crd["metadata"]["name"], "chatclusters.chatcluster.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "chat");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        let scale = &version["subresources"]["scale"];
        assert_eq!(scale["specReplicasPath"], ".spec.gateway.replicas");
        assert_eq!(scale["statusReplicasPath"], ".status.gateway.replicas");
        assert_eq!(scale["labelSelectorPath"], ".status.selector");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Ready", "Gateways", "Workers", "Lag", "Age"]);
    }

    #[test]
    fn crd_carries_cel_rules_ranges_and_defaults() {
        let text = serde_json::to_string(&crd_json()).unwrap();
        assert!(
            text.contains("self.minReplicas <= self.maxReplicas"),
            "min <= max rule"
        );
        assert!(
            text.contains("has(self.managed) != has(self.external)"),
            "managed xor external"
        );
        let spec = &crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let gateway = &spec["gateway"]["properties"];
        assert_eq!(gateway["processesPerPod"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(gateway["processesPerPod"]["maximum"].as_f64(), Some(16.0));
        assert_eq!(gateway["replicas"]["default"], 2);
        assert_eq!(
            spec["auth"]["properties"]["mode"]["enum"],
            serde_json::json!(["none", "jwt"])
        );
        let status = &crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"];
        assert_eq!(status["conditions"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            status["conditions"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }

    #[test]
    fn validate_catches_cross_field_errors() {
        let mut spec: ChatClusterSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.validate(), Ok(()));
        spec.worker.min_replicas = 9;
        let error = spec.validate().unwrap_err();
        assert!(
            error.contains("minReplicas (9) is greater than worker.maxReplicas (4)"),
            "{error}"
        );
        spec.worker.min_replicas = 1;
        spec.postgres.managed = None;
        assert_eq!(
            spec.validate().unwrap_err(),
            "postgres: set exactly one of managed or external"
        );
    }

    #[test]
    fn empty_spec_deserializes_to_managed_defaults() {
        let spec: ChatClusterSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.gateway.replicas, 2);
        assert_eq!(spec.worker.min_replicas, 1);
        assert_eq!(spec.stream_shards, 4);
        assert!(spec.redis.managed.is_some() && spec.redis.external.is_none());
        assert_eq!(spec.auth.mode, AuthMode::None);
    }
}
