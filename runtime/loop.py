"""What both training loops share: run-directory set-up, resume, save, and one guarded optimizer step."""
import argparse
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
from runtime.cli import Shortcuts, name_flags, parse_cli
from runtime.config import ConfigError, config_to_dict, write_run_metadata
from runtime.guard import StepGuard, StopRequest
from runtime.launcher_watch import exit_with_launcher
from runtime.logs import setup_logging
from runtime.precision import autocast
from runtime.seeding import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

# forward(model, batch) -> (total loss, {term: value}, anything else the caller wants back)
Forward = Callable[[torch.nn.Module, Dict[str, Any]], Tuple[torch.Tensor, Dict[str, torch.Tensor], Any]]


def run_as_script(main: Callable[[], int], what: str) -> None:
    """A trainer's `__main__`: exit with main()'s status; a second Ctrl-C exits 130 in one line; on an unexpected
    error, log it and leave at once (Python's normal exit would wait on data-loader workers that no one told to
    stop)."""
    try:
        status = main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        logging.getLogger(what).error("%s interrupted by a second Ctrl-C: stopped without a checkpoint (the last "
                                      "complete one stays the resume point)", what)
        logging.shutdown()
        os._exit(StopRequest.EXIT_INTERRUPTED)
    except BaseException:
        logging.getLogger(what).exception("%s failed", what)
        logging.shutdown()
        os._exit(1)
    raise SystemExit(status)


def run_job(schema: type, argv: Optional[Sequence[str]], description: str, log: logging.Logger,
            job: Callable[[Any, StopRequest], int], expected: Tuple[type, ...] = (),
            traced: Tuple[type, ...] = (), parser: Optional[argparse.ArgumentParser] = None,
            shortcuts: Optional[Shortcuts] = None) -> int:
    """A trainer's main(): its config from the command line (`--help` exits 0 and a usage error 2, as argparse's
    do; a config error exits 2), logging per rank, the launcher watch, the SIGTERM/SIGUSR1/SIGINT handlers (a stop
    request at the next sync point), then job(cfg, stop) -> exit status; the job starts its process group itself.
    `parser` may declare the job's own flags, and `shortcuts(args)` turns them into overrides. Errors in
    `expected` are bad input, logged in one line, and those in `traced` with their traceback; both exit 3. The
    process group is shut down on every path."""
    try:
        cfg, _ = parse_cli(schema, argv, description=description, parser=parser, shortcuts=shortcuts)
    except SystemExit as e:  # argparse has printed the help or the usage error
        return e.code if isinstance(e.code, int) else 2
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
        return stop.exit_status(status)
    except expected + traced as e:
        if isinstance(e, expected):
            log.error("%s: %s", type(e).__name__, name_flags(str(e), getattr(shortcuts, "typed_as", {})))
        else:
            log.exception("bad input")
        return 3
    finally:
        stop.uninstall()
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
    strategy.save_checkpoint(store, step, {"step": step, "rng": rng, "config": config_to_dict(cfg), **extra})


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The batch's tensors on `device` (asynchronous from the loader's pinned memory); dtypes stay as they are:
    the job's `prepare` casts what the model reads (targets such as cached teacher embeddings stay fp32)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def inject_faults(debug, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """The debug.* hooks: a NaN loss or a crash on one rank at a given step."""
    if step in debug.nan_steps and rank == debug.nan_rank:
        loss = loss * float("nan")
    if debug.crash_step == step and rank == debug.crash_rank:
        raise RuntimeError(f"debug.crash_step: rank {rank} crashes at step {step}")
    return loss


@dataclass
class StepResult:
    loss: torch.Tensor                  # the last micro-batch's loss (device)
    terms: Dict[str, torch.Tensor]
    skipped: torch.Tensor               # 1.0 if the update was skipped (device)
    grad_norm: Any                      # a device tensor (DDP), or the number DeepSpeed reports
    data_time: float
    corrupt: int
    last_batch: Dict[str, Any] = field(default_factory=dict)
    output: Any = None


def optimizer_step(strategy, batches: Iterator[Dict[str, Any]], forward: Forward, guard: StepGuard, step: int,
                   accum_steps: int, precision: str, device: torch.device,
                   on_loss: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
                   on_first_batch: Optional[Callable[[Dict[str, Any]], None]] = None,
                   prepare: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None) -> StepResult:
    """Micro-batches through forward and backward (DDP no_sync between boundaries), then the optimizer step,
    skipped on the device on every rank if any rank's loss was not finite (guard.nonfinite_anywhere). Nothing here
    waits for the device: the decisions that need the host are the guard's, at sync points. `prepare` runs on each
    micro-batch once it is on the device (e.g. uint8 images -> normalised floats)."""
    data_time, corrupt = 0.0, 0
    loss, terms, output, batch, nonfinite = None, {}, None, {}, None
    for micro in range(accum_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        data_time += time.perf_counter() - t0
        corrupt += int(batch.pop("corrupt", 0))
        batch = to_device(batch, device)
        if prepare is not None:
            batch = prepare(batch)
        if on_first_batch is not None and micro == 0:
            on_first_batch(batch)
        with strategy.accumulate(micro == accum_steps - 1), autocast(precision, device):
            loss, terms, output = forward(strategy.model, batch)
        if on_loss is not None:
            loss = on_loss(loss, step)
        bad = ~torch.isfinite(loss.detach())
        nonfinite = bad if nonfinite is None else nonfinite | bad
        strategy.backward(loss)  # a non-finite loss still goes back: its update is skipped below, on every rank
    grad_norm, skipped = strategy.step(guard.nonfinite_anywhere(nonfinite))
    guard.record(skipped, nonfinite)
    return StepResult(loss, terms, skipped, grad_norm, data_time, corrupt, batch, output)
