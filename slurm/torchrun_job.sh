# The body of the sbatch scripts (sourced by pretrain.sh and finetune.sh, which set ENTRY): one torchrun per node
# over all its GPUs, requeued at the time limit. Arguments are the trainer's, forwarded as they are.
set -euo pipefail
cd "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}"
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# the one task per node gets every CPU the job holds there (since Slurm 22.05 srun no longer inherits sbatch's
# --cpus-per-task: without this the step, and so all of its ranks and loader workers, would get one CPU)
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "$(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC" \
     "processes, rendezvous $HEAD:$PORT, $ENTRY $*"
echo "$(date +%T) per node: $CPUS CPUs, GPUs ${SLURM_GPUS_ON_NODE:-none} (${SLURM_JOB_GPUS:-no GPU ids}), memory" \
     "${SLURM_MEM_PER_NODE:-all} MB"

# Slurm sends USR1 to this script ahead of the time limit: every process of the running step gets SIGTERM (the
# trainers stop at their next sync point, a log step, write a checkpoint and exit; torchrun gives them 30 s, so
# keep run.log_every steps plus a checkpoint write under that), then the job is requeued.
# (Killing srun instead would make Slurm cancel the step and SIGKILL the trainers.)
requeue() {
  echo "$(date +%T) USR1: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  scancel --signal=TERM "$SLURM_JOB_ID" || true
  wait "$STEP" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$CPUS" \
  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \
    "$ENTRY" "$@" &
STEP=$!
wait "$STEP"
