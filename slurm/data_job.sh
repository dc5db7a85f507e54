# The body of the data-preparation array jobs (sourced by crawl.sh and shard.sh, which set COMMAND): one part of
# the job's shards per array task, python -m data_tools reading SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
# Arguments are the command's, forwarded as they are.
set -euo pipefail
cd "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}"
PYTHON=${PYTHON:-.venv/bin/python}
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
echo "$(date +%T) job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} task ${SLURM_ARRAY_TASK_ID:-none} of" \
     "${SLURM_ARRAY_TASK_COUNT:-1} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname), $CPUS CPUs:" \
     "data_tools $COMMAND $*"

# Slurm sends USR1 to this script ahead of the time limit: the part stops at once (its shard-writing processes
# die with it; a shard being written is only a hidden .partial file, and a visible shard whose completion marker
# is missing counts as not written) and the task is requeued; the rerun skips the shards already finished.
requeue() {
  echo "$(date +%T) USR1: stopping this part, requeueing task $SLURM_JOB_ID"
  kill -TERM "$STEP" 2>/dev/null || true
  wait "$STEP" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

# --workers first: one given among the arguments wins
"$PYTHON" -m data_tools "$COMMAND" --workers "$CPUS" "$@" &
STEP=$!
wait "$STEP"
