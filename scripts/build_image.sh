#!/usr/bin/env bash
# Build the job image for one accelerator from docker/Dockerfile, with buildah (preferred: needs no
# daemon) or docker. Prints the image name.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 [-b BASE_IMAGE] [-t TAG] cpu|tpu
  cpu|tpu        which JAX: CPU only, or jax[tpu] with its pinned libtpu
  -b BASE_IMAGE  image to build FROM (default: the Dockerfile's, python:3.11-slim-bookworm)
  -t TAG         image name (default: tunix-rt-job:VERSION-cpu or tunix-rt-job:VERSION-tpu)
environment:
  BUILDER        buildah or docker (default: buildah when installed, else docker)
  CA_BUNDLE      a CA bundle mounted over the image's for the build only, when the build machine's
                 HTTPS needs extra roots (buildah only; default /etc/ssl/certs/ca-certificates.crt
                 when it exists; empty: none)
  PIP_INDEX_URL  passed to pip in the build when set (a mirror of PyPI)
USAGE
}

base=""
tag=""
while getopts "b:t:h" opt; do
  case "$opt" in
    b) base=$OPTARG ;;
    t) tag=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
case "$1" in
  cpu) extra="" ;;
  tpu) extra="tpu" ;;
  *) usage >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
tag=${tag:-tunix-rt-job:$version-$1}
builder=${BUILDER:-$(command -v buildah >/dev/null && echo buildah || echo docker)}

args=(-f "$root/docker/Dockerfile" -t "$tag" --build-arg "JAX_EXTRA=$extra"
      --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
[ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
[ -n "${PIP_INDEX_URL:-}" ] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

case "$builder" in
  buildah)
    ca=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
    [ -n "$ca" ] && [ -f "$ca" ] && args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
    buildah bud --layers "${args[@]}" "$root" >&2 ;;
  docker)
    docker build "${args[@]}" "$root" >&2 ;;
  *) echo "BUILDER must be buildah or docker, not $builder" >&2; exit 2 ;;
esac
echo "$tag"
