#!/bin/bash
# Temporal valence/arousal training on a Slurm cluster (the launch, resources and requeue of finetune.sh, from the
# same slurm/torchrun_job.sh); arguments go to finetune/temporal_main.py.
#
#   sbatch --gpus-per-node=4 slurm/temporal.sh --dataset afew --data shards/afew --checkpoint runs/vit_l16 \
#       temporal.encoder_mode=lora run.output_dir=runs/afew_lora
#SBATCH --job-name=uniemox-temporal
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
ENTRY=finetune/temporal_main.py
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/torchrun_job.sh" "$@"
