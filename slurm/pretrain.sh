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
CONFIG=${1:?usage: sbatch slurm/pretrain.sh CONFIG [key=value ...]}
shift
ENTRY=pretrain/main.py
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/torchrun_job.sh" --config "$CONFIG" "$@"
