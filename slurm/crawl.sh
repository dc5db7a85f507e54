#!/bin/bash
# A crawl as a Slurm job array: each array task downloads one part of the URL list's shards (the same plan in every
# task, so N parts write exactly the shards of one crawl); the last part to finish writes sizes.json and info.json.
# Arguments go to `python -m data_tools crawl`.
#
#   sbatch --array=0-15 slurm/crawl.sh urls.parquet --out shards/web --threads 32
#   python -m data_tools merge-parts shards/web    # only if a failed task was rerun by hand after the others
#SBATCH --job-name=uniemox-crawl
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
COMMAND=crawl
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/data_job.sh" "$@"
