#!/usr/bin/env bash
# Stage 2 — RL fine-tuning — on 8 nodes x 8 GPUs (the paper's 64 GPUs; configs/stage2.yaml), starting
# from a stage-1 run: INIT_FROM=runs/stage1-<job> (a run folder, checkpoint folder or exported adapters).
#
#   sbatch slurm/stage2.sh [KEY=VALUE ...]                      config overrides, e.g. data.shards=/shared/shards
#   INIT_FROM=runs/stage1-a RUN_DIR=runs/stage2-a sbatch slurm/stage2.sh
#
# One launcher task per node (srun --ntasks-per-node=1) runs `gd-train`, which runs torchrun over the
# node's GPUs; every node derives the same rendezvous from the allocation (first host, port from the
# job id) and reads its node rank inside the task (launch/rendezvous.py). Check with --dry-run:
#   srun --ntasks-per-node=1 python -m gd_train.cli stage2 --config configs/stage2.yaml --dry-run
#
# Pre-emption: SLURM sends SIGUSR1 to every task 120 s before the time limit (--signal); the trainer
# checkpoints at the next step boundary, writes $RUN_DIR/preempted.json and exits cleanly; this script
# then requeues the job. Whenever the job starts and $RUN_DIR has a checkpoint (a requeue, by us or
# by the scheduler, or a resubmission with the same RUN_DIR) it resumes from checkpoints/latest.
#
# Set the time limit your cluster needs (sbatch --time=...): the USR1 warning comes 120 s before it.
#
# Environment: INIT_FROM (required for a fresh start), RUN_DIR (default runs/stage2-<job id>),
# CONFIG (configs/stage2.yaml), PYTHON (.venv's), NPROC_PER_NODE (default: the node's GPUs).
#
#SBATCH --job-name=gd-stage2
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

STAGE=stage2
# Under sbatch this file runs from a spool copy: the shared body is found from the submit dir.
source "${SLURM_SUBMIT_DIR:-.}/slurm/train_job.sh"
