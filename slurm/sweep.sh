#!/bin/bash
# A Ray Tune sweep on a Slurm allocation: a Ray head on the first node, a Ray worker on every other node, then
# `python -m finetune.sweep --address HEAD` places the trials (resources_per_trial in the sweep config).
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/sweep.sh --config configs/sweep/benchmarks.yaml [--datasets FI HECO]
#SBATCH --job-name=uniemox-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}"
PYTHON=${PYTHON:-.venv/bin/python}
RAY=$(dirname "$PYTHON")/ray
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
PORT=${RAY_PORT:-$((30000 + SLURM_JOB_ID % 20000))}
GPUS=${SLURM_GPUS_ON_NODE:-0}
echo "$(date +%T) Ray head on $HEAD ($HEAD_IP:$PORT), $SLURM_NNODES node(s)"
srun --nodes=1 --ntasks=1 -w "$HEAD" "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$GPUS" --include-dashboard=false --block &
sleep 10
if [ "$SLURM_NNODES" -gt 1 ]; then
  srun --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --exclude="$HEAD" "$RAY" start \
    --address="$HEAD_IP:$PORT" --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$GPUS" --block &
  sleep 10
fi
"$PYTHON" -m finetune.sweep --address "$HEAD_IP:$PORT" "$@"
