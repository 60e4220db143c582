#!/usr/bin/env bash
# Join this node to an evomerge Ray cluster, with its GPUs: evomerge runs one worker per GPU (each Ray
# actor asks for GPU: 1 and CPU: 1 whenever the cluster has GPUs), so the node offers every GPU it has
# and at least as many CPUs.
#
#   workers/start-worker.sh HEAD_ADDRESS        # HOST:PORT of the head (ray start --head --port PORT)
#
# Environment:
#   EVOMERGE_NUM_GPUS   GPUs to offer (default: all that nvidia-smi lists; 0 joins a CPU-only node)
#   EVOMERGE_NUM_CPUS   CPUs to offer (default: all of this machine's)
#   EVOMERGE_BLOCK      1: stay in the foreground until the node stops (containers; default 0)
#   RAY_AUTH_MODE, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH: the cluster's token authentication, as on the head
#   RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL: minor lets a node whose Python differs in its patch level join
# Extra arguments after HEAD_ADDRESS go to `ray start` as they are (e.g. --object-store-memory BYTES).
#
# Every node must see the models, task files and caches at the same paths as the driver (a shared
# filesystem, or the same download on each): workers run offline and open what the recipe names.
set -euo pipefail

usage() { echo "usage: $0 HEAD_ADDRESS [ray start options...]" >&2; exit 2; }
[[ $# -ge 1 && -n $1 && $1 != -* ]] || usage
head=$1
shift
[[ $head == *:* ]] || head="$head:6379"

command -v ray >/dev/null || { echo "error: ray not found; install workers/requirements.txt and evomerge" >&2; exit 2; }

if [[ -n ${EVOMERGE_NUM_GPUS:-} ]]; then
  gpus=$EVOMERGE_NUM_GPUS
elif command -v nvidia-smi >/dev/null; then
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | grep -c . || true)
else
  gpus=0
fi
[[ $gpus =~ ^[0-9]+$ ]] || { echo "error: EVOMERGE_NUM_GPUS must be a whole number, not '$gpus'" >&2; exit 2; }
if [[ $gpus -eq 0 && -z ${EVOMERGE_NUM_GPUS:-} ]]; then
  echo "error: no GPU found on this node (nvidia-smi lists none); set EVOMERGE_NUM_GPUS=0 to join it as a CPU node" >&2
  exit 2
fi
cpus=${EVOMERGE_NUM_CPUS:-$(nproc)}
[[ $cpus =~ ^[0-9]+$ ]] || { echo "error: EVOMERGE_NUM_CPUS must be a whole number, not '$cpus'" >&2; exit 2; }
if (( cpus < gpus )); then
  echo "error: $gpus GPUs but $cpus CPUs: each evomerge worker takes one GPU and one CPU" >&2
  exit 2
fi

args=(start --address="$head" --num-gpus="$gpus" --num-cpus="$cpus" --disable-usage-stats)
[[ ${EVOMERGE_BLOCK:-0} == 1 ]] && args+=(--block)
echo "joining $head with $gpus GPU(s) and $cpus CPU(s)"
exec ray "${args[@]}" "$@"
