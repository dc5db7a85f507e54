#!/bin/bash
# The teacher cache on a Slurm cluster: one torchrun per node over its GPUs (the launch of pretrain.sh), rank r of
# n embedding shards r, r+n, ...; requeued at the time limit, the rerun skipping finished shards. Arguments go to
# `python -m pretrain.cache_teacher`.
#
#   sbatch --nodes=4 slurm/cache_teacher.sh --shards 'shards/web/{00000..09999}.tar' \
#       --teacher-config configs/pretrain/vit_b16.yaml --teacher-checkpoint path/to/clip_vit_b16.bin \
#       --out shards/web_teacher
#SBATCH --job-name=uniemox-cache-teacher
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
ENTRY=pretrain/cache_teacher.py
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/torchrun_job.sh" "$@"
