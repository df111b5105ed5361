#!/usr/bin/env bash
# Teacher-data generation on a SLURM allocation: a Ray head on the first node, a Ray worker on every
# other node, `ray job submit` of data_pipeline/gen_teacher.py, then the cluster is torn down.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/gen_teacher.sh \
#       pretrained_path=/models/Wan2.1-T2V-1.3B-Diffusers \
#       prompts_csv=/data/OpenVidHD/OpenVidHD.csv output_dir=/shared/teacher_shards
#
# Arguments are config overrides for gen_teacher.py (see configs/datagen-wan1.3b.yaml). On an allocation with
# GPUs, `datagen.num_workers=0 datagen.num_gpus_per_worker=1` (one teacher per GPU) come first, so
# an argument can still override them. output_dir must be on a filesystem every node sees.
# Resubmitting (or a requeue after pre-emption) resumes: finished shards are skipped.
#
# Dry run (prints the commands it would run, starts nothing; needs SLURM_JOB_NODELIST):
#   slurm/gen_teacher.sh --dry-run [overrides]      or  GEN_TEACHER_DRY_RUN=1 slurm/gen_teacher.sh ...
#
# Each node's Ray runs under `python -m launch.ray_start` (launch/ray_start.py): every port it opens comes
# from a free block of launch/ports.py on its machine (nodes sharing a host, as on the local test cluster,
# or two jobs on one node never clash), in a temp dir of its own; the head writes its GCS and dashboard
# ports to $GEN_TEACHER_STATE_DIR/gen_teacher-<job id>.ray.json, from which the workers join and the job
# is submitted.
#
# Environment knobs: GEN_TEACHER_CONFIG (configs/datagen-wan1.3b.yaml), RAY_HEAD_PORT / RAY_DASHBOARD_PORT
# (pin the head's GCS / dashboard port, e.g. for a firewall; default: from the head's block),
# GEN_TEACHER_NODE_TIMEOUT_S (600: wait for all nodes to join), GEN_TEACHER_STATE_DIR (slurm/logs under
# the submit dir; every node must see it), PYTHON (python). The dashboard (the job API) binds to
# 127.0.0.1 of the head node: the job is submitted from there, and the API runs arbitrary code for
# whoever reaches it (ssh -L to watch it). Teardown SIGTERMs the steps' tasks (scancel --signal=TERM),
# and each launch.ray_start kills its Ray processes by PID — never `ray stop`, which kills Ray processes
# by name on the whole machine.
#
#SBATCH --job-name=gen-teacher
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=gen_teacher-%j.log
set -euo pipefail

DRY_RUN=${GEN_TEACHER_DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi

log() { echo "[gen_teacher.sh] $*" >&2; }
die() { log "error: $*"; exit 2; }
show() { printf '%q ' "$@" | sed 's/ $//'; echo; }  # a command as one copy-pasteable line

# The job runs from the submission directory; a dry run from wherever it is called.
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${GEN_TEACHER_CONFIG:-configs/datagen-wan1.3b.yaml}
PYTHON=${PYTHON:-python}
HEAD_PORT=${RAY_HEAD_PORT:-}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-}
NODE_TIMEOUT_S=${GEN_TEACHER_NODE_TIMEOUT_S:-600}
STATE_DIR=${GEN_TEACHER_STATE_DIR:-$REPO/slurm/logs}
PORTS_FILE=$STATE_DIR/gen_teacher-${SLURM_JOB_ID:-dry-run}.ray.json

[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or set it for --dry-run)"

# Hosts of the allocation, in order. scontrol where it works; otherwise the same expansion in Python
# (launch/rendezvous.py), so that a dry run works without SLURM's client tools or their config.
if ! HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null); then
  HOSTS=$(cd "$REPO" && "$PYTHON" -c \
    'import sys; from launch.rendezvous import expand_hostlist; print("\n".join(expand_hostlist(sys.argv[1])))' \
    "$SLURM_JOB_NODELIST" 2>/dev/null) || die "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' (scontrol show hostnames and the Python fallback both failed)"
fi
mapfile -t NODES <<<"$HOSTS"
[[ -n "${NODES[0]:-}" ]] || die "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' expands to no host"
HEAD_NODE=${NODES[0]}
WORKER_NODES=("${NODES[@]:1}")

# Per-node resources Ray should offer: what SLURM gave this job on a node.
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
[[ "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || die "cannot read the GPUs per node from '$GPUS_PER_NODE'"

OVERRIDES=()
if (( GPUS_PER_NODE > 0 )); then
  OVERRIDES+=(datagen.num_workers=0 datagen.num_gpus_per_worker=1)
fi
OVERRIDES+=("$@")

if (( ! DRY_RUN )); then
  # Config, weights folder, CSV and free disk are checked here, in one line, before any node starts.
  (cd "$REPO" && "$PYTHON" data_pipeline/gen_teacher.py --config "$CONFIG" --check "${OVERRIDES[@]}") \
    || die "the job's inputs are not ready (see the line above); nothing was started"
fi

if (( DRY_RUN )); then
  HEAD_IP=$HEAD_NODE  # a real run asks the node for its address (below)
  log "dry run: ${#NODES[@]} node(s): head $HEAD_NODE, workers: ${WORKER_NODES[*]:-none}; $GPUS_PER_NODE GPU(s), $CPUS_PER_NODE CPU(s) per node"
  echo "head address: $(show srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address)"
else
  HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')
fi

# One task per node holding all of the node's CPUs and GPUs: a step that asked for less would confine
# Ray (and every actor it starts) to that share under cgroup task binding.
STEP_RESOURCES=(--cpus-per-task="$CPUS_PER_NODE")
if (( GPUS_PER_NODE > 0 )); then
  STEP_RESOURCES+=(--gpus-per-task="$GPUS_PER_NODE")
fi
HEAD_CMD=(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" "${STEP_RESOURCES[@]}" --chdir="$REPO"
  "$PYTHON" -m launch.ray_start head --node-ip-address="$HEAD_IP"
  --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --ports-file="$PORTS_FILE"
  ${HEAD_PORT:+--port="$HEAD_PORT"} ${DASHBOARD_PORT:+--dashboard-port="$DASHBOARD_PORT"})

# The commands that need the head's ports (pinned, or read from $PORTS_FILE once the head is up).
node_commands() {
  WORKER_CMD=(srun --nodes="${#WORKER_NODES[@]}" --ntasks="${#WORKER_NODES[@]}" --ntasks-per-node=1
    --exclude="$HEAD_NODE" "${STEP_RESOURCES[@]}" --chdir="$REPO"
    "$PYTHON" -m launch.ray_start node --address="$HEAD_IP:$1" --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE")
  DASHBOARD="http://127.0.0.1:$2"
  SUBMIT_CMD=(ray job submit --address "$DASHBOARD" --working-dir "$REPO" --
    "$PYTHON" data_pipeline/gen_teacher.py --config "$CONFIG" "${OVERRIDES[@]}")
}

if (( DRY_RUN )); then
  node_commands "${HEAD_PORT:-GCS_PORT}" "${DASHBOARD_PORT:-DASHBOARD_PORT}"
  [[ -n "$HEAD_PORT" && -n "$DASHBOARD_PORT" ]] || echo "ports: GCS_PORT / DASHBOARD_PORT: the head's, read from $PORTS_FILE"
  echo "head: $(show "${HEAD_CMD[@]}")"
  if (( ${#WORKER_NODES[@]} > 0 )); then
    echo "workers: $(show "${WORKER_CMD[@]}")"
  fi
  echo "wait: until ${#NODES[@]} node(s) are alive at $DASHBOARD (at most ${NODE_TIMEOUT_S} s)"
  echo "submit: $(show "${SUBMIT_CMD[@]}")"
  echo "teardown: $(show scancel --signal=TERM "${SLURM_JOB_ID:-JOB_ID}") (the steps' tasks), then wait for the srun steps"
  exit 0
fi

STEP_PIDS=()
teardown() {
  local status=$? deadline=$(( SECONDS + 30 )) pid
  log "tearing down the Ray cluster (srun steps: ${STEP_PIDS[*]:-none})"
  # SIGTERM to the steps' tasks (not the batch shell): each launch.ray_start kills its Ray and removes
  # its temp dir. A SIGTERM to srun itself would cancel the step, and that SIGKILLs the tasks.
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
  for pid in "${STEP_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.5; done
  done
  for pid in "${STEP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STEP_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$PORTS_FILE"
  exit "$status"
}
trap teardown EXIT
trap 'exit 143' TERM INT  # pre-emption / scancel: run the EXIT trap

alive_nodes() {
  "$PYTHON" - "$DASHBOARD" <<'EOF' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=sys.argv[1], filters=[("state", "=", "ALIVE")])))
EOF
}
wait_for_nodes() {  # wait_for_nodes N: until N Ray nodes are alive (or a step died, or the timeout)
  local deadline=$(( SECONDS + NODE_TIMEOUT_S )) alive
  while alive=$(alive_nodes); (( alive < $1 )); do
    (( SECONDS < deadline )) || die "only $alive/$1 Ray node(s) alive after ${NODE_TIMEOUT_S} s"
    for pid in "${STEP_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || die "a Ray srun step (pid $pid) exited before the cluster was up"
    done
    sleep 3
  done
}

head_ports() {  # "GCS DASHBOARD" from the head's ports file, once it is there
  "$PYTHON" -c 'import json, sys; p = json.load(open(sys.argv[1])); print(p["gcs"], p["dashboard"])' "$PORTS_FILE" 2>/dev/null
}

mkdir -p "$STATE_DIR"
rm -f "$PORTS_FILE"  # a requeued job's previous head wrote one
log "Ray head on $HEAD_NODE ($HEAD_IP); $GPUS_PER_NODE GPU(s), $CPUS_PER_NODE CPU(s) per node"
"${HEAD_CMD[@]}" &
STEP_PIDS+=($!)
deadline=$(( SECONDS + NODE_TIMEOUT_S ))
until PORTS=$(head_ports); do
  (( SECONDS < deadline )) || die "the Ray head on $HEAD_NODE did not come up within ${NODE_TIMEOUT_S} s"
  kill -0 "${STEP_PIDS[0]}" 2>/dev/null || die "the Ray head's srun step exited before the head was up"
  sleep 1
done
read -r GCS_PORT DASHBOARD_PORT <<<"$PORTS"
node_commands "$GCS_PORT" "$DASHBOARD_PORT"
log "Ray head up: GCS $HEAD_IP:$GCS_PORT, job API $DASHBOARD"
if (( ${#WORKER_NODES[@]} > 0 )); then
  log "Ray workers on ${WORKER_NODES[*]}"
  "${WORKER_CMD[@]}" &
  STEP_PIDS+=($!)
  wait_for_nodes "${#NODES[@]}"
fi
log "all ${#NODES[@]} node(s) alive; submitting the job"

cd "$REPO"
set +e
"${SUBMIT_CMD[@]}"
status=$?
set -e
log "ray job submit exited with $status"
exit "$status"
