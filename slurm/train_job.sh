# The body shared by slurm/stage1.sh and slurm/stage2.sh (sourced after they set STAGE; their headers
# hold the #SBATCH lines, which must stand in the submitted script itself).
RUN_DIR=${RUN_DIR:-runs/${STAGE}-${SLURM_JOB_ID}}
CONFIG=${CONFIG:-configs/${STAGE}.yaml}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [[ -f "$RUN_DIR/checkpoints/latest" ]]; then
  args=(resume "$RUN_DIR")
elif [[ "$STAGE" == stage2 ]]; then
  : "${INIT_FROM:?set INIT_FROM to the stage-1 run folder (or a checkpoint / exported adapters)}"
  args=("$STAGE" --config "$CONFIG" "train.init_from=$INIT_FROM" "$@" "output_dir=$RUN_DIR")
else
  args=("$STAGE" --config "$CONFIG" "$@" "output_dir=$RUN_DIR")
fi
[[ -n "${NPROC_PER_NODE:-}" ]] && args+=(--nproc "$NPROC_PER_NODE")

echo "[$(date -Is)] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: gd-train ${args[*]}"
# One line, before any node starts, when the run cannot start: a missing weights folder, a wrong
# config key, batch arithmetic for this allocation's world size, a checkpoint that cannot be resumed.
"$PYTHON" -m gd_train.cli "${args[@]}" --dry-run > /dev/null || exit 2
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
if (( rc != 0 )); then
  # A lost node (its launcher killed, its ranks gone) fails the others' next collective; srun
  # (--kill-on-bad-exit) ends the rest of the step. No requeue here: a failure that repeats would loop.
  last=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none)
  echo "[$(date -Is)] gd-train failed (exit $rc) without a pre-emption checkpoint; last complete checkpoint: $last;" \
    "resubmit with RUN_DIR=$RUN_DIR to resume from it"
fi
exit "$rc"
