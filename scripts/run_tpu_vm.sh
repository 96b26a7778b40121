#!/usr/bin/env bash
# Run the job image on every worker of a Cloud TPU VM (single- or multi-host): docker run with the
# host's network (the workers of a multi-host slice reach each other) and the TPU devices.
# The TPU VM's service account needs Artifact Registry read and bucket access. The command returns
# the job's exit code contract: 0 done, 2 bad input, 75 preempted/retriable (run it again), 1 other.
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 -t TPU_NAME -z ZONE -i IMAGE -m RUN_MANIFEST [-p PROJECT] [-c CACHE_URI] [-- ARGS...]
  -t TPU_NAME      the TPU VM (gcloud compute tpus tpu-vm list)
  -z ZONE          its zone, e.g. us-west4-a
  -i IMAGE         e.g. us-docker.pkg.dev/PROJECT/tunix/tunix-rt-job:0.1.0-tpu
  -m RUN_MANIFEST  gs://BUCKET/manifests/run.json
  -p PROJECT       default: gcloud's
  -c CACHE_URI     JAX compile cache (default: a docker volume on each worker; gs://... shares it)
  ARGS             instead of "run", e.g. -- run --set training.steps=100
USAGE
}

tpu="" zone="" image="" manifest="" project="" cache=""
while getopts "t:z:i:m:p:c:h" opt; do
  case "$opt" in
    t) tpu=$OPTARG ;;
    z) zone=$OPTARG ;;
    i) image=$OPTARG ;;
    m) manifest=$OPTARG ;;
    p) project=$OPTARG ;;
    c) cache=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ -z "$tpu" ] || [ -z "$zone" ] || [ -z "$image" ] || [ -z "$manifest" ]; then usage >&2; exit 2; fi
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(run)

# The remote command, quoted for the workers' bash.
docker_run=(sudo docker run --rm --net=host --privileged
  -e "RUN_MANIFEST=$manifest" -e "TUNIX_JOB_IMAGE=$image"
  -v tunix-job-cache:/var/cache/tunix-job)
[ -n "$cache" ] && docker_run+=(-e "JAX_COMPILATION_CACHE_DIR=$cache")
docker_run+=("$image" "${args[@]}")
remote="sudo gcloud auth configure-docker ${image%%/*} --quiet >/dev/null && $(printf '%q ' "${docker_run[@]}")"

gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
[ -n "$project" ] && gcloud_args+=(--project "$project")
exec gcloud "${gcloud_args[@]}"
