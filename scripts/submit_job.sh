#!/usr/bin/env bash
# Submit a Job or JobSet from k8s/ with the image and run manifest filled in, under a name of its own
# (Jobs are immutable, so each submission is a new object). Uses kustomize as built into kubectl:
# the files in k8s/ stay plain, valid YAML that CI validates and `kubectl apply -f` takes as is;
# this script layers JSON patches over a copy (RUN_MANIFEST and TUNIX_JOB_IMAGE are the first two
# env entries of the container named "job", which `make lint-deploy` checks).
set -euo pipefail

usage() {
  cat <<USAGE
usage: $0 -i IMAGE -m RUN_MANIFEST [-f FILE] [-n NAME] [-g GSA_EMAIL] [-N NAMESPACE] [-d]
  -i IMAGE         the job image, e.g. us-docker.pkg.dev/PROJECT/tunix/tunix-rt-job:0.1.0-tpu
  -m RUN_MANIFEST  the run manifest, e.g. gs://BUCKET/manifests/run.json
  -f FILE          k8s/sft-job.yaml (default), k8s/sft-job-cpu.yaml or k8s/sft-jobset.yaml
  -n NAME          the Job/JobSet name (default: the file's name plus a UTC timestamp)
  -g GSA_EMAIL     the Google service account for Workload Identity (default: the file's)
  -N NAMESPACE     namespace (default: kubectl's current one)
  -d               dry run: print the YAML, apply nothing
USAGE
}

image="" manifest="" name="" gsa="" namespace="" dry_run=0
file=k8s/sft-job.yaml
while getopts "i:m:f:n:g:N:dh" opt; do
  case "$opt" in
    i) image=$OPTARG ;;
    m) manifest=$OPTARG ;;
    f) file=$OPTARG ;;
    n) name=$OPTARG ;;
    g) gsa=$OPTARG ;;
    N) namespace=$OPTARG ;;
    d) dry_run=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
if [ -z "$image" ] || [ -z "$manifest" ] || [ ! -f "$file" ]; then usage >&2; exit 2; fi

# The workload's kind and name in the file (the document that is not the ServiceAccount/claim).
kind=$(grep -E '^kind: (Job|JobSet)$' "$file" | head -n1 | cut -d' ' -f2)
old_name=$(awk -v kind="$kind" '$0 == "kind: " kind {found = 1} found && /^  name: / {print $2; exit}' "$file")
name=${name:-$old_name-$(date -u +%Y%m%d-%H%M%S)}
case "$kind" in
  Job) pod=/spec/template/spec ;;
  JobSet)
    pod=/spec/replicatedJobs/0/template/spec/template/spec
    rj=$(awk '/^  replicatedJobs:/ {found = 1} found && /^    - name: / {print $3; exit}' "$file") ;;
  *) echo "$file: no Job or JobSet in it" >&2; exit 2 ;;
esac
c=$pod/containers/0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$file" "$tmp/resources.yaml"
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources: [resources.yaml]"
  [ -n "$namespace" ] && echo "namespace: $namespace"
  echo "patches:"
  echo "  - target: {kind: $kind, name: $old_name}"
  echo "    patch: |-"
  echo "      - {op: replace, path: /metadata/name, value: \"$name\"}"
  echo "      - {op: test, path: $c/name, value: job}"
  echo "      - {op: replace, path: $c/image, value: \"$image\"}"
  echo "      - {op: test, path: $c/env/0/name, value: RUN_MANIFEST}"
  echo "      - {op: replace, path: $c/env/0/value, value: \"$manifest\"}"
  echo "      - {op: test, path: $c/env/1/name, value: TUNIX_JOB_IMAGE}"
  echo "      - {op: replace, path: $c/env/1/value, value: \"$image\"}"
  if [ "$kind" = JobSet ]; then
    # Pod 0's DNS name follows the JobSet's name; the port stays.
    echo "      - {op: test, path: $c/env/2/name, value: JAX_COORDINATOR_ADDRESS}"
    echo "      - {op: replace, path: $c/env/2/value, value: \"$name-$rj-0-0.$name:8476\"}"
  fi
  if [ -n "$gsa" ]; then
    echo "  - target: {kind: ServiceAccount}"
    echo "    patch: |-"
    echo "      - {op: add, path: /metadata/annotations/iam.gke.io~1gcp-service-account, value: \"$gsa\"}"
  fi
} > "$tmp/kustomization.yaml"

if [ "$dry_run" = 1 ]; then
  kubectl kustomize "$tmp"
else
  kubectl kustomize "$tmp" | kubectl apply -f -
  echo "submitted $kind/$name: kubectl logs -f ${kind,,}/$name (a JobSet: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$name)" >&2
fi
