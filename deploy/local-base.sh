#!/usr/bin/env bash
# Builds, from Debian's packages, the two base images the deployment needs when no container registry
# can be reached (so python:3.11-slim-bookworm and redis:7.2.5-bookworm cannot be pulled):
#   embeddings-local/python:3.11-bookworm   Debian's python3.11 + venv + pip, this machine's CA bundle
#   embeddings-local/redis:7-bookworm       Debian's redis-server
# from a minimal Debian bookworm root filesystem made with debootstrap and `docker import`ed
# (embeddings-local/debian:bookworm). Needs root (debootstrap), debootstrap and a Docker engine.
# Images that exist already are kept; --force builds them again.
set -euo pipefail

ROOTFS_IMAGE=embeddings-local/debian:bookworm
PYTHON_IMAGE=embeddings-local/python:3.11-bookworm
REDIS_IMAGE=embeddings-local/redis:7-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
HERE=$(cd "$(dirname "$0")" && pwd)

force=false
[[ "${1:-}" == "--force" ]] && force=true

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! $force && have "$PYTHON_IMAGE" && have "$REDIS_IMAGE"; then
    echo "local base images present: $PYTHON_IMAGE, $REDIS_IMAGE (--force to rebuild)"
    exit 0
fi

if $force || ! have "$ROOTFS_IMAGE"; then
    [[ $(id -u) == 0 ]] || { echo "local-base.sh: debootstrap needs root" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "local-base.sh: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs=$(mktemp -d /var/tmp/embeddings-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap bookworm (minbase) from $MIRROR into $rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -c . | docker import --change 'CMD ["/bin/bash"]' - "$ROOTFS_IMAGE"
fi

[[ -r "$CA_BUNDLE" ]] || { echo "local-base.sh: no CA bundle at $CA_BUNDLE (set CA_BUNDLE)" >&2; exit 1; }
context=$(mktemp -d)
trap 'rm -rf "$context" "${rootfs:-}"' EXIT
cp "$HERE/local/base.Dockerfile" "$context/Dockerfile"
cp "$CA_BUNDLE" "$context/ca-certificates.crt"
docker build --build-arg ROOTFS="$ROOTFS_IMAGE" --target python -t "$PYTHON_IMAGE" "$context"
docker build --build-arg ROOTFS="$ROOTFS_IMAGE" --target redis -t "$REDIS_IMAGE" "$context"
echo "built $PYTHON_IMAGE and $REDIS_IMAGE"
