#!/usr/bin/env bash
# Stage 1 — next-chunk fine-tuning — on 8 nodes x 8 GPUs (the paper's 64 GPUs; configs/stage1.yaml).
#
#   sbatch slurm/stage1.sh [KEY=VALUE ...]                      config overrides, e.g. data.shards=/shared/shards
#   RUN_DIR=runs/stage1-a CONFIG=configs/stage1.yaml sbatch slurm/stage1.sh
#
# One launcher task per node (srun --ntasks-per-node=1) runs `gd-train`, which runs torchrun over the
# node's GPUs; every node derives the same rendezvous from the allocation (first host, port from the
# job id) and reads its node rank inside the task (launch/rendezvous.py). Check with --dry-run:
#   srun --ntasks-per-node=1 python -m gd_train.cli stage1 --config configs/stage1.yaml --dry-run
#
# Pre-emption: SLURM sends SIGUSR1 to every task 120 s before the time limit (--signal); the trainer
# checkpoints at the next step boundary, writes $RUN_DIR/preempted.json and exits cleanly; this script
# then requeues the job. Whenever the job starts and $RUN_DIR has a checkpoint (a requeue, by us or
# by the scheduler, or a resubmission with the same RUN_DIR) it resumes from checkpoints/latest.
#
# Set the time limit your cluster needs (sbatch --time=...): the USR1 warning comes 120 s before it.
#
# Environment: RUN_DIR (default runs/stage1-<job id>), CONFIG (configs/stage1.yaml), PYTHON (.venv's),
# NPROC_PER_NODE (default: the node's GPUs).
#
#SBATCH --job-name=gd-stage1
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.log
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

STAGE=stage1
RUN_DIR=${RUN_DIR:-runs/${STAGE}-${SLURM_JOB_ID}}
CONFIG=${CONFIG:-configs/${STAGE}.yaml}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
  args=(resume "$RUN_DIR")
else
  args=("$STAGE" --config "$CONFIG" "$@" "output_dir=$RUN_DIR")
fi
[[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--nproc "$NPROC_PER_NODE")

echo "[$(date -Is)] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: gd-train ${args[*]}"
rm -f "$RUN_DIR/preempted.json"
# All of the node's CPUs to its one launcher task (srun does not inherit --cpus-per-task since SLURM
# 22.05, and one CPU would be shared by 8 ranks and their data loaders).
srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
  "$PYTHON" -m gd_train.cli "${args[@]}"
rc=$?
echo "[$(date -Is)] gd-train exited with $rc"

if [[ -f "$RUN_DIR/preempted.json" ]]; then
  echo "[$(date -Is)] pre-empted after a complete checkpoint ($(tr -d '\n ' < "$RUN_DIR/preempted.json")); requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"  # this shell is ended by the requeue
  exit 0
fi
exit "$rc"
