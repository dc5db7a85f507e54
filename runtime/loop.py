"""What both training loops share: run-directory set-up, resume, save, and one guarded optimizer step."""
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from runtime import distributed
from runtime.checkpoint import CheckpointStore, decide_resume
from runtime.config import ConfigError, config_to_dict, parse_cli, write_run_metadata
from runtime.guard import StepGuard, StopRequest
from runtime.launcher_watch import exit_with_launcher
from runtime.logs import setup_logging
from runtime.precision import autocast
from runtime.seeding import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

# forward(model, batch) -> (total loss, {term: value}, anything else the caller wants back)
Forward = Callable[[torch.nn.Module, Dict[str, Any]], Tuple[torch.Tensor, Dict[str, torch.Tensor], Any]]


def run_as_script(main: Callable[[], int], what: str) -> None:
    """A trainer's `__main__`: exit with main()'s status; on an unexpected error, log it and leave at once
    (Python's normal exit would wait on data-loader workers that no one told to stop)."""
    try:
        status = main()
    except BaseException:
        logging.getLogger(what).exception("%s failed", what)
        logging.shutdown()
        os._exit(1)
    raise SystemExit(status)


def run_job(schema: type, argv: Optional[Sequence[str]], description: str, log: logging.Logger,
            job: Callable[[Any, StopRequest], int], expected: Tuple[type, ...] = (),
            traced: Tuple[type, ...] = ()) -> int:
    """A trainer's main(): its config from the command line (a config error exits 2), logging per rank, the
    launcher watch, the SIGTERM/SIGUSR1 handlers (a stop request at the next step), then job(cfg, stop) -> exit
    status; the job starts its process group itself. Errors in `expected` are bad input, logged in one line, and
    those in `traced` with their traceback; both exit 3. The process group is shut down on every path."""
    try:
        cfg, _ = parse_cli(schema, argv, description=description)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = distributed.resolve_env()
    setup_logging(env.rank)
    exit_with_launcher(env.launcher)
    stop = StopRequest().install()
    try:
        status = job(cfg, stop)
        distributed.shutdown(wait_for_peers=True)
        return status
    except expected + traced as e:
        if isinstance(e, expected):
            log.error("%s: %s", type(e).__name__, e)
        else:
            log.exception("bad input")
        return 3
    finally:
        distributed.shutdown()


def prepare_run(run_dir: Path, store: CheckpointStore, cfg: Any, env: distributed.DistEnv, **meta: Any) -> None:
    """Rank 0 removes half-written checkpoints and records config and provenance; everyone waits for it."""
    if env.is_main:
        store.clean_partials()
        write_run_metadata(run_dir, cfg, world_size=env.world_size, launcher=env.launcher,
                           restart_count=os.environ.get("SLURM_RESTART_COUNT", "0"), **meta)
    distributed.barrier()


def resume_run(resume: str, store: CheckpointStore, strategy, env: distributed.DistEnv) -> Optional[Dict[str, Any]]:
    """Load what rank 0 decided to resume from into the strategy; restore this rank's RNG (its CUDA generator onto
    the strategy's device); return the rest."""
    path = decide_resume(resume, store)
    if path is None:
        return None
    state = strategy.load_checkpoint(path)
    rng = state.get("rng") or []
    if len(rng) == env.world_size:
        restore_rng_state(rng[env.rank], strategy.device)
    log.info("resumed from %s at step %d", path, state["step"])
    return {**state, "path": str(path)}


def save_run(store: CheckpointStore, strategy, step: int, cfg: Any, extra: Dict[str, Any]) -> None:
    """A checkpoint with every rank's RNG state and the resolved config (a collective: all ranks call it)."""
    rng = distributed.all_gather_object(capture_rng_state(strategy.device))
    strategy.save_checkpoint(store, step, {"step": step, "rng": rng, "config": config_to_dict(cfg), "scaler": None,
                                           **extra})


def to_device(batch: Dict[str, Any], device: torch.device, float_dtype: Optional[torch.dtype] = None):
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def inject_faults(debug, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The debug.* hooks: a NaN loss or a crash on one rank at a given step."""
    if step in debug.nan_steps and rank == debug.nan_rank:
        loss = loss * float("nan")
    if debug.crash_step == step and rank == debug.crash_rank:
        raise RuntimeError(f"debug.crash_step: rank {rank} crashes at step {step}")
    return loss


@dataclass
class StepResult:
    loss: Optional[torch.Tensor]
    terms: Dict[str, torch.Tensor]
    skipped: bool
    stop: bool
    grad_norm: torch.Tensor
    data_time: float
    corrupt: int
    last_batch: Dict[str, Any] = field(default_factory=dict)
    output: Any = None


def optimizer_step(strategy, batches: Iterator[Dict[str, Any]], forward: Forward, guard: StepGuard, step: int,
                   accum_steps: int, precision: str, device: torch.device, input_dtype: Optional[torch.dtype] = None,
                   on_loss: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                   on_first_batch: Optional[Callable[[Dict[str, Any]], None]] = None,
                   prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> StepResult:
    """Micro-batches through forward/backward (DDP no_sync between boundaries), the guard's verdict before each
    backward (skip on a non-finite loss anywhere, stop on a signal anywhere), then the optimizer step. `prepare`
    runs on each micro-batch once it is on the device (e.g. uint8 images -> normalised floats)."""
    data_time, corrupt, skipped, stop = 0.0, 0, False, False
    loss, terms, output, batch = None, {}, None, {}
    for micro in range(accum_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        data_time += time.perf_counter() - t0
        corrupt += int(batch.pop("corrupt", 0))
        batch = to_device(batch, device, input_dtype)
        if prepare is not None:
            batch = prepare(batch)
        if on_first_batch is not None:
            on_first_batch(batch)
        with strategy.accumulate(micro == accum_steps - 1), autocast(precision, device):
            loss, terms, output = forward(strategy.model, batch)
        if on_loss is not None:
            loss = on_loss(loss, step)
        skip, stop_now = guard.check(loss, step)
        stop = stop or stop_now
        if skip:
            strategy.skip()
            skipped = True
            break
        strategy.backward(loss)
    grad_norm = torch.tensor(float("nan")) if skipped else strategy.step()
    return StepResult(loss, terms, skipped, stop, grad_norm, data_time, corrupt, batch, output)
