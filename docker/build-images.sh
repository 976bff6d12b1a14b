#!/usr/bin/env bash
# Builds the three chatcluster images from docker/Dockerfile and, if asked, loads them into a
# local cluster, so the images the chart and the ChatCluster defaults name exist there:
#   ghcr.io/chatcluster/gateway:VERSION  ghcr.io/chatcluster/worker:VERSION
#   ghcr.io/chatcluster/operator:VERSION
# Usage: docker/build-images.sh [--engine docker|podman] [--load kind[:CLUSTER]|minikube]
#                               [--version VERSION] [--registry REGISTRY]
# Examples:
#   docker/build-images.sh --load kind                  # kind cluster named "kind"
#   docker/build-images.sh --load kind:chatcluster
#   docker/build-images.sh --engine podman --load minikube
#   docker/build-images.sh --registry registry.example.com/chat   # then push them yourself
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
engine=${ENGINE:-}
load=""
registry=ghcr.io/chatcluster
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/chatcluster-operator/Chart.yaml")

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while (($#)); do
    case $1 in
        --engine) engine=${2:?--engine needs docker or podman}; shift 2 ;;
        --load) load=${2:?--load needs kind[:CLUSTER] or minikube}; shift 2 ;;
        --version) version=${2:?--version needs a tag}; shift 2 ;;
        --registry) registry=${2:?--registry needs a name}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

if [[ -z $engine ]]; then
    if command -v docker > /dev/null; then engine=docker
    elif command -v podman > /dev/null; then engine=podman
    else echo "neither docker nor podman found; install one or pass --engine" >&2; exit 1
    fi
fi

images=()
for target in gateway worker operator; do
    image=$registry/$target:$version
    echo "== building $image ($engine, target $target)"
    "$engine" build -f "$root/docker/Dockerfile" --target "$target" -t "$image" "$root"
    images+=("$image")
done

case $load in
    "") ;;
    kind | kind:*)
        cluster=${load#kind}
        cluster=${cluster#:}
        archive=$(mktemp --suffix=.tar)
        trap 'rm -f "$archive"' EXIT
        "$engine" save -o "$archive" "${images[@]}"
        kind load image-archive "$archive" --name "${cluster:-kind}"
        ;;
    minikube)
        for image in "${images[@]}"; do
            if [[ $engine == docker ]]; then
                minikube image load "$image"
            else
                "$engine" save "$image" | minikube image load -
            fi
        done
        ;;
    *) echo "--load takes kind[:CLUSTER] or minikube, not $load" >&2; exit 2 ;;
esac
echo "== built: ${images[*]}${load:+ (loaded into $load)}"
