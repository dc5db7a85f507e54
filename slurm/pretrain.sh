#!/bin/bash
# Pretraining on a Slurm cluster: one torchrun per node over all its GPUs, requeued at preemption or time limit.
#
#   sbatch --nodes=2 slurm/pretrain.sh configs/pretrain/vit_l16.yaml run.output_dir=runs/vit_l16 \
#       teacher.checkpoint=path/to/clip_b16.bin "data.train=[shards/web/{00000..09999}.tar]" \
#       teacher.cache=shards/web_teacher
#
# Each node is the job's alone (--exclusive, --mem=0): its CPUs feed the loader workers (data.num_workers: auto
# gives each rank its share less two) and its memory their buffers. GPUs: 8 per node unless overridden
# (sbatch --gpus-per-node=4; --gpus-per-node=0 for CPU nodes, with NPROC_PER_NODE=N ranks). Processes per node:
# NPROC_PER_NODE, else the GPUs Slurm gave the node, else 1. A job that asked for GPUs and finds none fails at
# start. The run always resumes from its `latest` checkpoint, so a requeued job simply continues.
#SBATCH --job-name=uniemox-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
CONFIG=${1:?usage: sbatch slurm/pretrain.sh CONFIG [key=value ...]}
shift
ENTRY=pretrain/main.py
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/torchrun_job.sh" --config "$CONFIG" "$@"
