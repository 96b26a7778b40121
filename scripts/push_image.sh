#!/usr/bin/env bash
# Push a locally built job image to Google Artifact Registry (buildah/podman or docker).
# Needs gcloud logged in with write access to the repository; creates the repository when missing.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 LOCAL_IMAGE REMOTE_IMAGE
  LOCAL_IMAGE   e.g. tunix-rt-job:0.1.0-tpu (make image-tpu)
  REMOTE_IMAGE  REGION-docker.pkg.dev/PROJECT/REPOSITORY/NAME:TAG,
                e.g. us-docker.pkg.dev/my-project/tunix/tunix-rt-job:0.1.0-tpu
environment: BUILDER buildah or docker (default: buildah when installed, else docker)
USAGE
}

if [ "${1:-}" = "-h" ]; then usage; exit 0; fi
if [ $# -ne 2 ]; then usage >&2; exit 2; fi
local_image=$1 remote=$2
host=${remote%%/*}
rest=${remote#*/}
project=${rest%%/*}
rest=${rest#*/}
repository=${rest%%/*}
case "$host" in
  *-docker.pkg.dev) location=${host%-docker.pkg.dev} ;;
  *) echo "REMOTE_IMAGE must be on Artifact Registry (REGION-docker.pkg.dev/...), not $host" >&2; exit 2 ;;
esac

if ! gcloud artifacts repositories describe "$repository" --project "$project" --location "$location" >/dev/null 2>&1; then
  gcloud artifacts repositories create "$repository" --project "$project" --location "$location" \
    --repository-format docker --description "tunix-rt job images"
fi

builder=${BUILDER:-$(command -v buildah >/dev/null && echo buildah || echo docker)}
case "$builder" in
  buildah)
    gcloud auth print-access-token | buildah login --username oauth2accesstoken --password-stdin "$host"
    buildah push "$local_image" "docker://$remote" ;;
  docker)
    gcloud auth configure-docker "$host" --quiet
    docker tag "$local_image" "$remote"
    docker push "$remote" ;;
  *) echo "BUILDER must be buildah or docker, not $builder" >&2; exit 2 ;;
esac
echo "$remote"
