#!/usr/bin/env bash
# `make images`: builds both images on this machine, ghcr.io/sdsclip/sdsclip:VERSION (docker/Dockerfile.cpu)
# and :VERSION-cuda (docker/Dockerfile.cuda), for machines that reach PyPI and Debian but not Docker Hub or
# the PyTorch index. Overrides (environment), each defaulting to what such a machine can reach:
#   BASE_IMAGE           default: a Debian bookworm base made here by docker/debian-base.sh when missing
#   TORCH_INDEX_URL      default https://pypi.org/simple (so the CPU image carries PyPI's CUDA wheels too;
#   TORCH_LOCAL_VERSION  the published CPU image uses the CPU index and +cpu, the Dockerfile's defaults)
#   PIP_CERT             a CA bundle for pip behind a TLS proxy (BuildKit secret, never in a layer)
# With the same torch source the two builds share every layer but the image config.
set -euo pipefail
cd "$(dirname "$0")/.."
# BuildKit (RUN --mount, secrets) without the buildx plugin: Debian's docker.io client has it built in.
docker=${DOCKER:-docker}
if ! "$docker" buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then docker=/usr/bin/docker; fi
export DOCKER_BUILDKIT=1
version=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
base=${BASE_IMAGE:-sdsclip-local/debian-python3:bookworm}
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
    [ -n "${BASE_IMAGE:-}" ] || DOCKER="$docker" bash docker/debian-base.sh "$base"
fi
args=(--network host --build-arg "BASE_IMAGE=$base" --build-arg PYTHON=python3
      --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}"
      --build-arg "TORCH_LOCAL_VERSION=${TORCH_LOCAL_VERSION:-}")
if [ -n "${PIP_CERT:-}" ]; then args+=(--secret "id=pip_cert,src=$PIP_CERT"); fi
for flavour in cpu cuda; do
    tag=ghcr.io/sdsclip/sdsclip:$version$([ $flavour = cuda ] && echo -cuda || true)
    started=$(date +%s)
    "$docker" build "${args[@]}" -f docker/Dockerfile.$flavour -t "$tag" .
    echo "built $tag in $(( $(date +%s) - started )) s: $("$docker" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.2f GB", $1/1e9}')"
done
