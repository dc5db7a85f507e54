#!/bin/bash
# Fine-tuning on a Slurm cluster (same launch, resources and requeue as pretrain.sh); arguments go to
# finetune/main.py.
#
#   sbatch --gpus-per-node=4 slurm/finetune.sh --config configs/finetune/vit_b16.yaml --dataset FI \
#       --data shards/FI --checkpoint runs/vit_l16 run.output_dir=runs/ft_FI
#SBATCH --job-name=uniemox-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
ENTRY=finetune/main.py
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/torchrun_job.sh" "$@"
