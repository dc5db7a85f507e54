"""The training skeleton every trainer runs: resume, guarded optimizer steps, checkpoints holding one TrainState,
metrics to TensorBoard and metrics.jsonl, and a summary of the whole run's log windows."""
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from runtime import distributed
from runtime.checkpoint import CheckpointStore
from runtime.config import DebugConfig, config_to_yaml
from runtime.device import configure_cuda, resolve_device, with_loader_workers
from runtime.guard import StepGuard, StopRequest
from runtime.host_sync import HostSyncLog
from runtime.loop import StepResult, inject_faults, optimizer_step, prepare_run, resume_run, save_run
from runtime.metric_logger import MetricLogger
from runtime.precision import resolve_precision
from runtime.run_dir import check_same_run
from runtime.schedule import warmup_cosine_lr

log = logging.getLogger(__name__)


def no_best() -> Dict[str, Any]:
    return {"epoch": None, "metric": None, "val": None}


@dataclass
class TrainState:
    """Where a run is, beyond weights, optimizer and RNG: saved into every checkpoint and restored as one object.
    `history` holds the job's per-epoch evaluations, `summary` every logged scalar over all windows so far,
    `extra` what the job itself must find again on resume (the encoder's arch, the classes, ...)."""
    steps_per_epoch: int
    total_steps: int
    samples_per_step: int
    seed: int = 0
    step: int = 0
    best: Dict[str, Any] = field(default_factory=no_best)
    history: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Dict[str, float]] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def samples_seen(self) -> int:
        return self.step * self.samples_per_step

    def record_window(self, scalars: Dict[str, float]) -> None:
        """Fold one log window into the summary: count, first, last, min, max and mean of each scalar."""
        for name, value in scalars.items():
            value = float(value)
            s = self.summary.get(name)
            if s is None:
                self.summary[name] = {"count": 1, "first": value, "last": value, "min": value, "max": value,
                                      "mean": value}
                continue
            s["count"] += 1
            s["mean"] += (value - s["mean"]) / s["count"]
            s["last"], s["min"], s["max"] = value, min(s["min"], value), max(s["max"], value)

    def to_dict(self) -> Dict[str, Any]:
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                "data": {"seed": self.seed, "epoch": epoch, "step_in_epoch": in_epoch},
                "scheduler": {"name": "warmup_cosine", "steps_per_epoch": self.steps_per_epoch,
                              "total_steps": self.total_steps},
                "best": self.best, "history": self.history, "summary": self.summary, "extra": self.extra}

    def restore(self, saved: Dict[str, Any]) -> "TrainState":
        """This state at the saved one's position (the schedule stays this run's: it is derived from the config)."""
        self.step = int(saved["step"])
        self.best = saved.get("best") or no_best()
        self.history = list(saved.get("history") or [])
        self.summary = dict(saved.get("summary") or {})
        self.extra = dict(saved.get("extra") or {})
        return self


class TrainingJob:
    """One training job on this rank. A subclass builds its parts in __init__ (after `super().__init__`): the
    strategy, store, steps_per_epoch, total_steps and batch_size, and says what a step computes (`batches`,
    `forward`); hooks let it evaluate, log more or write its results. `run()` trains to the last step or a stop."""

    name = "training"
    max_nonfinite = 3

    def __init__(self, cfg: Any, env: distributed.DistEnv, stop: Optional[StopRequest] = None,
                 debug: Optional[DebugConfig] = None, precision: str = "fp32"):
        self.cfg, self.env = with_loader_workers(cfg), env
        self.stop = stop or StopRequest()
        self.debug = debug or DebugConfig()
        self.device = resolve_device(env, cfg.run.device, precision)
        configure_cuda(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.run_dir = Path(cfg.run.output_dir)
        check_same_run(self.run_dir, self.cfg, cfg.run.resume)  # before anything is built or written
        self.state: Optional[TrainState] = None
        # set by the subclass
        self.strategy: Any = None
        self.store: Optional[CheckpointStore] = None
        self.steps_per_epoch = self.total_steps = self.batch_size = 1
        self.lr = 0.0

    # what a subclass says
    def batches(self, start_step: int) -> Iterator[Dict[str, Any]]:
        """Micro-batches from start_step on; the returned generator is closed when the loop ends."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, batch: Dict[str, Any]):
        """(loss, {term: value}, anything else) of one micro-batch."""
        raise NotImplementedError

    def prepare(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A micro-batch once on the device (e.g. uint8 images -> normalised floats)."""
        return batch

    def run_metadata(self) -> Dict[str, Any]:
        """What meta.json records besides config and launcher."""
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}

    def on_start(self, state: TrainState) -> None:
        """Every rank, once resumed (or fresh), before the first step."""

    def on_first_batch(self, batch: Dict[str, Any]) -> None:
        """The first micro-batch this process trains on, on the device."""

    def after_step(self, state: TrainState, done: StepResult, logger: MetricLogger) -> None:
        """After each optimizer step and its metrics, before the checkpoint decision (e.g. evaluate)."""

    def window_scalars(self, state: TrainState, window: Dict[str, float], lr: float) -> Dict[str, float]:
        scalars = {"train/lr": lr, "train/epoch": state.epoch, "train/samples_seen": state.samples_seen}
        if self.device.type == "cuda":  # the allocator's own count: no device sync
            scalars["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return scalars

    def checkpoint_due(self, step: int) -> bool:
        return step % self.cfg.run.ckpt_every == 0 or step == self.total_steps

    def sync_due(self, step: int) -> bool:
        """A step where the host learns what the device knows (skipped updates, stop requests): log and checkpoint
        steps, the last step (and a run's first). Every other step queues its work and moves on."""
        return step % self.cfg.run.log_every == 0 or self.checkpoint_due(step) or step == self.total_steps

    def busy_step(self, step: int) -> bool:
        """A step where the job does more than train (evaluates, draws images): it may read the device."""
        return False

    def close(self) -> None:
        """The loop is over (normally, by a stop or an error): release what on_start opened."""

    def finish(self, state: TrainState, logger: MetricLogger, guard: StepGuard, start: int,
               stopped: bool) -> Dict[str, Any]:
        """Results of the run (every rank calls it; rank 0 writes files)."""
        return {"final_step": state.step, "stopped": stopped}

    # the skeleton
    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.cfg.optim.accum_steps * self.env.world_size

    def lr_at(self, step: int) -> float:
        optim = self.cfg.optim
        return warmup_cosine_lr(step / self.steps_per_epoch, self.lr, optim.min_lr, optim.warmup_epochs,
                                self.total_steps / self.steps_per_epoch)

    def resume(self) -> TrainState:
        """Rank 0 cleans up and records the run, then the latest checkpoint (rank 0 decides) is restored."""
        prepare_run(self.run_dir, self.store, self.cfg, self.env, **self.run_metadata())
        state = TrainState(self.steps_per_epoch, self.total_steps, self.samples_per_step, self.cfg.run.seed)
        saved = resume_run(self.cfg.run.resume, self.store, self.strategy, self.env)
        return state.restore(saved) if saved else state

    def save(self, state: TrainState) -> None:
        save_run(self.store, self.strategy, state.step, self.cfg, state.to_dict())

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        state = self.state = self.resume()
        start = state.step
        if start >= self.total_steps:
            log.warning("%s in %s is already complete (step %d of %d): nothing to train, its results are written "
                        "again from the last checkpoint; for a new run set run.output_dir to a new directory",
                        self.name, self.run_dir, start, self.total_steps)
        self.on_start(state)
        logger = MetricLogger(self.run_dir / "tb", every=cfg.run.log_every, device=self.device,
                              summed=("corrupt_samples",), counted=("skipped_steps",))
        if start == 0:
            logger.text("config", "```\n" + config_to_yaml(cfg) + "```")
        guard = StepGuard(self.max_nonfinite, self.device, self.stop)
        debug = self.debug
        syncs = (HostSyncLog(self.run_dir, self.env.rank, self.device, debug.count_host_syncs, debug.cuda_sync_debug)
                 if debug.count_host_syncs or debug.cuda_sync_debug else None)
        stream = self.batches(start)
        stopped = False
        try:
            while state.step < self.total_steps and not stopped:
                state.step += 1
                first = state.step == start + 1
                quiet = not (first or self.sync_due(state.step) or self.busy_step(state.step))
                with syncs.step(state.step, quiet) if syncs else nullcontext():
                    stopped = self.train_step(state, stream, guard, logger, first)
                if self.debug.step_sleep_s:
                    time.sleep(self.debug.step_sleep_s)
        finally:
            stream.close()  # shuts the loader's workers down now, not at interpreter exit (where they would hang)
            self.close()
            if syncs:
                syncs.close()
        result = self.finish(state, logger, guard, start, stopped)
        logger.close()
        if stopped:
            log.warning("%s stopped by %s at step %d after saving a checkpoint; rerun (or requeue) to resume",
                        self.name, guard.signal_name, state.step)
        return result

    def train_step(self, state: TrainState, stream: Iterator[Dict[str, Any]], guard: StepGuard,
                   logger: MetricLogger, first: bool) -> bool:
        """One optimizer step, its metrics, the sync point's decisions, the job's hook and the checkpoint; True if
        the run stops after it."""
        lr = self.lr_at(state.step)
        self.strategy.set_lr(lr)
        accum = self.cfg.optim.accum_steps
        done = optimizer_step(self.strategy, stream, self.forward, guard, state.step, accum, self.precision,
                              self.device, on_loss=lambda loss, s: inject_faults(self.debug, loss, s, self.env.rank),
                              on_first_batch=self.on_first_batch if first else None, prepare=self.prepare)
        window = logger.update(state.step, samples=self.batch_size * accum, data_time=done.data_time,
                               loss=done.loss.detach(), **{f"loss_{k}": v.detach() for k, v in done.terms.items()},
                               grad_norm=done.grad_norm, corrupt_samples=done.corrupt, skipped_steps=done.skipped)
        if window:
            scalars = self.window_scalars(state, window, lr)
            logger.write_scalars(state.step, scalars)
            state.record_window({"step": state.step, **window, **scalars})
        stopped = guard.sync(state.step) if first or self.sync_due(state.step) else False
        self.after_step(state, done, logger)
        if self.checkpoint_due(state.step) or stopped:
            self.save(state)
        return stopped
