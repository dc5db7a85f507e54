"""What a rank runs on: its device (a GPU the config or the launcher asks for and torch cannot see is an error at
start, never a silent CPU run), the CUDA settings it runs with, and the loader workers its CPUs can feed."""
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from runtime.distributed import DistEnv

log = logging.getLogger(__name__)

# Slurm's variables for the GPUs of a job (set with --gpus, --gpus-per-node, --gpus-per-task or --gres=gpu:N)
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS", "SLURM_JOB_GPUS",
                  "SLURM_STEP_GPUS")


class DeviceError(RuntimeError):
    """The run expects a GPU and torch sees none (or a GPU lacks what the precision needs)."""


def gpus_requested(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The first Slurm GPU variable with a non-zero value, as 'NAME=value', or None."""
    environ = os.environ if environ is None else environ
    for name in SLURM_GPU_VARS:
        value = environ.get(name, "").strip()
        if value and value not in ("0", "(null)", "none"):
            return f"{name}={value}"
    return None


def _why_no_cuda(environ: Mapping[str, str]) -> str:
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    return (f"torch {torch.__version__} ({build}) sees no CUDA device"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))


def resolve_device(env: DistEnv, requested: str = "auto", precision: str = "auto",
                   environ: Optional[Mapping[str, str]] = None) -> torch.device:
    """run.device: 'cuda' needs a GPU; 'cpu' is the CPU even where GPUs exist; 'auto' is this rank's GPU (local rank
    modulo the visible ones) when there is one, and the CPU only if nothing asked for a GPU: GPUs requested from
    Slurm, or a bf16/fp16 precision, with no GPU in sight are an error naming what asked (run.device=cpu runs
    bf16 on the CPU on purpose)."""
    environ = os.environ if environ is None else environ
    if requested not in ("auto", "cuda", "cpu"):
        raise DeviceError(f"run.device must be auto, cuda or cpu, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise DeviceError(f"run.device=cuda, but {_why_no_cuda(environ)}")
    slurm = gpus_requested(environ)
    if slurm:
        raise DeviceError(f"Slurm gave this job GPUs ({slurm}), but {_why_no_cuda(environ)}: check the node's driver "
                          f"and the CUDA build of torch, or set run.device=cpu to train on the CPU anyway")
    if precision in ("bf16", "fp16"):
        raise DeviceError(f"train.precision={precision} expects a GPU, but {_why_no_cuda(environ)}: set "
                          f"run.device=cpu to run {precision} on the CPU on purpose, or precision auto/fp32")
    return torch.device("cpu")


def configure_cuda(device: torch.device) -> None:
    """What a CUDA run expects: TF32 matmuls and convolutions (fp32 parts of a step), cuDNN's autotuner."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def cpus_per_rank(environ: Optional[Mapping[str, str]] = None) -> Tuple[int, str]:
    """(CPUs this rank may use, where the figure comes from): the Slurm task's CPUs (SLURM_CPUS_PER_TASK: the one
    torchrun per node gets the node's, a submitit task its own), else the CPUs this process may run on
    (os.sched_getaffinity); shared by the ranks torchrun started beside it (LOCAL_WORLD_SIZE)."""
    environ = os.environ if environ is None else environ
    slurm = environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        cpus, source = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        source = f"{cpus} CPUs in this process's affinity"
    local = environ.get("LOCAL_WORLD_SIZE", "1").strip()
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, cpus // ranks), f"{source} / {ranks} local rank(s)"


def loader_workers(requested: Union[int, str], environ: Optional[Mapping[str, str]] = None) -> int:
    """data.num_workers: a number as given, or 'auto': this rank's CPUs less two (the training process and its
    pin-memory thread), at least one."""
    if requested != "auto":
        return int(requested)
    cpus, source = cpus_per_rank(environ)
    workers = max(1, cpus - 2)
    log.info("data.num_workers=auto: %d loader workers per rank (%d CPUs per rank: %s)", workers, cpus, source)
    return workers


def with_loader_workers(cfg):
    """A copy of a job's config with data.num_workers resolved ('auto' -> a number; the run records what it used)."""
    import dataclasses
    data = getattr(cfg, "data", None)
    if data is None or getattr(data, "num_workers", None) != "auto":
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(data, num_workers=loader_workers("auto")))


def compile_blocks(*block_lists) -> int:
    """train.compile: torch.compile each transformer block in place (per block, as torchtitan does: small graphs,
    quick to compile, and the code between blocks stays eager); returns how many were compiled."""
    count = 0
    for blocks in block_lists:
        for block in blocks:
            block.compile()
            count += 1
    return count


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The batch's tensors on `device` (asynchronous from the loader's pinned memory); dtypes stay as they are:
    the job's `prepare` casts what the model reads (targets such as cached teacher embeddings stay fp32)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
