#!/bin/bash
# shard-folder or shard-emoset as a Slurm job array: each array task writes one part of the job's shards; the last
# part to finish writes sizes.json and info.json. The first argument is the command, the rest are its own.
#
#   sbatch --array=0-7 slurm/shard.sh shard-folder FI path/to/FI --out shards/FI
#   sbatch --array=0-31 slurm/shard.sh shard-emoset path/to/EmoSet-118K --out shards/EmoSet
#SBATCH --job-name=uniemox-shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
case "${1:-}" in
  shard-folder|shard-emoset) COMMAND=$1; shift ;;
  *) echo "slurm/shard.sh: the first argument must be shard-folder or shard-emoset, not '${1:-}'" >&2; exit 2 ;;
esac
source "${UNIEMOX_REPO:-$SLURM_SUBMIT_DIR}/slurm/data_job.sh" "$@"
