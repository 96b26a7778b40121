#!/usr/bin/env bash
# Run the job as N processes on this machine, joined through jax.distributed on 127.0.0.1 (one CPU
# device each), as a multi-host slice would run it. Extra arguments go to `tunix-job run`.
#   scripts/run_local_multiprocess.sh 2 manifests/local_tiny.json --set training.steps=20
# Exit status: the first non-zero exit status among the processes, else 0.
set -euo pipefail
usage() {
  echo "usage: $0 N MANIFEST [tunix-job run arguments...]"
}
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
if [ $# -lt 2 ]; then
  usage >&2
  exit 2
fi
n=$1 manifest=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    "$python" -m job run --manifest "$manifest" "$@" 2> >(sed -u "s/^/[process $i] /" >&2) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" || code=$?
  if [ "$status" -eq 0 ]; then status=$code; fi
done
exit "$status"
