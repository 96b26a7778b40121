#!/usr/bin/env bash
# Build a minimal Debian 12 (bookworm) image with Python 3.11, locally, with no registry:
# debootstrap from the Debian mirror apt already uses, then import the root filesystem with buildah.
# CI builds the job image FROM it (docker/Dockerfile, --build-arg BASE_IMAGE=...) because no registry
# is reachable there to pull python:3.11-slim. Needs root, debootstrap and buildah.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 [-t TAG] [-m MIRROR]
  -t TAG     image name to create (default: localhost/tunix-rt-base:bookworm)
  -m MIRROR  Debian mirror URL (default: the first non-security Debian URI in apt's sources,
             or \$DEBIAN_MIRROR)
USAGE
}

tag=localhost/tunix-rt-base:bookworm
mirror=${DEBIAN_MIRROR:-}
while getopts "t:m:h" opt; do
  case "$opt" in
    t) tag=$OPTARG ;;
    m) mirror=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

apt_mirror() {
  # deb822 sources (URIs: ...) first, then the one-line format (deb URI suite ...).
  {
    grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | sed 's/\[[^]]*\]//' | awk '{print $2}'
  } | grep -v -- '-security' | grep -m1 '/debian/\?$' || true
}

if [ -z "$mirror" ]; then
  mirror=$(apt_mirror)
fi
if [ -z "$mirror" ]; then
  echo "no Debian mirror found in apt's sources; pass -m MIRROR" >&2
  exit 2
fi

rootfs=$(mktemp -d)
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$rootfs"
}
trap cleanup EXIT

echo "debootstrap bookworm from $mirror" >&2
# python3-venv gives the image's venv; ca-certificates its TLS roots; passwd (required) has useradd.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >/dev/null
# What a container never needs: docs, man pages, locales, apt's package lists and caches.
rm -rf "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
  "$rootfs"/var/log/* "$rootfs"/tmp/*

ctr=$(buildah from scratch)
buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 \
  --label org.opencontainers.image.title=tunix-rt-base \
  --label org.opencontainers.image.description="Debian 12 minbase with Python 3.11 (debootstrap)" "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
ctr=""
echo "$tag"
