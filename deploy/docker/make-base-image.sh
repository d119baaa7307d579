#!/usr/bin/env bash
# Build a minimal Debian bookworm + Python 3.11 base image locally, for machines that
# cannot pull python:3.11-slim-bookworm from a registry. Needs root and debootstrap
# (apt-get install debootstrap); reaches only the Debian mirror.
#
#   deploy/docker/make-base-image.sh IMAGE ENGINE [ENGINE GLOBAL FLAGS...]
#   e.g. deploy/docker/make-base-image.sh localhost/vitrine-base:bookworm-py3.11 podman
#
# The image matches what the Dockerfile expects of its base: `python` on PATH with the
# venv module, libgomp1 (LightGBM and implicit link against it), CA certificates,
# groupadd/useradd.
set -euo pipefail

IMAGE=${1:?usage: make-base-image.sh IMAGE ENGINE [FLAGS...]}
shift
ENGINE=("$@")
[[ ${#ENGINE[@]} -gt 0 ]] || { echo "usage: make-base-image.sh IMAGE ENGINE [FLAGS...]" >&2; exit 2; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,libgomp1,ca-certificates

if [[ $(id -u) -ne 0 ]]; then
  echo "make-base-image.sh: debootstrap needs root; run it as root or build $IMAGE elsewhere" >&2
  exit 2
fi
if ! command -v debootstrap >/dev/null; then
  echo "make-base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2
  exit 2
fi

rootfs=$(mktemp -d /var/tmp/vitrine-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
# mktemp makes the directory 0700; it becomes the image's `/`, which every user must traverse.
chmod 0755 "$rootfs"

echo "debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR"
# The official python images have `python`; Debian has only `python3`.
ln -sf python3 "$rootfs/usr/bin/python"
# What a registry base image would not carry: package caches and lists, logs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

tar --numeric-owner -C "$rootfs" -c . | "${ENGINE[@]}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$IMAGE"
echo "base image $IMAGE ready"
