#!/usr/bin/env bash
# Builds the five images, embeddings/<target>:<tag> (gateway, index, text, image, useritem), and writes
# build/images.env: the base images used, for `docker-compose --env-file` (the smoke test reads it).
#
# Base images: PYTHON_IMAGE and REDIS_IMAGE if set; else the official python:3.11-slim-bookworm and
# redis:7.2.5-bookworm when present or pullable; else (no registry reachable) the ones
# deploy/local-base.sh builds from Debian's packages.
# torch: TORCH_INDEX_URL if set (empty: the configured package index only); else PyTorch's CPU index
# when it answers, else the configured package index (on PyPI: CUDA builds, much larger; said below).
# Usage: deploy/images.sh [TAG]     (default: the project's version)
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)}
OFFICIAL_PYTHON=python:3.11-slim-bookworm
OFFICIAL_REDIS=redis:7.2.5-bookworm
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV_FILE=build/images.env
mkdir -p build

available() {  # an image present here, or pulled within a minute
    docker image inspect "$1" >/dev/null 2>&1 || timeout 60 docker pull -q "$1" >/dev/null 2>&1
}

if [[ -z "${PYTHON_IMAGE:-}" || -z "${REDIS_IMAGE:-}" ]]; then
    if available "$OFFICIAL_PYTHON" && available "$OFFICIAL_REDIS"; then
        PYTHON_IMAGE=${PYTHON_IMAGE:-$OFFICIAL_PYTHON}
        REDIS_IMAGE=${REDIS_IMAGE:-$OFFICIAL_REDIS}
    else
        echo "no registry reachable: base images from Debian's packages (deploy/local-base.sh)"
        deploy/local-base.sh
        PYTHON_IMAGE=${PYTHON_IMAGE:-embeddings-local/python:3.11-bookworm}
        REDIS_IMAGE=${REDIS_IMAGE:-embeddings-local/redis:7-bookworm}
    fi
fi

if [[ -z "${TORCH_INDEX_URL+set}" ]]; then
    if python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=15)" \
        "$CPU_TORCH_INDEX/torch/" >/dev/null 2>&1; then
        TORCH_INDEX_URL=$CPU_TORCH_INDEX
    else
        echo "PyTorch's CPU index ($CPU_TORCH_INDEX) does not answer: torch from the configured package index"
        echo "(on PyPI, Linux torch wheels are CUDA builds: the model image is several GB larger)"
        TORCH_INDEX_URL=
    fi
fi

echo "base $PYTHON_IMAGE, redis $REDIS_IMAGE, torch index ${TORCH_INDEX_URL:-(the package index)}, tag $TAG"
# A target's image is built in the order the classic builder and BuildKit both reuse best: the model
# targets share one venv layer, the core targets another.
for target in gateway index text image useritem; do
    start=$(date +%s)
    docker build -f deploy/Dockerfile --target "$target" \
        --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
        -t "embeddings/$target:$TAG" . >"build/image-$target.log" 2>&1 \
        || { tail -40 "build/image-$target.log" >&2; echo "building $target failed (build/image-$target.log)" >&2; exit 1; }
    size=$(docker image inspect -f '{{.Size}}' "embeddings/$target:$TAG")
    printf 'embeddings/%s:%s  %s MB  built in %ss\n' "$target" "$TAG" $((size / 1000000)) $(($(date +%s) - start))
done

{
    echo "# written by deploy/images.sh: the images deploy/compose.yaml runs"
    echo "EMBEDDINGS_TAG=$TAG"
    echo "PYTHON_IMAGE=$PYTHON_IMAGE"
    echo "REDIS_IMAGE=$REDIS_IMAGE"
    echo "TORCH_INDEX_URL=$TORCH_INDEX_URL"
} >"$ENV_FILE"
echo "wrote $ENV_FILE"
