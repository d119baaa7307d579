#!/usr/bin/env bash
# `make image`: build both Vitrine images (deploy/docker/Dockerfile targets retrieval and
# ranking) with podman or docker, whichever works here. Exits non-zero, naming what is
# missing, when no engine can build.
#
# Settings (environment):
#   CONTAINER_ENGINE  podman | docker (default: the first that answers `info`)
#   TAG               image tag (default: the version in pyproject.toml)
#   BASE_IMAGE        base of both images (default: python:3.11-slim-bookworm). When it
#                     is neither present locally nor pullable, a local Debian base is
#                     built with make-base-image.sh (root + debootstrap) and used instead.
#   LOCAL_BASE_IMAGE  name of that local base (default: localhost/vitrine-base:bookworm-py3.11)
#   TORCH_INDEX_URL   where the CPU torch wheel comes from (the PyTorch CPU wheel index);
#                     not needed when PIP_OPTIONS' --find-links holds the +cpu wheel
#   PIP_OPTIONS       extra pip options for the build, e.g. a mirror or wheel directory;
#                     default: the host's pip find-links / extra-index-url settings, whose
#                     local directories are mounted read-only into the build (podman)
#   PULL_TIMEOUT_S    how long to try pulling BASE_IMAGE (default: 60)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DOCKERFILE=$ROOT/deploy/docker/Dockerfile
TAG=${TAG:-$(sed -n -E 's/^version = "([^"]+)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/vitrine-base:bookworm-py3.11}
PULL_TIMEOUT_S=${PULL_TIMEOUT_S:-60}
TARGETS=(retrieval ranking)

say() { printf 'make image: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

# --- which engine ----------------------------------------------------------------------
# Podman fallback flags for hosts without systemd cgroups or overlay support (containers
# in containers, e.g. CI runners): see docs/deploy.md "Building images".
PODMAN_FALLBACK=(--storage-driver vfs --cgroup-manager cgroupfs --runtime runc)
ENGINE=()
why_not=()
try_engine() {
  local name=$1
  if ! command -v "$name" >/dev/null; then
    why_not+=("$name is not installed")
    return 1
  fi
  if "$name" info >/dev/null 2>&1; then
    ENGINE=("$name")
  elif [[ $name == podman ]] && podman "${PODMAN_FALLBACK[@]}" info >/dev/null 2>&1; then
    ENGINE=(podman "${PODMAN_FALLBACK[@]}")
  elif [[ $name == docker ]]; then
    why_not+=("docker is installed but its daemon does not answer ('docker info' fails)")
    return 1
  else
    why_not+=("podman is installed but 'podman info' fails, also with ${PODMAN_FALLBACK[*]}")
    return 1
  fi
}
if [[ -n ${CONTAINER_ENGINE:-} ]]; then
  try_engine "$CONTAINER_ENGINE" || true
else
  try_engine podman || try_engine docker || true
fi
if [[ ${#ENGINE[@]} -eq 0 ]]; then
  say "no container engine can build here:"
  for reason in "${why_not[@]}"; do say "  - $reason"; done
  die "install podman (apt-get install --no-install-recommends podman runc fuse-overlayfs slirp4netns uidmap) or start a docker daemon; see docs/deploy.md"
fi
say "engine: ${ENGINE[*]}"

have_image() {
  if [[ ${ENGINE[0]} == podman ]]; then
    "${ENGINE[@]}" image exists "$1"
  else
    "${ENGINE[@]}" image inspect "$1" >/dev/null 2>&1
  fi
}

# --- base image ------------------------------------------------------------------------
if have_image "$BASE_IMAGE"; then
  say "base image: $BASE_IMAGE (local)"
elif timeout "$PULL_TIMEOUT_S" "${ENGINE[@]}" pull "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base image: $BASE_IMAGE (pulled)"
elif have_image "$LOCAL_BASE_IMAGE"; then
  say "cannot pull $BASE_IMAGE; using the local base $LOCAL_BASE_IMAGE"
  BASE_IMAGE=$LOCAL_BASE_IMAGE
else
  say "cannot pull $BASE_IMAGE; building the local base $LOCAL_BASE_IMAGE with debootstrap"
  "$ROOT/deploy/docker/make-base-image.sh" "$LOCAL_BASE_IMAGE" "${ENGINE[@]}" \
    || die "no base image: $BASE_IMAGE cannot be pulled and $LOCAL_BASE_IMAGE could not be built (see above)"
  BASE_IMAGE=$LOCAL_BASE_IMAGE
fi

# --- pip sources -----------------------------------------------------------------------
build_extra=()
host_pip=(python3 -m pip config get)
if [[ -z ${PIP_OPTIONS+set} ]]; then
  PIP_OPTIONS=""
  for key in find-links extra-index-url index-url; do
    for item in $("${host_pip[@]}" "global.$key" 2>/dev/null || true); do
      PIP_OPTIONS+=" --$key $item"
    done
  done
fi
# A CA bundle the host's pip trusts (e.g. for a TLS-intercepting proxy) is trusted by the
# build too.
PIP_CA=${PIP_CERT:-$("${host_pip[@]}" global.cert 2>/dev/null || true)}
if [[ ${ENGINE[0]} == podman ]]; then
  # Local wheel directories and file:// indexes named in PIP_OPTIONS, mounted read-only
  # (an index's parent too: its pages link to ../../files/...).
  declare -A mounts=()
  for item in $PIP_OPTIONS; do
    path=${item#file://}
    if [[ $item == file://* ]]; then
      path=$(dirname "$path")
    fi
    if [[ $path == /* && -d $path ]]; then
      mounts[$path]=1
    fi
  done
  for path in "${!mounts[@]}"; do
    build_extra+=(--volume "$path:$path:ro")
  done
  if [[ -n $PIP_CA && -f $PIP_CA ]]; then
    build_extra+=(--volume "$PIP_CA:/run/vitrine-build-ca.pem:ro")
    PIP_OPTIONS+=" --cert /run/vitrine-build-ca.pem"
  fi
  build_extra+=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
  # The OCI image format has no HEALTHCHECK or SHELL; keep the Dockerfile's.
  build_extra+=(--format docker)
elif [[ -n $PIP_CA ]]; then
  say "note: $PIP_CA (pip's CA bundle here) is not passed to a docker build; set PIP_OPTIONS if pip needs it"
fi
# The build reaches package registries through the host's network.
build_extra+=(--network host)

# --- build -----------------------------------------------------------------------------
for target in "${TARGETS[@]}"; do
  image=vitrine-$target:$TAG
  say "building $image (target $target, base $BASE_IMAGE)"
  started=$SECONDS
  "${ENGINE[@]}" build -f "$DOCKERFILE" --target "$target" -t "$image" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL:-}" \
    --build-arg PIP_OPTIONS="$PIP_OPTIONS" \
    "${build_extra[@]}" "$ROOT"
  # The image must start as its own (non-root) user: the CLI answers.
  "${ENGINE[@]}" run --rm --no-healthcheck --network none --read-only --entrypoint vitrine "$image" --help >/dev/null \
    || die "$image was built but does not run 'vitrine --help' as its user"
  say "built $image in $((SECONDS - started)) s; 'vitrine --help' runs in it"
done
"${ENGINE[@]}" images --filter reference='vitrine-*' --filter reference='localhost/vitrine-*'
