"""Submit pretraining or fine-tuning with submitit: a Slurm job where `srun` exists (or --local processes).

    python slurm/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --timeout-min 2880 -- \
        --config configs/pretrain/vit_l16.yaml run.output_dir=runs/vit_l16 ...

One submitit task per GPU (or per --tasks-per-node); each task is a rank with --cpus-per-task CPUs (10: eight loader
workers, the rank and its pin-memory thread) and the job holds all of each node's memory. At a time limit or
preemption submitit
calls `checkpoint()`, which only resubmits the same job: the trainer always resumes from the run's `latest`
checkpoint (written every run.ckpt_every steps), so nothing depends on a file the hook would have to write.
"""
import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import submitit  # noqa: E402

from runtime.cli import HelpFormatter  # noqa: E402

ENTRIES = {"pretrain": "pretrain.main", "finetune": "finetune.main"}


class TrainingJob(submitit.helpers.Checkpointable):
    """The callable submitit runs in every task: sets the rank variables from submitit's job environment and calls
    the trainer's main() with the given arguments."""

    def __init__(self, entry: str, argv: List[str]):
        self.entry, self.argv = entry, list(argv)

    def __call__(self) -> int:
        job = submitit.JobEnvironment()
        digits = re.sub(r"\D", "", str(job.job_id)) or "0"
        os.environ.update(RANK=str(job.global_rank), LOCAL_RANK=str(job.local_rank), WORLD_SIZE=str(job.num_tasks),
                          MASTER_ADDR=job.hostnames[0], MASTER_PORT=str(20000 + int(digits[-9:]) % 20000))
        os.chdir(REPO)
        code = importlib.import_module(ENTRIES[self.entry]).main(self.argv)
        if code not in (0, None):
            raise RuntimeError(f"{self.entry} exited with status {code} on rank {job.global_rank}")
        return 0

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainingJob(self.entry, self.argv))  # resubmit; resume from latest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    parser.add_argument("--folder", default="runs/submitit/%j", help="submitit's logs and pickles")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default 8 on Slurm, 0 with --local; 0 for "
                                                                       "CPU nodes")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs, or 1)")
    parser.add_argument("--cpus-per-task", type=int, default=10,
                        help="CPUs per rank: its loader workers (data.num_workers: auto uses them all but two) plus "
                             "the rank and its pin-memory thread")
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: all of it)")
    parser.add_argument("--timeout-min", type=int, default=60)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--job-name", default="uniemox")
    parser.add_argument("--local", action="store_true", help="run as local processes (a laptop), not Slurm")
    parser.add_argument("--wait", action="store_true", help="wait for the job and fail if it fails")
    parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then the trainer's --config and overrides")
    args = parser.parse_args(argv)
    trainer_args = args.trainer_args[1:] if args.trainer_args[:1] == ["--"] else args.trainer_args
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (0 if args.local else 8)
    tasks = args.tasks_per_node or max(1, gpus)
    executor = submitit.AutoExecutor(folder=args.folder, cluster="local" if args.local else None)
    params = dict(nodes=args.nodes, tasks_per_node=tasks, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout_min, name=args.job_name)
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    elif not args.local:
        params["slurm_mem"] = "0"  # all of the node's memory
    if args.partition and not args.local:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    job = executor.submit(TrainingJob(args.entry, trainer_args))
    print(f"submitted job {job.job_id} ({executor.cluster}); logs in {Path(args.folder.replace('%j', str(job.job_id)))}")
    if args.wait:
        job.results()  # raises if any task failed
        print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
