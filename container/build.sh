#!/usr/bin/env bash
# Builds the storage-sidecar image with podman (or docker): container/build.sh [TAG]
#
# The Dockerfile's base is the official Python slim image. When no container registry answers
# (as on a machine that reaches only package registries), a base is made from Debian's own
# packages with mmdebstrap and imported as localhost/storage-sidecar-base:bookworm (cached).
# pip inside the build reaches PyPI through the host's network and CA bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/storage-sidecar:dev}
ENGINE=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[[ -n "$ENGINE" ]] || { echo "build.sh: neither podman nor docker is installed" >&2; exit 69; }
RUNTIME=()
[[ "$(basename "$ENGINE")" == podman ]] && RUNTIME=(--runtime runc --cgroup-manager=cgroupfs)

BASE=docker.io/library/python:3.11-slim
if ! timeout 60 "$ENGINE" "${RUNTIME[@]}" pull -q "$BASE" >/dev/null 2>&1; then
    BASE=localhost/storage-sidecar-base:bookworm
    if ! "$ENGINE" "${RUNTIME[@]}" image exists "$BASE" 2>/dev/null; then
        echo "build.sh: no registry answers; making a Debian base with mmdebstrap (about 100 s)" >&2
        command -v mmdebstrap >/dev/null || { echo "build.sh: mmdebstrap is needed (apt-get install mmdebstrap)" >&2; exit 69; }
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        mmdebstrap --quiet --variant=minbase \
            --include=python3,python3-venv,python3-dev,fuse3,libfuse3-3,ca-certificates,passwd \
            bookworm "$tmp/rootfs.tar"
        "$ENGINE" "${RUNTIME[@]}" import --change 'CMD ["/bin/bash"]' "$tmp/rootfs.tar" "$BASE" >/dev/null
    fi
fi
echo "build.sh: building $TAG on $BASE" >&2
volumes=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && volumes+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
"$ENGINE" "${RUNTIME[@]}" build --network host "${volumes[@]}" --build-arg "BASE=$BASE" \
    --build-arg PIP_DEFAULT_TIMEOUT=180 -t "$TAG" -f Dockerfile .
"$ENGINE" "${RUNTIME[@]}" image inspect "$TAG" --format '{{.Size}}' | awk '{printf "build.sh: %s is %.0f MB\n", "'"$TAG"'", $1/1e6}' >&2
