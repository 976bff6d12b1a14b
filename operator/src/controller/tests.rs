//! Reconcile I/O against a mocked API server (the tower-test `ApiServerVerifier` style).
//!
//! The fake answers every request like an API server would (GET of a missing object is a 404,
//! an apply echoes its body) and records it; each test then asserts on exactly which writes
//! the reconcile made.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::StatusCode;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Resource;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::apply::stamp_all;
use super::*;
use crate::build::tests::cluster;
use crate::build::{Children, PASSWORD_KEY};
use crate::crd::ChatClusterStatus;
use crate::fake_api::{self, Call};

/// Classifies recorded requests.
trait CallKind {
    fn is_apply(&self) -> bool;
    fn is_status(&self) -> bool;
    fn is_event(&self) -> bool;
}

impl CallKind for Call {
    fn is_apply(&self) -> bool {
        self.method == "PATCH" && self.path.contains("fieldManager=chatcluster-operator")
    }
    fn is_status(&self) -> bool {
        self.is_apply() && self.path.contains("/chatclusters/demo/status")
    }
    fn is_event(&self) -> bool {
        self.path
            .starts_with("/apis/events.k8s.io/v1/namespaces/chat/events")
    }
}

/// A lag source returning a fixed value, or failing like an unreachable Redis; counts reads.
/// The third field says whether the workers' consumer groups are there (prepared).
struct FixedLag(
    Option<i64>,
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicBool,
);

impl LagSource for FixedLag {
    fn total_lag<'a>(
        &'a self,
        _url: &'a str,
        _ca: Option<&'a str>,
        _shards: i32,
    ) -> BoxFuture<'a, Result<autoscale::Backlog>> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prepared = self.2.load(std::sync::atomic::Ordering::Relaxed);
        let result = self
            .0
            .map(|lag| autoscale::Backlog { lag, prepared })
            .ok_or_else(|| {
                Error::Redis(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "connection refused",
                )))
            });
        Box::pin(async move { result })
    }
}

/// Writers of the controller's caches, to put "observed" objects in them.
struct Writers {
    clusters: Writer<ChatCluster>,
    service_accounts: Writer<ServiceAccount>,
    config_maps: Writer<ConfigMap>,
    services: Writer<Service>,
    deployments: Writer<Deployment>,
    statefulsets: Writer<StatefulSet>,
    disruption_budgets: Writer<PodDisruptionBudget>,
    network_policies: Writer<NetworkPolicy>,
}

fn observe<K>(writer: &mut Writer<K>, object: &K)
where
    K: Resource<DynamicType = ()> + Clone,
{
    writer.apply_watcher_event(&watcher::Event::Apply(object.clone()));
}

impl Writers {
    /// Puts every child into the caches as if the API server held exactly that.
    fn observe_all(&mut self, children: &Children) {
        observe(&mut self.service_accounts, &children.service_account);
        observe(&mut self.config_maps, &children.haproxy_config);
        children
            .services
            .iter()
            .for_each(|o| observe(&mut self.services, o));
        children
            .deployments
            .iter()
            .for_each(|o| observe(&mut self.deployments, o));
        children
            .statefulsets
            .iter()
            .for_each(|o| observe(&mut self.statefulsets, o));
        children
            .disruption_budgets
            .iter()
            .for_each(|o| observe(&mut self.disruption_budgets, o));
        children
            .network_policies
            .iter()
            .for_each(|o| observe(&mut self.network_policies, o));
    }
}

/// Objects the fake API server returns for GETs, by path; everything else is a 404.
type Objects = HashMap<String, Value>;

struct Harness {
    ctx: Arc<Context>,
    writers: Writers,
    calls: fake_api::Calls,
    lag: Arc<FixedLag>,
}

/// A fake API server holding `objects`, whose applies to paths containing `fail` fail.
fn harness(lag: Option<i64>, objects: Objects, fail: Option<&'static str>) -> Harness {
    let fail_applies = fail.is_some();
    let failing = fail.unwrap_or_default();
    let (client, calls) = fake_api::client(move |call| match call.method.as_str() {
        "GET" => match objects.get(call.path.split('?').next().unwrap_or_default()) {
            Some(object) => (StatusCode::OK, object.clone()),
            None => (
                StatusCode::NOT_FOUND,
                fake_api::failure(404, "NotFound", "not found"),
            ),
        },
        "PATCH" if fail_applies && call.path.contains(failing) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            fake_api::failure(500, "InternalError", "etcd unavailable"),
        ),
        // An apply of a status carries no metadata or spec; the server returns them.
        _ => {
            let mut reply = call.body.clone();
            if let Some(object) = reply.as_object_mut() {
                object
                    .entry("metadata")
                    .or_insert_with(|| json!({"name": "demo"}));
                object.entry("spec").or_insert_with(|| json!({}));
            }
            (StatusCode::OK, reply)
        }
    });
    let (cluster_store, clusters) = reflector::store();
    let (sa_store, service_accounts) = reflector::store();
    let (cm_store, config_maps) = reflector::store();
    let (svc_store, services) = reflector::store();
    let (deploy_store, deployments) = reflector::store();
    let (sts_store, statefulsets) = reflector::store();
    let (pdb_store, disruption_budgets) = reflector::store();
    let (np_store, network_policies) = reflector::store();
    let stores = Stores {
        clusters: cluster_store,
        service_accounts: sa_store,
        config_maps: cm_store,
        services: svc_store,
        deployments: deploy_store,
        statefulsets: sts_store,
        disruption_budgets: pdb_store,
        network_policies: np_store,
    };
    let writers = Writers {
        clusters,
        service_accounts,
        config_maps,
        services,
        deployments,
        statefulsets,
        disruption_budgets,
        network_policies,
    };
    let reporter = Reporter {
        controller: "chatcluster-operator".to_owned(),
        instance: None,
    };
    let lag = Arc::new(FixedLag(
        lag,
        Default::default(),
        std::sync::atomic::AtomicBool::new(true),
    ));
    let ctx = Context::new(
        client,
        reporter,
        Metrics::default(),
        stores,
        lag.clone(),
        Settings::default(),
    );
    Harness {
        ctx: Arc::new(ctx),
        writers,
        calls,
        lag,
    }
}

impl Harness {
    /// How often the lag source was asked.
    fn lag_reads(&self) -> usize {
        self.lag.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs one reconcile and returns its result with every request it made.
    async fn reconcile(&mut self, cluster: &ChatCluster) -> (Result<Action>, Vec<Call>) {
        observe(&mut self.writers.clusters, cluster);
        let result = super::reconcile(Arc::new(cluster.clone()), Arc::clone(&self.ctx)).await;
        (result, fake_api::take(&self.calls))
    }
}

fn postgres_secret_object(password: &str) -> Value {
    let children = built(&cluster(json!({})), &inputs_with(1, password));
    serde_json::to_value(&children.secrets[0]).unwrap()
}

fn inputs_with(workers: i32, password: &str) -> BuildInputs {
    BuildInputs {
        worker_replicas: workers,
        postgres_password: password.to_owned(),
        jwt_secret: "unused".to_owned(),
        operator_namespace: Settings::default().operator_namespace,
    }
}

/// The children as the operator applies them (stamped with their hash).
fn built(cluster: &ChatCluster, inputs: &BuildInputs) -> Children {
    let mut children = build::build(cluster, inputs).unwrap();
    stamp_all(&mut children).unwrap();
    children
}

const POSTGRES_SECRET_PATH: &str = "/api/v1/namespaces/chat/secrets/demo-postgres";

fn applied_kinds(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.is_apply() && !c.is_status())
        .map(|c| {
            format!(
                "{}/{}",
                c.body["kind"].as_str().unwrap(),
                c.body["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn status_patch(calls: &[Call]) -> ChatClusterStatus {
    let call = calls
        .iter()
        .find(|c| c.is_status())
        .expect("a status patch");
    assert_eq!(call.body["apiVersion"], "chatcluster.dev/v1alpha1");
    assert_eq!(call.body["kind"], "ChatCluster");
    serde_json::from_value(call.body["status"].clone()).unwrap()
}

fn event_reasons(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.is_event())
        .filter_map(|c| c.body["reason"].as_str().map(str::to_owned))
        .collect()
}

const ALL_CHILDREN: [&str; 15] = [
    "ServiceAccount/demo",
    "Secret/demo-postgres",
    "ConfigMap/demo-haproxy",
    "NetworkPolicy/demo-redis",
    "NetworkPolicy/demo-postgres",
    "StatefulSet/demo-redis",
    "StatefulSet/demo-postgres",
    "Service/demo-gateway",
    "Service/demo-gateway-metrics",
    "Service/demo-redis",
    "Service/demo-postgres",
    "Deployment/demo-gateway",
    "Deployment/demo-worker",
    "PodDisruptionBudget/demo-gateway",
    "PodDisruptionBudget/demo-worker",
];

#[tokio::test]
async fn create_applies_every_child_with_one_field_manager_then_status() {
    let mut harness = harness(Some(0), Objects::new(), None);
    let (result, calls) = harness.reconcile(&cluster(json!({}))).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(applied_kinds(&calls), ALL_CHILDREN);
    for call in calls.iter().filter(|c| c.is_apply()) {
        assert!(
            call.path.contains("fieldManager=chatcluster-operator"),
            "{}",
            call.path
        );
        assert!(call.path.contains("force=true"), "{}", call.path);
        assert!(call.body["apiVersion"].is_string() && call.body["kind"].is_string());
        let owner = &call.body["metadata"]["ownerReferences"][0];
        if !call.is_status() {
            assert_eq!(owner["kind"], "ChatCluster");
            assert_eq!(owner["controller"], true);
        }
    }
    let secret = calls
        .iter()
        .find(|c| c.path.contains("/secrets/demo-postgres") && c.is_apply())
        .unwrap();
    let password = secret.body["data"]["password"].as_str().unwrap();
    assert!(
        !password.is_empty(),
        "a password is generated when none exists"
    );

    let status = status_patch(&calls);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status::find(&status, status::READY).unwrap().status,
        "False"
    );
    assert_eq!(
        status::find(&status, status::PROGRESSING).unwrap().status,
        "True"
    );
    assert_eq!(
        status::find(&status, status::DEGRADED).unwrap().status,
        "False"
    );
    assert_eq!(status.worker.replicas, 1);
    assert_eq!(status.worker.lag, Some(0));
    assert_eq!(
        status.selector.as_deref(),
        Some(build::gateway_selector("demo").as_str())
    );
    assert_eq!(event_reasons(&calls), ["Created"]);
    let event = calls.iter().find(|c| c.is_event()).unwrap();
    let note = event.body["note"].as_str().unwrap();
    assert!(
        note.starts_with("Created ServiceAccount demo, Secret demo-postgres"),
        "{note}"
    );
    assert_eq!(event.body["regarding"]["kind"], "ChatCluster");
}

#[tokio::test]
async fn steady_state_makes_no_writes() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    let mut chat = cluster(json!({}));
    let children = built(&chat, &inputs_with(1, "pw"));
    harness.writers.observe_all(&children);

    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        applied_kinds(&calls).is_empty(),
        "children match: {:?}",
        applied_kinds(&calls)
    );
    chat.status = Some(status_patch(&calls));

    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    let writes: Vec<&Call> = calls.iter().filter(|c| c.method != "GET").collect();
    assert!(
        writes.is_empty(),
        "an unchanged cluster must not write: {writes:?}"
    );
    let reads: Vec<&str> = calls.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        reads,
        [
            POSTGRES_SECRET_PATH,
            "/api/v1/namespaces/chat/persistentvolumeclaims/data-demo-redis-0",
            "/api/v1/namespaces/chat/persistentvolumeclaims/data-demo-postgres-0",
            "/api/v1/namespaces/chat/secrets/demo-auth",
        ],
        "only the generated secrets and the data claims are read"
    );
}

#[tokio::test]
async fn spec_change_updates_only_what_it_affects() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    let before = cluster(json!({}));
    harness
        .writers
        .observe_all(&built(&before, &inputs_with(1, "pw")));

    let mut after = cluster(json!({"gateway": {"processesPerPod": 2}}));
    after.metadata.generation = Some(2);
    let (result, calls) = harness.reconcile(&after).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        applied_kinds(&calls),
        [
            "ConfigMap/demo-haproxy",
            "Service/demo-gateway-metrics",
            "Deployment/demo-gateway"
        ]
    );
    let gateway = calls
        .iter()
        .find(|c| c.path.contains("/deployments/demo-gateway"))
        .unwrap();
    let containers = gateway.body["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 3, "two gateway processes and HAProxy");
    assert!(event_reasons(&calls).is_empty(), "nothing was created");
    assert_eq!(status_patch(&calls).observed_generation, Some(2));
}

#[tokio::test]
async fn lag_scales_workers_up_with_an_event() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(12_000), objects, None);
    let chat = cluster(json!({"worker": {"targetLagPerReplica": 5000, "maxReplicas": 8}}));
    harness
        .writers
        .observe_all(&built(&chat, &inputs_with(1, "pw")));

    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(applied_kinds(&calls), ["Deployment/demo-worker"]);
    let worker = calls
        .iter()
        .find(|c| c.path.contains("/deployments/demo-worker"))
        .unwrap();
    assert_eq!(worker.body["spec"]["replicas"], 3);
    assert_eq!(event_reasons(&calls), ["ScaledWorkers"]);
    let note = calls.iter().find(|c| c.is_event()).unwrap().body["note"].clone();
    assert_eq!(note, "Scaled workers from 1 to 3 (lag 12000)");
    let status = status_patch(&calls);
    assert_eq!(
        (status.worker.replicas, status.worker.lag),
        (3, Some(12_000))
    );
}

#[tokio::test]
async fn one_worker_runs_until_the_workers_prepared_the_database() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    harness
        .lag
        .2
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let chat = cluster(json!({"worker": {"minReplicas": 0, "maxReplicas": 2,
                                          "scaleDownStabilizationSeconds": 0}}));
    harness
        .writers
        .observe_all(&built(&chat, &inputs_with(0, "pw")));

    // No consumer groups: no worker has migrated the schema the gateways publish into.
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(applied_kinds(&calls), ["Deployment/demo-worker"]);
    let worker = calls
        .iter()
        .find(|c| c.path.contains("/deployments/demo-worker"))
        .unwrap();
    assert_eq!(worker.body["spec"]["replicas"], 1);
    let status = status_patch(&calls);
    assert_eq!(status.worker.replicas, 1);
    let ready = status::find(&status, status::READY).unwrap();
    assert_eq!(
        ready.status, "False",
        "no worker has prepared the database yet"
    );

    // The worker created the groups (after migrating): minReplicas 0 applies.
    harness
        .lag
        .2
        .store(true, std::sync::atomic::Ordering::Relaxed);
    harness
        .writers
        .observe_all(&built(&chat, &inputs_with(1, "pw")));
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    let worker = calls
        .iter()
        .find(|c| c.path.contains("/deployments/demo-worker"))
        .unwrap();
    assert_eq!(worker.body["spec"]["replicas"], 0);
    assert_eq!(status_patch(&calls).worker.replicas, 0);
}

#[tokio::test]
async fn gateway_scale_is_applied_with_an_event() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    harness
        .writers
        .observe_all(&built(&cluster(json!({})), &inputs_with(1, "pw")));
    let scaled = cluster(json!({"gateway": {"replicas": 5}}));
    let (result, calls) = harness.reconcile(&scaled).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(applied_kinds(&calls), ["Deployment/demo-gateway"]);
    let gateway = calls
        .iter()
        .find(|c| c.path.contains("/deployments/demo-gateway"))
        .unwrap();
    assert_eq!(gateway.body["spec"]["replicas"], 5);
    assert_eq!(event_reasons(&calls), ["ScaledGateways"]);
}

#[tokio::test]
async fn unreadable_redis_keeps_workers_and_reports_no_lag() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(None, objects, None);
    let chat = cluster(json!({"worker": {"minReplicas": 1, "maxReplicas": 5}}));
    harness
        .writers
        .observe_all(&built(&chat, &inputs_with(2, "pw")));
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(
        result.is_ok(),
        "a Redis outage is not a reconcile failure: {result:?}"
    );
    assert!(applied_kinds(&calls).is_empty());
    let status = status_patch(&calls);
    assert_eq!((status.worker.replicas, status.worker.lag), (2, None));
}

#[tokio::test]
async fn missing_external_secret_degrades_with_event_and_backoff() {
    let mut harness = harness(Some(0), Objects::new(), None);
    let chat = cluster(
        json!({"redis": {"external": {"urlSecretRef": {"name": "redis-url", "key": "url"}}}}),
    );
    let (result, calls) = harness.reconcile(&chat).await;
    let error = result.unwrap_err();
    assert!(
        matches!(&error, Error::MissingSecret { name, .. } if name == "redis-url"),
        "{error}"
    );
    assert!(
        applied_kinds(&calls).is_empty(),
        "nothing is applied before the fetch succeeds"
    );
    assert_eq!(event_reasons(&calls), ["SecretNotFound"]);
    let status = status_patch(&calls);
    let degraded = status::find(&status, status::DEGRADED).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert!(
        degraded.message.contains("Secret redis-url has no key url"),
        "{}",
        degraded.message
    );

    let chat = Arc::new(chat);
    let first = error_policy(chat.clone(), &error, harness.ctx.clone());
    let second = error_policy(chat.clone(), &error, harness.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    metrics.failed(&error);
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("error=\"missing_secret\""), "{text}");
}

#[tokio::test]
async fn invalid_spec_is_rejected_before_any_apply() {
    let mut harness = harness(Some(0), Objects::new(), None);
    let chat = cluster(json!({"worker": {"minReplicas": 5, "maxReplicas": 2}}));
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(matches!(result, Err(Error::InvalidSpec(_))), "{result:?}");
    assert!(applied_kinds(&calls).is_empty());
    assert_eq!(event_reasons(&calls), ["InvalidSpec"]);
    let status = status_patch(&calls);
    assert_eq!(
        status::find(&status, status::DEGRADED).unwrap().reason,
        "InvalidSpec"
    );
}

#[tokio::test]
async fn a_failing_child_does_not_stop_the_others() {
    let mut harness = harness(Some(0), Objects::new(), Some("/statefulsets/"));
    let (result, calls) = harness.reconcile(&cluster(json!({}))).await;
    let Err(Error::Children(failures)) = &result else {
        panic!("expected child failures: {result:?}")
    };
    let failed: Vec<String> = failures
        .iter()
        .map(|f| format!("{}/{}", f.kind, f.name))
        .collect();
    assert_eq!(
        failed,
        ["StatefulSet/demo-redis", "StatefulSet/demo-postgres"]
    );
    assert_eq!(
        applied_kinds(&calls),
        ALL_CHILDREN,
        "every child is tried, the failing ones too"
    );
    assert_eq!(event_reasons(&calls), ["Created", "ApplyFailed"]);
    let status = status_patch(&calls);
    let degraded = status::find(&status, status::DEGRADED).unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ApplyFailed")
    );
    assert!(
        degraded.message.contains("StatefulSet demo-redis: ")
            && degraded.message.contains("StatefulSet demo-postgres: "),
        "every failure is reported: {}",
        degraded.message
    );
}

#[tokio::test]
async fn a_field_dropped_from_the_spec_is_applied_away() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    let limited = cluster(json!({"imagePullPolicy": "Always"}));
    harness
        .writers
        .observe_all(&built(&limited, &inputs_with(1, "pw")));
    let (_, calls) = harness.reconcile(&cluster(json!({}))).await;
    let applied = applied_kinds(&calls);
    assert!(
        applied.contains(&"Deployment/demo-worker".to_owned()),
        "{applied:?}"
    );
    let worker = calls
        .iter()
        .find(|c| c.is_apply() && c.path.contains("/deployments/demo-worker"))
        .unwrap();
    let container = &worker.body["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container.get("imagePullPolicy").is_none(),
        "the apply omits the field, so server-side apply removes it: {container}"
    );
}

#[tokio::test]
async fn values_the_server_rewrites_do_not_cause_applies() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    let spec = json!({"worker": {"resources": {"requests": {"cpu": "0.5"}}}});
    let chat = cluster(spec);
    let mut live = built(&chat, &inputs_with(1, "pw"));
    // The API server stores `cpu: 0.5` as `500m`.
    let worker = &mut live.deployments[1];
    let resources = worker
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .resources
        .as_mut()
        .unwrap();
    resources.requests.as_mut().unwrap().insert(
        "cpu".to_owned(),
        k8s_openapi::apimachinery::pkg::api::resource::Quantity("500m".to_owned()),
    );
    harness.writers.observe_all(&live);
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        applied_kinds(&calls).is_empty(),
        "{:?}",
        applied_kinds(&calls)
    );
}

#[tokio::test]
async fn children_the_spec_no_longer_asks_for_are_removed() {
    let external =
        cluster(json!({"redis": {"external": {"urlSecretRef": {"name": "r", "key": "url"}}}}));
    let mut harness = harness_with_secret("r", "url", "redis://r:6379");
    harness
        .writers
        .observe_all(&built(&cluster(json!({})), &inputs_with(1, "pw")));
    let (result, calls) = harness.reconcile(&external).await;
    assert!(result.is_ok(), "{result:?}");
    let deleted: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == "DELETE")
        .map(|c| c.path.split('?').next().unwrap_or_default())
        .collect();
    assert_eq!(
        deleted,
        [
            "/apis/networking.k8s.io/v1/namespaces/chat/networkpolicies/demo-redis",
            "/apis/apps/v1/namespaces/chat/statefulsets/demo-redis",
            "/api/v1/namespaces/chat/services/demo-redis",
        ]
    );
    assert!(event_reasons(&calls).contains(&"Removed".to_owned()));
}

/// A harness whose API server also holds the Secret `name` with `key: value`, and the
/// managed PostgreSQL credentials.
fn harness_with_secret(name: &str, key: &str, value: &str) -> Harness {
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(
            [(
                key.to_owned(),
                k8s_openapi::ByteString(value.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let objects = Objects::from([
        (
            POSTGRES_SECRET_PATH.to_owned(),
            postgres_secret_object("pw"),
        ),
        (
            format!("/api/v1/namespaces/chat/secrets/{name}"),
            serde_json::to_value(&secret).unwrap(),
        ),
    ]);
    harness(Some(0), objects, None)
}

#[tokio::test]
async fn credentials_live_as_long_as_the_data_claim_and_volumes_grow() {
    let claim = |size: &str| {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-demo-postgres-0", "namespace": "chat", "uid": "claim-uid"},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}})
    };
    let objects = Objects::from([
        (
            POSTGRES_SECRET_PATH.to_owned(),
            postgres_secret_object("pw"),
        ),
        (
            "/api/v1/namespaces/chat/persistentvolumeclaims/data-demo-postgres-0".to_owned(),
            claim("5Gi"),
        ),
    ]);
    let mut harness = harness(Some(0), objects, None);
    let chat = cluster(json!({"postgres": {"managed": {"storage": "8Gi"}}}));
    let (result, calls) = harness.reconcile(&chat).await;
    assert!(result.is_ok(), "{result:?}");
    let secret = calls
        .iter()
        .find(|c| c.is_apply() && c.path.contains("/secrets/demo-postgres"))
        .expect("the credentials are applied with their new owner");
    let owners = secret.body["metadata"]["ownerReferences"]
        .as_array()
        .unwrap();
    let claim_owner = owners
        .iter()
        .find(|o| o["kind"] == "PersistentVolumeClaim")
        .unwrap();
    assert_eq!(claim_owner["uid"], "claim-uid");
    assert!(
        claim_owner.get("controller").is_none(),
        "the ChatCluster stays the controller"
    );
    assert_eq!(
        secret.body["data"][PASSWORD_KEY],
        postgres_secret_object("pw")["data"][PASSWORD_KEY],
        "the password is kept"
    );
    let resize = calls
        .iter()
        .find(|c| {
            c.is_apply()
                && c.path
                    .contains("/persistentvolumeclaims/data-demo-postgres-0")
        })
        .expect("the claim is resized");
    assert_eq!(
        resize.body["spec"]["resources"]["requests"]["storage"],
        "8Gi"
    );
    assert!(event_reasons(&calls).contains(&"ResizingVolume".to_owned()));
}

#[tokio::test]
async fn an_unreadable_lag_is_read_again_only_after_a_backoff() {
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(None, objects, None);
    let mut chat = cluster(json!({}));
    harness
        .writers
        .observe_all(&built(&chat, &inputs_with(1, "pw")));
    let (_, calls) = harness.reconcile(&chat).await;
    chat.status = Some(status_patch(&calls));
    let condition = status::find(chat.status.as_ref().unwrap(), status::SCALING_ACTIVE).unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "LagUnavailable")
    );
    for _ in 0..3 {
        let (result, calls) = harness.reconcile(&chat).await;
        assert!(result.is_ok(), "{result:?}");
        assert!(
            calls.iter().all(|c| c.method == "GET"),
            "the outage is said once: {calls:?}"
        );
    }
    let reads = harness.lag_reads();
    assert_eq!(reads, 1, "no read before the backoff passed");
}

#[test]
fn backoff_doubles_up_to_five_minutes() {
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(2), Duration::from_secs(10));
    assert_eq!(backoff(7), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[tokio::test]
async fn deleted_clusters_are_forgotten() {
    let mut harness = harness(Some(0), Objects::new(), None);
    let doomed = cluster(json!({"worker": {"minReplicas": 5, "maxReplicas": 2}}));
    let (result, _) = harness.reconcile(&doomed).await;
    let error = result.unwrap_err();
    error_policy(Arc::new(doomed.clone()), &error, harness.ctx.clone());
    assert_eq!(lock(&harness.ctx.failures).len(), 1);

    harness
        .writers
        .clusters
        .apply_watcher_event(&watcher::Event::Delete(doomed));
    let mut other = cluster(json!({}));
    other.metadata.name = Some("other".to_owned());
    let (_, _) = harness.reconcile(&other).await;
    assert!(
        lock(&harness.ctx.failures).is_empty(),
        "the deleted cluster's count is gone"
    );
    assert_eq!(
        lock(&harness.ctx.scaling).len(),
        1,
        "only the live cluster's history"
    );
}

#[tokio::test]
async fn becoming_ready_is_announced_once() {
    use k8s_openapi::api::apps::v1::{DeploymentStatus, StatefulSetStatus};
    let objects = Objects::from([(
        POSTGRES_SECRET_PATH.to_owned(),
        postgres_secret_object("pw"),
    )]);
    let mut harness = harness(Some(0), objects, None);
    let mut chat = cluster(json!({}));
    let mut children = built(&chat, &inputs_with(1, "pw"));
    harness.writers.observe_all(&children);
    let (_, calls) = harness.reconcile(&chat).await;
    chat.status = Some(status_patch(&calls));
    assert!(
        event_reasons(&calls).is_empty(),
        "a new cluster is not announced as unready"
    );

    for deployment in &mut children.deployments {
        let want = deployment.spec.as_ref().and_then(|s| s.replicas);
        deployment.metadata.generation = Some(1);
        deployment.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: want,
            ready_replicas: want,
            available_replicas: want,
            updated_replicas: want,
            ..DeploymentStatus::default()
        });
    }
    for statefulset in &mut children.statefulsets {
        statefulset.metadata.generation = Some(1);
        statefulset.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: 1,
            ready_replicas: Some(1),
            current_revision: Some("r1".to_owned()),
            update_revision: Some("r1".to_owned()),
            ..StatefulSetStatus::default()
        });
    }
    harness.writers.observe_all(&children);
    let (_, calls) = harness.reconcile(&chat).await;
    assert!(
        applied_kinds(&calls).is_empty(),
        "status of children is not a difference"
    );
    let status = status_patch(&calls);
    assert_eq!(status::find(&status, status::READY).unwrap().status, "True");
    assert_eq!(
        status.gateway,
        crate::crd::GatewayStatus {
            replicas: 2,
            ready_replicas: 2
        }
    );
    assert_eq!(event_reasons(&calls), ["AllComponentsReady"]);

    chat.status = Some(status);
    let (_, calls) = harness.reconcile(&chat).await;
    assert!(
        calls.iter().all(|c| c.method == "GET"),
        "ready and steady: {calls:?}"
    );
}
