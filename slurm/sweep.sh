#!/bin/bash
# A Ray Tune sweep on a Slurm allocation: a Ray head on the first node, a Ray worker on every other node, then
# `python -m finetune.sweep --address HEAD --wait-nodes N` places the trials (resources_per_trial in the sweep
# config) once all N nodes have joined.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm/sweep.sh --config configs/sweep/benchmarks.yaml [--datasets FI HECO]
#
# The cluster is private to the job: Ray's token authentication is on, with a token made for this job and handed
# to the head, the workers and the driver in the environment (RAY_AUTH_TOKEN, never written to disk); usage-stats
# reporting is off. Each Ray process is given its node's address (Ray would otherwise probe the internet for it).
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
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1  # Linux's default; `make` sets 0 to pin a local Ray to 127.0.0.1
RAY_AUTH_TOKEN=$("$PYTHON" -c "import secrets; print(secrets.token_hex(32))")
export RAY_AUTH_TOKEN
echo "$(date +%T) Ray head on $HEAD ($HEAD_IP:$PORT), $SLURM_NNODES node(s)"
srun --nodes=1 --ntasks=1 -w "$HEAD" "$RAY" start --head --node-ip-address="$HEAD_IP" --port="$PORT" \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$GPUS" --include-dashboard=false --disable-usage-stats --block &
if [ "$SLURM_NNODES" -gt 1 ]; then
  # each worker retries until the head answers (ray start fails fast when it cannot reach it)
  srun --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --exclude="$HEAD" bash -c \
    'for i in $(seq 60); do "$0" start --address="$1" --node-ip-address="$(hostname --ip-address | cut -d" " -f1)" \
       --num-cpus="$2" --num-gpus="$3" --disable-usage-stats --block && exit 0; sleep 2; done; exit 1' \
    "$RAY" "$HEAD_IP:$PORT" "$SLURM_CPUS_PER_TASK" "$GPUS" &
fi
"$PYTHON" -m finetune.sweep --address "$HEAD_IP:$PORT" --wait-nodes "$SLURM_NNODES" "$@"
