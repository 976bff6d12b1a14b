//! End-to-end tests against a real cluster (kind, minikube, any): ignored by `cargo test`.
//!
//! Run with `KUBECONFIG` pointing at a disposable cluster:
//! `cargo test -p chatcluster-operator --test e2e -- --ignored --test-threads=2`.
//! Each test installs the CRD (server-side apply, idempotent), makes its own namespace, runs
//! the controller in-process for that namespace, and deletes the namespace when done, pass or
//! fail. Checks that need running gateway/worker pods (readiness) run only with
//! `CHATCLUSTER_E2E_IMAGES=1`, once the images are loaded into the cluster.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use chatcluster_operator::build::{CONFIG_HASH_ANNOTATION, Component, MANAGER, names};
use chatcluster_operator::controller::{self, Settings};
use chatcluster_operator::crd::{ChatCluster, ChatClusterSpec};
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

const TIMEOUT: Duration = Duration::from_secs(120);
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
        let body = json!({
            "apiVersion": "chatcluster.dev/v1alpha1",
            "kind": "ChatCluster",
            "metadata": {"name": name},
            "spec": spec,
        });
        self.clusters()
            .patch(
                name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .expect("applying a ChatCluster")
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
    crds.patch(
        &crd_name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the CRD");
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
        let events: Api<k8s_openapi::api::events::v1::Event> = env.api();
        let created = eventually("a Created event on the ChatCluster", || {
            let events = events.clone();
            async move {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items.into_iter().find(|e| {
                    e.reason.as_deref() == Some("Created")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo")
                })
            }
        })
        .await;
        let note = created.note.unwrap_or_default();
        assert!(note.contains("Deployment demo-gateway"), "{note}");

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
            .status_where("demo", "status has all three conditions", |s| {
                s.conditions.len() == 3
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
        for type_ in [status::READY, status::PROGRESSING, status::DEGRADED] {
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
        env.status_where("steady", "status is written", |s| s.conditions.len() == 3)
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
