"""One resolver for the distributed environment (torchrun, Slurm, single process) and the collectives we use."""
import datetime
import gc
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")


class DistEnvError(RuntimeError):
    """The process environment describes a distributed job incompletely or inconsistently."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str, launcher: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"{launcher} environment: {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise DistEnvError(f"Slurm environment: cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _check_rank(rank: int, local_rank: int, world_size: int, launcher: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistEnvError(f"{launcher} environment: rank {rank} / local rank {local_rank} does not fit "
                           f"world size {world_size}")


def resolve_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Who am I? torchrun's variables win (torchrun inside a Slurm allocation), then an srun step's, else one
    process (also a program run directly in an sbatch script).

    A launcher whose variables are only partly set is an error naming the missing ones, never a silent fallback
    to a single process (which would leave the other ranks waiting at the rendezvous).
    """
    environ = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in environ]
    # MASTER_ADDR/PORT alone are often exported by job scripts for srun; rank variables mean torchrun.
    if any(v in environ for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        missing = [v for v in TORCHRUN_VARS if v not in environ]
        if missing:
            raise DistEnvError(f"half-set torchrun environment: {', '.join(present)} set but "
                               f"{', '.join(missing)} missing (launch with torchrun, or unset them)")
        rank, local_rank, world = (_int_var(environ, v, "torchrun") for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        _check_rank(rank, local_rank, world, "torchrun")
        return DistEnv(rank, local_rank, world, environ["MASTER_ADDR"],
                       _int_var(environ, "MASTER_PORT", "torchrun"), "torchrun")
    # SLURM_PROCID alone is also set in the batch script itself (one process, no srun step): ranks come from steps
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        missing = [v for v in SLURM_VARS if v not in environ]
        if missing:
            raise DistEnvError(f"half-set Slurm environment: SLURM_PROCID set but {', '.join(missing)} missing "
                               f"(run the trainer under srun, or unset SLURM_PROCID)")
        rank, local_rank, world = (_int_var(environ, v, "Slurm") for v in ("SLURM_PROCID", "SLURM_LOCALID",
                                                                           "SLURM_NTASKS"))
        _check_rank(rank, local_rank, world, "Slurm")
        addr = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" in environ:
            port = _int_var(environ, "MASTER_PORT", "Slurm")
        else:  # same on every task of the job, different between jobs sharing a node
            port = 20000 + int(environ.get("SLURM_JOB_ID", "0") or 0) % 20000
        return DistEnv(rank, local_rank, world, addr, port, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", 29500, "single")


def default_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: Optional[DistEnv] = None, timeout_s: int = 1800, always: bool = False,
                     libraries: Sequence[str] = (), device: Optional[torch.device] = None) -> DistEnv:
    """Start the process group (nccl on GPU, gloo on CPU) for the resolved environment. One process gets none
    unless `always` (DeepSpeed wants a group even then: a world of one on a free loopback port). `libraries`: the
    modules the job will use that, imported for the first time while a group exists, keep it alive past shutdown
    (as torch._dynamo does, below): "deepspeed" for DeepSpeed runs. They are imported before the group starts.
    `device` (default: this rank's GPU if any) picks the backend; a CUDA device is bound to the group (device_id),
    so NCCL connects eagerly to the right GPU."""
    env = env or resolve_env()
    if dist.is_initialized() or (env.world_size == 1 and not always):
        return env
    if env.world_size == 1 and env.launcher == "single":
        env = DistEnv(0, 0, 1, "127.0.0.1", free_port(), "single")
    device = device or default_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch._dynamo, imported for the first time while a process group exists (torchvision and timm import it,
    # e.g. lazily in a loader or a FLOP counter), keeps a reference to that group that destroy_process_group does
    # not drop: the group and its gloo threads then outlive shutdown() and are torn down during interpreter
    # finalization, where a gloo thread that releases a finished collective's Python-owned tensors aborts the
    # process ("terminate called without an active exception"). Imported first, it holds no group.
    import torch._dynamo  # noqa: F401
    for library in libraries:
        importlib.import_module(library)
    os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                      LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.world_size))
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    if backend == "gloo":
        keep_gloo_thread_states()
    log.info("process group up: %s, world size %d, launcher %s", backend, env.world_size, env.launcher)
    return env


def keep_gloo_thread_states(group: Optional[Any] = None, rounds_of: int = 32) -> int:
    """Give each gloo worker thread of `group` (default: the default group) a Python thread state it keeps (a
    collective over the group); returns how many threads got one.

    Why: a gloo thread that destroys a finished collective's work drops Python objects, so it takes the GIL, and
    without a thread state of its own it creates one each time. On Python < 3.12 creating a thread state takes the
    runtime's thread-list lock without holding the GIL; a loader worker forked at that instant inherits the lock
    held and hangs inside fork before running a line (seen: evaluation loaders hanging until the loader timeout).
    A thread that keeps its state never takes that lock again. Collectives are issued in rounds of `rounds_of`,
    each with a callback that runs in the gloo thread completing it, until a round finds no new thread on any
    rank."""
    import ctypes
    import threading
    main, pinned = threading.get_ident(), set()

    def pin(_future):
        ident = threading.get_ident()
        if ident != main and ident not in pinned:
            ctypes.pythonapi.PyGILState_Ensure()  # never released: this thread's state now outlives the callback
            pinned.add(ident)
        return 0

    while True:
        before = len(pinned)
        for _ in range(rounds_of):
            work = dist.all_reduce(torch.zeros(1), group=group, async_op=True)
            work.get_future().then(pin)
            work.wait()
        found = torch.tensor([float(len(pinned) - before)])
        dist.all_reduce(found, group=group)
        if found.item() == 0:
            return len(pinned)


def keep_all_gloo_thread_states() -> None:
    """keep_gloo_thread_states for every gloo group this rank belongs to, in the order of their names (the same
    on every rank): for the groups a library makes for itself (DeepSpeed does). A collective."""
    from torch.distributed import distributed_c10d as c10d
    groups = sorted(c10d._world.pg_names.items(), key=lambda item: item[1])  # (group, name)
    for group, _ in groups:
        if dist.get_backend(group) == "gloo" and dist.get_rank(group) >= 0:
            keep_gloo_thread_states(group)


_releases: List[Callable[[], None]] = []


def release_at_shutdown(release: Callable[[], None]) -> None:
    """Have shutdown() call `release` (local, no collective) before it destroys the groups: for objects that hold a
    group and outlive the job that made them (a DeepSpeed engine, kept alive by its own gradient hooks)."""
    _releases.append(release)


def _run_release(release: Callable[[], None]) -> None:
    try:
        release()
    except Exception:  # the groups must still go down, and a job's own error must not be replaced by this one
        log.exception("release at shutdown failed: %r", release)


def shutdown(wait_for_peers: bool = False) -> None:
    """Release what release_at_shutdown registered, then destroy every process group (a no-op without one) and
    collect the objects that held them, so no gloo thread lives on into interpreter finalization, where it can
    abort the process ("terminate called without an active exception"). wait_for_peers, after a run that ended
    normally on every rank: meet first, so no rank tears gloo down while a peer still talks to it. Never after an
    error: a failed peer would not come."""
    while _releases:
        _run_release(_releases.pop())  # in a frame of its own: a local here would keep the released object alive
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()  # torch's, and DeepSpeed drops its own references to the groups
        else:
            dist.destroy_process_group()
        gc.collect()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks, in place; the identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor).div_(get_world_size())


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor`, stacked in rank order: (world size, *shape), on the tensor's device."""
    if not dist.is_initialized():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (decisions such as 'resume from this checkpoint')."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def param_checksums(module: torch.nn.Module) -> list:
    """Every rank's SHA-256 of its parameters and buffers (a collective): equal entries mean ranks in sync."""
    import hashlib
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return all_gather_object(h.hexdigest())
