#!/bin/bash
# Pretraining on a Slurm cluster: one torchrun per node over all its GPUs, requeued at preemption or time limit.
#
#   sbatch --nodes=2 --gpus-per-node=8 slurm/pretrain.sh configs/pretrain/vit_l16.yaml \
#       run.output_dir=runs/vit_l16 teacher.checkpoint=/models/clip_b16.bin data.train=[shards/web/{00000..09999}.tar]
#
# Edit the #SBATCH lines for your cluster (or override them on the sbatch command line). Processes per node:
# NPROC_PER_NODE, else the GPUs Slurm gave the node, else 1. The run always resumes from its `latest` checkpoint,
# so a requeued job simply continues.
#SBATCH --job-name=uniemox-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
ENTRY=${ENTRY:-pretrain/main.py}
CONFIG=${1:?usage: sbatch slurm/pretrain.sh CONFIG [key=value ...]}
shift
cd "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}"
PYTHON=${PYTHON:-.venv/bin/python}
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "$(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC" \
     "processes, rendezvous $HEAD:$PORT, $ENTRY --config $CONFIG $*"

# Slurm sends USR1 to this script ahead of the time limit: every process of the running step gets SIGTERM (the
# trainers finish their step, write a checkpoint and exit; torchrun gives them 30 s), then the job is requeued.
# (Killing srun instead would make Slurm cancel the step and SIGKILL the trainers.)
requeue() {
  echo "$(date +%T) USR1: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  scancel --signal=TERM "$SLURM_JOB_ID" || true
  wait "$STEP" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap requeue USR1

srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC" \
    --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" \
    "$ENTRY" --config "$CONFIG" "$@" &
STEP=$!
wait "$STEP"
