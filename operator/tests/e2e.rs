//! End-to-end tests against a real cluster (kind, minikube, any): ignored by `cargo test`.
//!
//! Run with `KUBECONFIG` pointing at a disposable cluster:
//! `cargo test -p chatcluster-operator --test e2e -- --ignored --test-threads=2`.
//!
//! Two kinds of test:
//! - `with_env`: the controller runs in this process for a fresh namespace (the CRD is
//!   applied under the test's own field manager). Checks that need running gateway/worker
//!   pods run only with `CHATCLUSTER_E2E_IMAGES=1`, once the images are loaded.
//! - `with_chart`: the operator is installed from the Helm chart as a pod with its own RBAC,
//!   watching a fresh namespace; these need `CHATCLUSTER_E2E_IMAGES=1`, `helm` and `kubectl`
//!   on `PATH` (or `HELM`/`KUBECTL`), and talk to the cluster the way a user does:
//!   `kubectl port-forward` to the gateway Service, `kubectl exec` into PostgreSQL.
//!
//! Every test deletes what it made, pass or fail. `CHATCLUSTER_E2E_MAX_CONN` sets the
//! HAProxy `maxConn` of the test clusters, for nodes whose open-file limit is below the
//! 2 × 50000 the default needs.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use chatcluster_operator::build::{CONFIG_HASH_ANNOTATION, Component, names};
use chatcluster_operator::controller::{self, Settings};
use chatcluster_operator::crd::{ChatCluster, ChatClusterSpec, ManagedDatastore};
use chatcluster_operator::metrics::Metrics;
use chatcluster_operator::status;
use futures_util::FutureExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(180);
/// Field manager of everything the tests themselves write.
const E2E_MANAGER: &str = "chatcluster-e2e";
const POLL: Duration = Duration::from_millis(500);

/// One test's namespace with the controller running for it.
struct Env {
    client: Client,
    namespace: String,
}

impl Env {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn clusters(&self) -> Api<ChatCluster> {
        self.api()
    }

    /// Applies an example from `manifests/examples/` under the given name.
    async fn apply_example(&self, file: &str, name: &str) -> ChatCluster {
        let path = format!(
            "{}/../manifests/examples/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let example: ChatCluster =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        self.apply_spec(name, &example.spec).await
    }

    async fn apply_spec(&self, name: &str, spec: &ChatClusterSpec) -> ChatCluster {
        self.patch_spec(name, spec)
            .await
            .expect("applying a ChatCluster")
    }

    /// Applies a spec and returns the API server's refusal, if any.
    async fn try_apply_spec(&self, name: &str, spec: &ChatClusterSpec) -> Result<(), String> {
        self.patch_spec(name, spec)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Server-side-applies `spec` (with the test run's HAProxy `maxConn`, if set).
    async fn patch_spec(&self, name: &str, spec: &ChatClusterSpec) -> kube::Result<ChatCluster> {
        let mut spec = spec.clone();
        if let Some(max_conn) = max_conn_override() {
            spec.gateway.haproxy.max_conn = max_conn;
        }
        let body = json!({
            "apiVersion": "chatcluster.dev/v1alpha1",
            "kind": "ChatCluster",
            "metadata": {"name": name},
            "spec": spec,
        });
        let params = PatchParams::apply(E2E_MANAGER).force();
        self.clusters()
            .patch(name, &params, &Patch::Apply(&body))
            .await
    }

    /// Waits until `name` of kind `K` exists and returns it.
    async fn child<K>(&self, name: &str) -> K
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let api = self.api::<K>();
        eventually(&format!("{} {name} exists", K::kind(&())), || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok().flatten() }
        })
        .await
    }

    /// Waits for a status on `name` satisfying `check`.
    async fn status_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&chatcluster_operator::crd::ChatClusterStatus) -> bool,
    ) -> ChatCluster {
        let api = self.clusters();
        eventually(what, || {
            let api = api.clone();
            let check = &check;
            async move {
                let cluster = api.get(name).await.ok()?;
                cluster
                    .status
                    .as_ref()
                    .is_some_and(check)
                    .then_some(cluster)
            }
        })
        .await
    }
}

/// Polls `probe` until it returns `Some`, or panics after [`TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `CHATCLUSTER_E2E_MAX_CONN`, when set.
fn max_conn_override() -> Option<i32> {
    let value = std::env::var("CHATCLUSTER_E2E_MAX_CONN").ok()?;
    Some(
        value
            .parse()
            .expect("CHATCLUSTER_E2E_MAX_CONN must be a number"),
    )
}

fn images_loaded() -> bool {
    std::env::var("CHATCLUSTER_E2E_IMAGES").is_ok_and(|v| v == "1")
}

/// Installs the CRD, makes a namespace, runs the controller for it, runs `test`, cleans up.
async fn with_env<F, Fut>(test: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chatcluster_operator=debug")
        .try_init();
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at a cluster");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ChatCluster::crd();
    let crd_name = crd.name_any();
    // The test's own field manager, never forced: a different CRD already in the cluster is a
    // conflict to resolve by hand, not something to overwrite.
    if let Err(error) = crds
        .patch(
            &crd_name,
            &PatchParams::apply(E2E_MANAGER),
            &Patch::Apply(&crd),
        )
        .await
    {
        panic!(
            "installing the CRD failed: {error}\nthe cluster holds another version of it; \
             apply this one with `kubectl apply --server-side --force-conflicts -f \
             crds/chatcluster.yaml` and run the tests again"
        );
    }
    tokio::time::timeout(
        TIMEOUT,
        await_condition(crds, &crd_name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watching the CRD");

    let namespace = format!("chatcluster-e2e-{}", rand_suffix());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(namespace.clone()),
            ..Default::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating the test namespace");

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        resync: Duration::from_secs(2),
        namespace: Some(namespace.clone()),
        concurrency: 2,
        operator_namespace: namespace.clone(),
    };
    let reporter = Reporter {
        controller: "chatcluster-operator-e2e".to_owned(),
        instance: None,
    };
    let controller = tokio::spawn(controller::run(
        client.clone(),
        settings,
        Metrics::default(),
        reporter,
        async {
            let _ = stopped.await;
        },
    ));

    let env = Env {
        client: client.clone(),
        namespace: namespace.clone(),
    };
    let outcome = AssertUnwindSafe(test(env)).catch_unwind().await;

    let _ = stop.send(());
    let _ = controller.await;
    if let Err(error) = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
    {
        eprintln!("deleting namespace {namespace} failed: {error}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn rand_suffix() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric
        .sample_string(&mut rand::rng(), 6)
        .to_lowercase()
}

fn owned_by(meta: &kube::api::ObjectMeta, cluster: &ChatCluster) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == cluster.uid().unwrap_or_default())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn creates_every_child_with_the_sidecar_layout_and_status() {
    with_env(|env| async move {
        let cluster = env.apply_example("minimal.yaml", "demo").await;
        let sa: ServiceAccount = env.child(&names::service_account("demo")).await;
        let cm: ConfigMap = env.child(&names::haproxy_config("demo")).await;
        let secret: Secret = env.child(&Component::Postgres.object_name("demo")).await;
        let redis: StatefulSet = env.child(&Component::Redis.object_name("demo")).await;
        let postgres: StatefulSet = env.child(&Component::Postgres.object_name("demo")).await;
        let gateway_svc: Service = env.child(&Component::Gateway.object_name("demo")).await;
        let gateway: Deployment = env.child(&Component::Gateway.object_name("demo")).await;
        let worker: Deployment = env.child(&Component::Worker.object_name("demo")).await;
        let pdb: PodDisruptionBudget = env.child(&Component::Gateway.object_name("demo")).await;
        let np: NetworkPolicy = env.child(&Component::Redis.object_name("demo")).await;
        for meta in [
            sa.meta(),
            cm.meta(),
            secret.meta(),
            redis.meta(),
            postgres.meta(),
            gateway_svc.meta(),
            gateway.meta(),
            worker.meta(),
            pdb.meta(),
            np.meta(),
        ] {
            assert!(
                owned_by(meta, &cluster),
                "{:?} is not owned by the ChatCluster",
                meta.name
            );
        }
        assert!(
            cm.data.unwrap()["haproxy.cfg"].contains("unix@/var/run/chatcluster/gateway-0.sock")
        );
        assert!(secret.data.unwrap().contains_key("database-url"));
        // A real API server shows the children to the controller's watches one by one, so
        // the creations may be spread over several Created events: look at all of them.
        let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
        let notes = eventually("a Created event naming the gateway Deployment", || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await.ok()?;
                let notes: Vec<String> = list
                    .items
                    .into_iter()
                    .filter(|e| {
                        e.reason.as_deref() == Some("Created")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo")
                    })
                    .filter_map(|e| e.note)
                    .collect();
                notes
                    .iter()
                    .any(|n| n.contains("Deployment demo-gateway"))
                    .then_some(notes)
            }
        })
        .await;
        let all = notes.join(", ");
        for child in [
            "StatefulSet demo-redis",
            "Secret demo-postgres",
            "NetworkPolicy demo-redis",
        ] {
            assert!(all.contains(child), "{child} missing from {all}");
        }

        let pod = gateway.spec.unwrap().template.spec.unwrap();
        let containers: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(containers, ["gateway-0", "haproxy"]);
        for container in &pod.containers {
            let mounts = container.volume_mounts.as_ref().unwrap();
            assert!(
                mounts
                    .iter()
                    .any(|m| m.name == "sockets" && m.mount_path == "/var/run/chatcluster")
            );
            let security = container.security_context.as_ref().unwrap();
            assert_eq!(security.read_only_root_filesystem, Some(true));
        }
        assert!(pod.security_context.unwrap().fs_group.is_some());

        let with_status = env
            .status_where("demo", "status has all four conditions", |s| {
                s.conditions.len() == 4
            })
            .await;
        let status = with_status.status.unwrap();
        assert_eq!(status.observed_generation, with_status.metadata.generation);
        assert!(
            status
                .selector
                .unwrap()
                .contains("app.kubernetes.io/instance=demo")
        );
        for type_ in [
            status::READY,
            status::PROGRESSING,
            status::DEGRADED,
            status::SCALING_ACTIVE,
        ] {
            let condition = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
            assert!(
                !condition.reason.is_empty()
                    && ["True", "False"].contains(&condition.status.as_str())
            );
        }

        if images_loaded() {
            let ready = env
                .status_where("demo", "Ready=True", |s| {
                    status::find(s, status::READY).is_some_and(|c| c.status == "True")
                })
                .await;
            let status = ready.status.unwrap();
            assert_eq!(status.gateway.ready_replicas, ready.spec.gateway.replicas);
            // The lag is not checked: this in-process operator runs outside the cluster and
            // cannot resolve the managed Redis Service name.
            assert!(status.worker.ready_replicas >= 1);
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn scale_subresource_scales_the_gateways() {
    with_env(|env| async move {
        env.apply_example("minimal.yaml", "scaled").await;
        env.child::<Deployment>(&Component::Gateway.object_name("scaled"))
            .await;
        let scale = json!({"spec": {"replicas": 3}});
        env.clusters()
            .patch_scale("scaled", &PatchParams::default(), &Patch::Merge(&scale))
            .await
            .expect("patching the scale subresource");
        let deployments = env.api::<Deployment>();
        eventually("the gateway Deployment has 3 replicas", || {
            let deployments = deployments.clone();
            async move {
                let d = deployments
                    .get(&Component::Gateway.object_name("scaled"))
                    .await
                    .ok()?;
                (d.spec?.replicas == Some(3)).then_some(())
            }
        })
        .await;
        let scale = env
            .clusters()
            .get_scale("scaled")
            .await
            .expect("reading the scale");
        assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
        let selector = env
            .status_where("scaled", "the selector is published", |s| {
                s.selector.is_some()
            })
            .await
            .status
            .and_then(|s| s.selector);
        assert_eq!(
            env.clusters()
                .get_scale("scaled")
                .await
                .unwrap()
                .status
                .and_then(|s| s.selector),
            selector
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn spec_change_rolls_the_gateway_pods() {
    with_env(|env| async move {
        let cluster = env.apply_example("minimal.yaml", "rolling").await;
        let before: Deployment = env.child(&Component::Gateway.object_name("rolling")).await;
        let hash = |d: &Deployment| {
            let template = d.spec.as_ref()?.template.metadata.as_ref()?;
            template
                .annotations
                .as_ref()?
                .get(CONFIG_HASH_ANNOTATION)
                .cloned()
        };
        let old_hash = hash(&before).expect("config hash annotation");
        let mut spec = cluster.spec.clone();
        spec.gateway.processes_per_pod = 2;
        env.apply_spec("rolling", &spec).await;
        let deployments = env.api::<Deployment>();
        let after = eventually("the gateway template changes", || {
            let deployments = deployments.clone();
            let old_hash = old_hash.clone();
            async move {
                let d = deployments
                    .get(&Component::Gateway.object_name("rolling"))
                    .await
                    .ok()?;
                (hash(&d)? != old_hash).then_some(d)
            }
        })
        .await;
        assert!(
            after.metadata.generation > before.metadata.generation,
            "a new rollout started"
        );
        let containers = after.spec.unwrap().template.spec.unwrap().containers;
        assert_eq!(containers.len(), 3);
        let cm: ConfigMap = env.child(&names::haproxy_config("rolling")).await;
        assert!(
            cm.data.unwrap()["haproxy.cfg"]
                .contains("server gw1 unix@/var/run/chatcluster/gateway-1.sock")
        );
        env.status_where("rolling", "observedGeneration follows", |s| {
            s.observed_generation == Some(2)
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn invalid_specs_are_rejected_by_the_api_server() {
    with_env(|env| async move {
        let cases = [
            (json!({"worker": {"minReplicas": 5, "maxReplicas": 2}}), "minReplicas must not be greater"),
            (json!({"redis": {"managed": {}, "external": {"urlSecretRef": {"name": "a", "key": "b"}}}}), "exactly one of managed or external"),
            (json!({"postgres": {}}), "exactly one of managed or external"),
            (json!({"gateway": {"processesPerPod": 0}}), "processesPerPod"),
            (json!({"auth": {"mode": "oauth"}}), "mode"),
            (json!({"worker": {"batchTimeout": "soon"}}), "batchTimeout"),
            (json!({"worker": {"claimIdle": "0s"}}), "claimIdle"),
        ];
        for (index, (spec, expected)) in cases.into_iter().enumerate() {
            let body = json!({
                "apiVersion": "chatcluster.dev/v1alpha1",
                "kind": "ChatCluster",
                "metadata": {"name": format!("invalid-{index}")},
                "spec": spec,
            });
            let object: ChatCluster = match serde_json::from_value(body.clone()) {
                Ok(object) => object,
                // Unknown enum values cannot even be typed; send the raw body.
                Err(_) => {
                    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
                        env.client.clone(),
                        &env.namespace,
                        &kube::api::ApiResource::erase::<ChatCluster>(&()),
                    );
                    let error = raw
                        .create(&PostParams::default(), &serde_json::from_value(body).unwrap())
                        .await
                        .expect_err("the API server must reject it");
                    assert!(error.to_string().contains(expected), "{error}");
                    continue;
                }
            };
            let error = env
                .clusters()
                .create(&PostParams::default(), &object)
                .await
                .expect_err("the API server must reject it");
            let kube::Error::Api(status) = &error else { panic!("unexpected error {error}") };
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains(expected), "{} lacks {expected:?}", status.message);
        }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn missing_secret_degrades_until_it_appears() {
    with_env(|env| async move {
        env.apply_example("external.yaml", "ext").await;
        let degraded = env
            .status_where("ext", "Degraded=True", |s| {
                status::find(s, status::DEGRADED).is_some_and(|c| c.status == "True")
            })
            .await;
        let condition = degraded.status.unwrap();
        let condition = status::find(&condition, status::DEGRADED).unwrap().clone();
        assert_eq!(condition.reason, "SecretNotFound");
        let secrets = env.api::<Secret>();
        for (name, url) in [
            ("chat-redis", "redis://redis.invalid:6379"),
            ("chat-postgres", "postgres://u:p@pg.invalid/chat"),
        ] {
            let secret: Secret = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name},
                "stringData": {"url": url},
            }))
            .unwrap();
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .expect("creating the secret");
        }
        env.status_where("ext", "Degraded=False", |s| {
            status::find(s, status::DEGRADED).is_some_and(|c| c.status == "False")
        })
        .await;
        let deployment: Deployment = env.child(&Component::Gateway.object_name("ext")).await;
        let env_vars = deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let redis = env_vars.iter().find(|e| e.name == "REDIS_URL").unwrap();
        assert_eq!(
            redis
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "chat-redis"
        );
        assert!(
            env.api::<StatefulSet>()
                .get_opt(&Component::Redis.object_name("ext"))
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn steady_state_changes_nothing() {
    with_env(|env| async move {
        env.apply_example("minimal.yaml", "steady").await;
        env.status_where("steady", "status is written", |s| s.conditions.len() == 4)
            .await;
        env.child::<NetworkPolicy>(&Component::Postgres.object_name("steady"))
            .await;
        // Pods keep changing while images are pulled and probes start, and the status follows
        // them. Once they settle, five resyncs (2 s each) in a row must write nothing; an
        // operator that keeps writing never gets there and the test times out.
        let deadline = tokio::time::Instant::now() + 3 * TIMEOUT;
        let mut before = snapshot(&env, "steady").await;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let after = snapshot(&env, "steady").await;
            if after == before {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster never stopped being written to:\n{before:?}\n{after:?}"
            );
            before = after;
        }
    })
    .await;
}

/// Versions of everything the operator writes that nobody else writes: resourceVersion where
/// only we write, generation (spec changes) where controllers also update status.
async fn snapshot(env: &Env, name: &str) -> Vec<(String, Option<String>)> {
    let mut versions = Vec::new();
    let list = ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"));
    macro_rules! record {
        ($kind:ty, $version:expr) => {
            for object in env
                .api::<$kind>()
                .list(&list)
                .await
                .expect("listing children")
            {
                let version: Option<String> = $version(&object);
                versions.push((
                    format!("{}/{}", <$kind>::kind(&()), object.name_any()),
                    version,
                ));
            }
        };
    }
    record!(ServiceAccount, |o: &ServiceAccount| o.resource_version());
    record!(ConfigMap, |o: &ConfigMap| o.resource_version());
    record!(Secret, |o: &Secret| o.resource_version());
    record!(Service, |o: &Service| o.resource_version());
    record!(NetworkPolicy, |o: &NetworkPolicy| o.resource_version());
    record!(Deployment, |o: &Deployment| o
        .metadata
        .generation
        .map(|g| g.to_string()));
    record!(StatefulSet, |o: &StatefulSet| o
        .metadata
        .generation
        .map(|g| g.to_string()));
    record!(PodDisruptionBudget, |o: &PodDisruptionBudget| o
        .metadata
        .generation
        .map(|g| g.to_string()));
    let cluster = env
        .clusters()
        .get(name)
        .await
        .expect("reading the ChatCluster");
    let status = serde_json::to_string(&cluster.status).expect("status serializes");
    versions.push(("ChatCluster status".to_owned(), Some(status)));
    versions.sort();
    versions
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn deleting_the_cluster_removes_its_children() {
    with_env(|env| async move {
        let mut example = env.apply_example("minimal.yaml", "doomed").await;
        if let Some(postgres) = example.spec.postgres.managed.as_mut() {
            postgres.pvc_retention = chatcluster_operator::crd::PvcRetention::Delete;
        }
        env.apply_spec("doomed", &example.spec).await;
        env.child::<Deployment>(&Component::Worker.object_name("doomed"))
            .await;
        env.child::<NetworkPolicy>(&Component::Postgres.object_name("doomed"))
            .await;
        let statefulsets = env.api::<StatefulSet>();
        eventually(
            "the postgres StatefulSet deletes its claims with it",
            || {
                let statefulsets = statefulsets.clone();
                async move {
                    let set = statefulsets
                        .get(&Component::Postgres.object_name("doomed"))
                        .await
                        .ok()?;
                    let policy = set.spec?.persistent_volume_claim_retention_policy?;
                    (policy.when_deleted.as_deref() == Some("Delete")).then_some(())
                }
            },
        )
        .await;
        // The StatefulSet controller makes the claims with pod 0 (no image needed for that).
        let redis_claim: PersistentVolumeClaim = env.child("data-doomed-redis-0").await;
        env.clusters()
            .delete("doomed", &DeleteParams::foreground())
            .await
            .expect("deleting the ChatCluster");
        let list = ListParams::default().labels("app.kubernetes.io/instance=doomed");
        let (deployments, statefulsets, services, config_maps) = (
            env.api::<Deployment>(),
            env.api::<StatefulSet>(),
            env.api::<Service>(),
            env.api::<ConfigMap>(),
        );
        eventually("every child is garbage-collected", || {
            let (d, s, v, c, list) = (
                deployments.clone(),
                statefulsets.clone(),
                services.clone(),
                config_maps.clone(),
                list.clone(),
            );
            async move {
                let left = d.list(&list).await.ok()?.items.len()
                    + s.list(&list).await.ok()?.items.len()
                    + v.list(&list).await.ok()?.items.len()
                    + c.list(&list).await.ok()?.items.len();
                (left == 0).then_some(())
            }
        })
        .await;
        let claims = env.api::<PersistentVolumeClaim>();
        eventually("the postgres claim (pvcRetention: Delete) is gone", || {
            let claims = claims.clone();
            async move {
                let list = claims.list(&ListParams::default()).await.ok()?;
                let left = list
                    .iter()
                    .filter(|c| c.name_any().contains("doomed-postgres"))
                    .count();
                (left == 0).then_some(())
            }
        })
        .await;
        let kept = claims
            .get_opt(&redis_claim.name_any())
            .await
            .expect("reading the claim");
        assert!(
            kept.is_some(),
            "the redis claim (pvcRetention: Retain) must survive deletion"
        );
    })
    .await;
}

/// A tool from `PATH`, or the path in the environment variable `var`.
fn tool(var: &str, name: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| name.to_owned())
}

/// Runs a command to completion; panics with its output when it fails.
async fn run(program: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn kubectl(args: &[&str]) -> String {
    run(&tool("KUBECTL", "kubectl"), args).await
}

/// Installs the operator from the chart into its own namespace, watching a fresh test
/// namespace, runs `test`, then removes the release, the CRD's ChatClusters and both
/// namespaces.
async fn with_chart<F, Fut>(test: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    assert!(
        images_loaded(),
        "chart tests run the operator, gateway and worker images: load them into the cluster \
         and set CHATCLUSTER_E2E_IMAGES=1 (see docs/operator.md)"
    );
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at a cluster");
    let suffix = rand_suffix();
    let namespace = format!("chatcluster-e2e-{suffix}");
    let operator_namespace = format!("chatcluster-e2e-op-{suffix}");
    let release = format!("e2e-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in [&namespace, &operator_namespace] {
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating a test namespace");
    }
    let chart = format!(
        "{}/../charts/chatcluster-operator",
        env!("CARGO_MANIFEST_DIR")
    );
    let watch = format!("watchNamespace={namespace}");
    let env = Env {
        client: client.clone(),
        namespace: namespace.clone(),
    };
    // The install too: a failed one (a conflicting CRD, a pod that never gets ready) still
    // removes the namespaces below.
    let install_and_test = async {
        run(
            &tool("HELM", "helm"),
            &[
                "install",
                &release,
                &chart,
                "--namespace",
                &operator_namespace,
                "--set",
                "replicas=1",
                "--set",
                &watch,
                "--set",
                "resyncSeconds=2",
                "--set",
                "logJson=false",
                "--wait",
                "--timeout",
                "3m",
            ],
        )
        .await;
        test(env).await;
    };
    let outcome = AssertUnwindSafe(install_and_test).catch_unwind().await;
    if outcome.is_err() {
        let logs = tokio::process::Command::new(tool("KUBECTL", "kubectl"))
            .args([
                "logs",
                "-n",
                &operator_namespace,
                "-l",
                "app.kubernetes.io/name=chatcluster-operator",
                "--tail=40",
            ])
            .output()
            .await;
        if let Ok(logs) = logs {
            eprintln!("operator logs:\n{}", String::from_utf8_lossy(&logs.stdout));
        }
    }
    // ChatClusters first, while the operator still runs; then the release and namespaces.
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), &namespace);
    let _ = clusters
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let _ = tokio::process::Command::new(tool("HELM", "helm"))
        .args([
            "uninstall",
            &release,
            "--namespace",
            &operator_namespace,
            "--wait",
        ])
        .output()
        .await;
    for name in [&namespace, &operator_namespace] {
        if let Err(error) = namespaces.delete(name, &DeleteParams::default()).await {
            eprintln!("deleting namespace {name} failed: {error}");
        }
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

impl Env {
    /// Waits until the ChatCluster is Ready and every one of its pods is ready.
    async fn all_ready(&self, name: &str) -> ChatCluster {
        let cluster = self
            .status_where(name, "Ready=True", |s| {
                status::find(s, status::READY).is_some_and(|c| c.status == "True")
            })
            .await;
        let pods = self.api::<k8s_openapi::api::core::v1::Pod>();
        let selector = format!("app.kubernetes.io/instance={name}");
        eventually("every pod of the cluster is ready", || {
            let (pods, selector) = (pods.clone(), selector.clone());
            async move {
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?;
                let ready = |pod: &k8s_openapi::api::core::v1::Pod| {
                    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
                    Some(!statuses.is_empty() && statuses.iter().all(|c| c.ready))
                };
                (!list.items.is_empty() && list.items.iter().all(|p| ready(p) == Some(true)))
                    .then_some(())
            }
        })
        .await;
        cluster
    }

    /// `kubectl exec` arguments running `sql` in the cluster's managed PostgreSQL.
    fn psql_args(&self, name: &str, sql: &str) -> Vec<String> {
        let pod = format!("{}-0", Component::Postgres.object_name(name));
        let fixed = ["psql", "-U", "chat", "-d", "chat", "-tAc"];
        ["exec", "-n", self.namespace.as_str(), pod.as_str(), "--"]
            .into_iter()
            .chain(fixed)
            .chain([sql])
            .map(str::to_owned)
            .collect()
    }

    /// Runs SQL in the cluster's managed PostgreSQL through `kubectl exec`.
    async fn psql(&self, name: &str, sql: &str) -> String {
        let args = self.psql_args(name, sql);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&args).await.trim().to_owned()
    }

    /// Polls `sql` until it returns `expected`.
    async fn psql_until(&self, name: &str, sql: &str, expected: &str) {
        let what = format!("{sql} returns {expected}");
        let args = self.psql_args(name, sql);
        eventually(&what, || async {
            let output = tokio::process::Command::new(tool("KUBECTL", "kubectl"))
                .args(&args)
                .output()
                .await
                .ok()?;
            (String::from_utf8_lossy(&output.stdout).trim() == expected).then_some(())
        })
        .await;
    }

    /// A `kubectl port-forward` to the cluster's gateway Service.
    async fn forward_gateway(&self, name: &str) -> PortForward {
        let service = format!("svc/{}", Component::Gateway.object_name(name));
        let mut child = tokio::process::Command::new(tool("KUBECTL", "kubectl"))
            .args(["port-forward", "-n", &self.namespace, &service, ":80"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("running kubectl port-forward");
        let stdout = child.stdout.take().expect("port-forward stdout");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("port-forward starts in time")
            .expect("reading port-forward output")
            .expect("port-forward prints its port");
        // "Forwarding from 127.0.0.1:43521 -> 8080"
        // Keep reading: kubectl dies of SIGPIPE if its output is no longer read.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("unexpected port-forward output: {line}"));
        PortForward {
            _child: child,
            port,
        }
    }
}

/// A running `kubectl port-forward`, stopped on drop.
struct PortForward {
    _child: tokio::process::Child,
    port: u16,
}

/// A JSON WebSocket client of the chat protocol.
struct ChatClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl ChatClient {
    async fn connect(port: u16) -> Self {
        let url = format!("ws://127.0.0.1:{port}/ws");
        let socket = eventually("the gateway accepts a WebSocket", || {
            let url = url.clone();
            async move {
                tokio_tungstenite::connect_async(url)
                    .await
                    .ok()
                    .map(|(s, _)| s)
            }
        })
        .await;
        Self { socket, next_id: 1 }
    }

    /// Sends `request` and returns the `data` of its `ok` reply, skipping pushes.
    async fn call(&mut self, mut request: serde_json::Value) -> serde_json::Value {
        use futures_util::{SinkExt, StreamExt};
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                request.to_string(),
            ))
            .await
            .expect("sending a frame");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a reply in time")
                .expect("the connection stays open")
                .expect("reading a frame");
            let Ok(text) = frame.to_text() else { continue };
            let Ok(reply) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if reply["id"] == json!(id) {
                assert_eq!(reply["type"], "ok", "{request} failed: {reply}");
                return reply["data"].clone();
            }
        }
    }

    /// The next `message` push on `channel`.
    async fn next_message(&mut self, channel: &str) -> serde_json::Value {
        use futures_util::StreamExt;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("a push in time")
                .expect("the connection stays open")
                .expect("reading a frame");
            let Ok(text) = frame.to_text() else { continue };
            let Ok(push) = serde_json::from_str::<serde_json::Value>(text) else {
                continue;
            };
            if push["type"] == "message" && push["channel"] == channel {
                return push;
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG) with the images loaded"]
async fn chart_installed_operator_serves_chat_into_postgres() {
    with_chart(|env| async move {
        env.apply_example("minimal.yaml", "demo").await;
        let ready = env.all_ready("demo").await;
        assert_eq!(ready.status.expect("status").gateway.ready_replicas, 2);
        // The operator pod reads the lag from the managed Redis through the cluster network.
        env.status_where("demo", "the lag is read in-cluster", |s| {
            s.worker.lag.is_some()
                && status::find(s, status::SCALING_ACTIVE).is_some_and(|c| c.status == "True")
        })
        .await;

        let forward = env.forward_gateway("demo").await;
        let mut alice = ChatClient::connect(forward.port).await;
        let mut bob = ChatClient::connect(forward.port).await;
        alice.call(json!({"op": "login", "user": "alice"})).await;
        bob.call(json!({"op": "login", "user": "bob"})).await;
        bob.call(json!({"op": "subscribe", "channel": "e2e"})).await;
        let sent = alice
            .call(json!({"op": "publish", "channel": "e2e", "text": "through the Service"}))
            .await;
        let pushed = bob.next_message("e2e").await;
        assert_eq!(pushed["text"], "through the Service");
        assert_eq!(pushed["msg_id"], sent["msg_id"]);
        let msg_id = sent["msg_id"].as_str().expect("msg_id");
        env.psql_until(
            "demo",
            &format!("select body from messages where msg_id = '{msg_id}'"),
            "through the Service",
        )
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG) with the images loaded"]
async fn chart_installed_operator_scales_workers_under_a_backlog() {
    with_chart(|env| async move {
        let mut spec: ChatClusterSpec = serde_json::from_value(json!({
            "worker": {"minReplicas": 0, "maxReplicas": 2, "targetLagPerReplica": 50,
                       "scaleDownStabilizationSeconds": 0},
        }))
        .expect("spec");
        spec.gateway.replicas = 1;
        env.apply_spec("backlog", &spec).await;
        // One worker runs until it has migrated the schema (the gateways reserve offset
        // blocks in it); then none: everything published stays in the persistence streams.
        let ready = env
            .status_where("backlog", "Ready=True with no workers", |s| {
                status::find(s, status::READY).is_some_and(|c| c.status == "True")
                    && s.worker.lag == Some(0)
                    && s.worker.replicas == 0
            })
            .await;
        assert_eq!(ready.status.expect("status").worker.replicas, 0);
        // Until its pod is gone the first worker may still read what is published next.
        let pods = env.api::<k8s_openapi::api::core::v1::Pod>();
        eventually("the first worker's pod is gone", || {
            let pods = pods.clone();
            async move {
                let selector =
                    "app.kubernetes.io/instance=backlog,app.kubernetes.io/component=worker";
                let list = pods
                    .list(&ListParams::default().labels(selector))
                    .await
                    .ok()?;
                list.items.is_empty().then_some(())
            }
        })
        .await;

        let forward = env.forward_gateway("backlog").await;
        let mut alice = ChatClient::connect(forward.port).await;
        alice.call(json!({"op": "login", "user": "alice"})).await;
        for n in 0..150 {
            alice
                .call(json!({"op": "publish", "channel": "backlog", "text": format!("m{n}")}))
                .await;
        }
        let scaled = env
            .status_where("backlog", "the lag raises the worker count", |s| {
                s.worker.replicas == 2
            })
            .await;
        let lag = scaled.status.expect("status").worker.lag.expect("lag");
        assert!(lag > 50, "lag {lag} was read from the in-cluster Redis");
        env.psql_until(
            "backlog",
            "select count(*) from messages where channel = 'backlog'",
            "150",
        )
        .await;
        env.status_where("backlog", "drained: back to no workers", |s| {
            s.worker.lag == Some(0) && s.worker.replicas == 0
        })
        .await;
        let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
        let list = events.list(&ListParams::default()).await.expect("events");
        assert!(
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ScaledWorkers")),
            "a ScaledWorkers event"
        );
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG) with the images loaded"]
async fn chart_recreate_with_retained_volume_keeps_the_database_usable() {
    with_chart(|env| async move {
        env.apply_example("minimal.yaml", "again").await;
        env.all_ready("again").await;
        let secrets = env.api::<Secret>();
        let credentials = Component::Postgres.object_name("again");
        let before = secrets.get(&credentials).await.expect("credentials");
        env.clusters()
            .delete("again", &DeleteParams::background())
            .await
            .expect("deleting the ChatCluster");
        let statefulsets = env.api::<StatefulSet>();
        eventually("the ChatCluster's StatefulSets are gone", || {
            let statefulsets = statefulsets.clone();
            async move {
                let list = ListParams::default().labels("app.kubernetes.io/instance=again");
                statefulsets
                    .list(&list)
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        })
        .await;
        let claims = env.api::<PersistentVolumeClaim>();
        assert!(
            claims
                .get_opt("data-again-postgres-0")
                .await
                .expect("claim")
                .is_some(),
            "pvcRetention: Retain keeps the data"
        );
        let kept = secrets.get_opt(&credentials).await.expect("credentials");
        let kept = kept.expect("the credentials live as long as the data");
        assert_eq!(kept.data, before.data);

        env.apply_example("minimal.yaml", "again").await;
        let ready = env.all_ready("again").await;
        assert!(
            ready.status.expect("status").worker.ready_replicas >= 1,
            "the worker logs in"
        );
        let after = secrets.get(&credentials).await.expect("credentials");
        assert_eq!(
            after.data, before.data,
            "the same password opens the old database"
        );
        let forward = env.forward_gateway("again").await;
        let mut alice = ChatClient::connect(forward.port).await;
        alice.call(json!({"op": "login", "user": "alice"})).await;
        let sent = alice
            .call(json!({"op": "publish", "channel": "again", "text": "after recreate"}))
            .await;
        let msg_id = sent["msg_id"].as_str().expect("msg_id").to_owned();
        env.psql_until(
            "again",
            &format!("select body from messages where msg_id = '{msg_id}'"),
            "after recreate",
        )
        .await;
        let users = env
            .psql("again", "select count(*) from users where name = 'alice'")
            .await;
        assert_eq!(users, "1");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn storage_edits_are_checked_and_grow_the_volume_without_wedging() {
    with_env(|env| async move {
        let mut example = env.apply_example("minimal.yaml", "disk").await;
        let claims = env.api::<PersistentVolumeClaim>();
        let claim = "data-disk-postgres-0";
        eventually("the postgres data claim is bound", || {
            let claims = claims.clone();
            async move {
                let c = claims.get(claim).await.ok()?;
                (c.status?.phase.as_deref() == Some("Bound")).then_some(())
            }
        })
        .await;
        fn managed(spec: &mut ChatClusterSpec) -> &mut ManagedDatastore {
            spec.postgres.managed.as_mut().expect("managed")
        }

        let mut other_class = example.spec.clone();
        managed(&mut other_class).storage_class_name = Some("other".to_owned());
        let error = env
            .try_apply_spec("disk", &other_class)
            .await
            .expect_err("a class change is refused");
        assert!(error.contains("storageClassName is immutable"), "{error}");

        managed(&mut example.spec).storage = Some(
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("5Gi".to_owned()),
        );
        env.apply_spec("disk", &example.spec).await;
        let mut smaller = example.spec.clone();
        managed(&mut smaller).storage = Some(
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("4Gi".to_owned()),
        );
        let error = env
            .try_apply_spec("disk", &smaller)
            .await
            .expect_err("shrinking is refused");
        assert!(error.contains("storage can only grow"), "{error}");

        // Growing the volume and scaling the gateways in one edit: both happen.
        managed(&mut example.spec).storage = Some(
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("6Gi".to_owned()),
        );
        example.spec.gateway.replicas = 3;
        env.apply_spec("disk", &example.spec).await;
        eventually("the claim asks for 6Gi", || {
            let claims = claims.clone();
            async move {
                let c = claims.get(claim).await.ok()?;
                let size = c.spec?.resources?.requests?.get("storage")?.0.clone();
                (size == "6Gi").then_some(())
            }
        })
        .await;
        let deployments = env.api::<Deployment>();
        eventually("the gateway Deployment has 3 replicas", || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get("disk-gateway").await.ok()?;
                (d.spec?.replicas == Some(3)).then_some(())
            }
        })
        .await;
        let status = env
            .status_where("disk", "the new generation is observed", |s| {
                s.observed_generation == example.metadata.generation.map(|g| g + 2)
            })
            .await
            .status
            .expect("status");
        let degraded = status::find(&status, status::DEGRADED).expect("Degraded");
        assert_eq!(
            degraded.status, "False",
            "nothing wedged: {}",
            degraded.message
        );
        let statefulset = env
            .api::<StatefulSet>()
            .get("disk-postgres")
            .await
            .expect("sts");
        let template = &statefulset
            .spec
            .expect("spec")
            .volume_claim_templates
            .expect("templates")[0];
        let size = &template
            .spec
            .as_ref()
            .expect("spec")
            .resources
            .as_ref()
            .expect("resources")
            .requests
            .as_ref()
            .expect("requests")["storage"];
        assert_eq!(size.0, "5Gi", "the immutable template is left as created");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn removed_fields_and_modes_leave_the_children() {
    with_env(|env| async move {
        let spec: ChatClusterSpec = serde_json::from_value(json!({
            "imagePullPolicy": "Always",
            "auth": {"mode": "jwt"},
            "worker": {"resources": {"requests": {"cpu": "0.5", "memory": "64Mi"}, "limits": {"cpu": "1"}}},
        }))
        .expect("spec");
        env.apply_spec("trim", &spec).await;
        let deployments = env.api::<Deployment>();
        let worker_container = |d: Deployment| {
            d.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].clone())
        };
        eventually("the worker runs with the limit and pull policy", || {
            let deployments = deployments.clone();
            async move {
                let c = worker_container(deployments.get("trim-worker").await.ok()?)?;
                let limited = c.resources?.limits?.contains_key("cpu");
                (limited && c.image_pull_policy.as_deref() == Some("Always")).then_some(())
            }
        })
        .await;
        env.child::<Secret>(&names::auth("trim")).await;
        let generation = deployments.get("trim-worker").await.expect("worker").metadata.generation;

        // Drop the pull policy, the resources and JWT auth, and the Redis store goes external.
        let secrets = env.api::<Secret>();
        let url: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-url"},
            "stringData": {"url": "redis://redis.invalid:6379"},
        }))
        .expect("secret");
        secrets.create(&PostParams::default(), &url).await.expect("creating the URL secret");
        let trimmed: ChatClusterSpec = serde_json::from_value(json!({
            "redis": {"external": {"urlSecretRef": {"name": "redis-url", "key": "url"}}},
        }))
        .expect("spec");
        env.apply_spec("trim", &trimmed).await;
        eventually("the worker loses the limit and the pull policy", || {
            let deployments = deployments.clone();
            async move {
                let c = worker_container(deployments.get("trim-worker").await.ok()?)?;
                let limited = c.resources.as_ref()?.limits.as_ref()?.contains_key("cpu");
                let default_requests = c.resources?.requests?.get("cpu")?.0 == "50m";
                (!limited && default_requests && c.image_pull_policy.as_deref() != Some("Always"))
                    .then_some(())
            }
        })
        .await;
        let statefulsets = env.api::<StatefulSet>();
        let services = env.api::<Service>();
        let policies = env.api::<NetworkPolicy>();
        eventually("the managed Redis and the generated JWT secret are removed", || {
            let (statefulsets, services, policies, secrets) =
                (statefulsets.clone(), services.clone(), policies.clone(), secrets.clone());
            async move {
                let gone = statefulsets.get_opt("trim-redis").await.ok()?.is_none()
                    && services.get_opt("trim-redis").await.ok()?.is_none()
                    && policies.get_opt("trim-redis").await.ok()?.is_none()
                    && secrets.get_opt("trim-auth").await.ok()?.is_none();
                gone.then_some(())
            }
        })
        .await;
        assert!(
            statefulsets.get_opt("trim-postgres").await.expect("read").is_some(),
            "what the spec still asks for stays"
        );
        // Quantities the server rewrites (0.5 -> 500m) must not re-apply on every resync.
        let settled = deployments.get("trim-worker").await.expect("worker").metadata.generation;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let later = deployments.get("trim-worker").await.expect("worker").metadata.generation;
        assert_eq!(settled, later, "five resyncs changed nothing");
        assert!(later > generation);
    })
    .await;
}
