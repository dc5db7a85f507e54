"""The training skeleton every trainer runs: a job says what it is once (`build() -> JobParts`); the skeleton builds
the optimizer, strategy, checkpoint store and seeds from it, resumes, runs guarded optimizer steps, saves
checkpoints holding one TrainState plus every registered part, and logs metrics to TensorBoard and metrics.jsonl."""
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence

import torch

from runtime import distributed
from runtime.checkpoint import CheckpointStore, decide_resume
from runtime.config import DebugConfig, config_to_dict, config_to_yaml, with_scaled_lr
from runtime.device import configure_cuda, resolve_device, to_device, with_loader_workers
from runtime.ema import WeightEma
from runtime.epochs import SharedEpoch, epoch_stream
from runtime.guard import StepGuard, StopRequest
from runtime.host_sync import HostSyncLog
from runtime.metric_logger import MetricLogger
from runtime.optim import adamw
from runtime.precision import autocast, resolve_precision
from runtime.run_dir import check_same_run, record_run
from runtime.schedule import warmup_cosine_lr
from runtime.seeding import capture_rng_state, restore_rng_state, seed_everything
from runtime.strategy import Strategy, make_strategy

log = logging.getLogger(__name__)


class Stateful(Protocol):
    """A part of the run its checkpoints hold beyond weights, optimizer, RNG and TrainState (e.g. the EMA)."""

    def state_dict(self) -> Dict[str, Any]: ...
    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


@dataclass
class JobParts:
    """What a job is, said once by `TrainingJob.build()`; the skeleton makes the rest from it."""
    model: torch.nn.Module
    param_groups: Any                       # what AdamW steps: parameters, or groups (timm's weight/layer decay)
    batch_size: int                         # per rank and micro-batch
    samples_per_epoch: int                  # -> steps per epoch (over every rank and micro-batch)
    epochs: float                           # -> total steps
    precision: str = "fp32"                 # auto, fp32, bf16, fp16 (resolved on the device)
    strategy: str = "ddp"                   # ddp or deepspeed (runtime/strategy.py)
    deepspeed_config: Optional[str] = None
    max_nonfinite: int = 3                  # non-finite losses in a row before the run stops with an error
    ema_decay: Optional[float] = None       # an EMA of the weights (train.ema_decay), evaluated and exported
    frozen: Sequence[torch.nn.Module] = ()  # other modules moved to the device with the model (a live teacher)
    states: Dict[str, Stateful] = field(default_factory=dict)  # saved into and restored from every checkpoint


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


class TrainingJob:
    """One training job on this rank. A subclass says what it is in `build()` and what a step computes
    (`train_loader` or `batches`, `forward`, optionally `prepare`); hooks let it evaluate, log more or write its
    results. The constructor builds everything (the same preamble for every job, every DebugConfig field honoured);
    `run()` trains to the last step or a stop."""

    name = "training"

    def __init__(self, cfg: Any, env: distributed.DistEnv, stop: Optional[StopRequest] = None):
        self.cfg, self.env = with_loader_workers(cfg), env
        self.stop = stop or StopRequest()
        self.debug: DebugConfig = getattr(cfg, "debug", None) or DebugConfig()
        self.run_dir = Path(cfg.run.output_dir)
        check_same_run(self.run_dir, self.cfg, cfg.run.resume)  # before anything is built or written
        self.state: Optional[TrainState] = None
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        parts = self.build()
        self.cfg = with_scaled_lr(self.cfg, parts.batch_size, env.world_size)
        self.lr, self.batch_size, self.max_nonfinite = self.cfg.optim.lr, parts.batch_size, parts.max_nonfinite
        self.device = resolve_device(env, cfg.run.device, parts.precision)
        configure_cuda(self.device)
        self.precision = resolve_precision(parts.precision, self.device)
        self.steps_per_epoch = max(1, parts.samples_per_epoch // self.samples_per_step)
        self.total_steps = max(1, int(round(parts.epochs * self.steps_per_epoch)))
        for module in parts.frozen:
            module.to(self.device)
        optim = self.cfg.optim
        self.strategy: Strategy = make_strategy(parts.strategy, parts.model, adamw(parts.param_groups, optim),
                                                self.device, optim.accum_steps, optim.clip_grad,
                                                parts.deepspeed_config, parts.batch_size, self.precision)
        self.states: Dict[str, Stateful] = dict(parts.states)
        self.ema = WeightEma(self.strategy.module, parts.ema_decay) if parts.ema_decay else None
        if self.ema is not None:
            self.states["ema"] = self.ema
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every,
                                     self.debug.save_sleep_s)
        seed_everything(cfg.run.seed + 1000 * env.rank)  # different augmentations on each rank
        self.epoch = SharedEpoch()

    # what a subclass says
    def build(self) -> JobParts:
        """The job's model and what the skeleton needs to train it (called once, after seeding, on every rank)."""
        raise NotImplementedError

    def train_loader(self):
        """The training loader (persistent workers), read epoch by epoch through `self.epoch`."""
        raise NotImplementedError

    def no_batch(self, loader) -> str:
        """The error when a whole pass over the training data gave no batch."""
        return f"{self.name}: a whole pass over the training data gave no batch of {self.batch_size}"

    def batches(self, start_step: int) -> Iterator[Dict[str, Any]]:
        """Micro-batches from start_step on; the returned generator is closed when the loop ends."""
        return epoch_stream(self.train_loader(), self.steps_per_epoch, self.cfg.optim.accum_steps, start_step,
                            self.epoch, self.no_batch)

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

    @property
    def eval_module(self) -> torch.nn.Module:
        """The weights a job evaluates and exports: the EMA's when train.ema_decay is set, else the trained ones."""
        return self.ema.module if self.ema is not None else self.strategy.module

    def lr_at(self, step: int) -> float:
        optim = self.cfg.optim
        return warmup_cosine_lr(step / self.steps_per_epoch, self.lr, optim.min_lr, optim.warmup_epochs,
                                self.total_steps / self.steps_per_epoch)

    def resume(self) -> TrainState:
        """Rank 0 cleans up and records the run; then the checkpoint rank 0 decided on (if any) is restored: weights
        and optimizer by the strategy, this rank's RNG (its CUDA generator onto this device), every registered part
        and the TrainState."""
        record_run(self.run_dir, self.store, self.cfg, self.env, **self.run_metadata())
        state = TrainState(self.steps_per_epoch, self.total_steps, self.samples_per_step, self.cfg.run.seed)
        path = decide_resume(self.cfg.run.resume, self.store)
        if path is None:
            return state
        saved = self.strategy.load_checkpoint(path)
        rng = saved.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank], self.device)
        parts = saved.get("states") or {}
        for name, part in self.states.items():
            if name in parts:
                part.load_state_dict(parts[name])
            elif hasattr(part, "start_fresh"):
                part.start_fresh()
            else:
                log.warning("%s holds no state for %r: it starts afresh", path, name)
        log.info("resumed from %s at step %d", path, saved["step"])
        return state.restore(saved)

    def save(self, state: TrainState) -> None:
        """A checkpoint with every rank's RNG state, the resolved config and the registered parts (a collective:
        all ranks call it)."""
        rng = distributed.all_gather_object(capture_rng_state(self.device))
        self.strategy.save_checkpoint(self.store, state.step, {
            "step": state.step, "rng": rng, "config": config_to_dict(self.cfg), **state.to_dict(),
            "states": {name: part.state_dict() for name, part in self.states.items()}})

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
                if debug.step_sleep_s:
                    time.sleep(debug.step_sleep_s)
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
        done = self.optimizer_step(stream, guard, state.step, first)
        if self.ema is not None:
            self.ema.update(state.step)
        window = logger.update(state.step, samples=self.batch_size * self.cfg.optim.accum_steps,
                               data_time=done.data_time, loss=done.loss.detach(),
                               **{f"loss_{k}": v.detach() for k, v in done.terms.items()},
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

    def optimizer_step(self, batches: Iterator[Dict[str, Any]], guard: StepGuard, step: int,
                       first: bool) -> StepResult:
        """Micro-batches through prepare, forward and backward (DDP no_sync between boundaries), then the optimizer
        step, skipped on the device on every rank if any rank's loss was not finite (guard.nonfinite_anywhere).
        Nothing here waits for the device: the decisions that need the host are the guard's, at sync points."""
        strategy, accum = self.strategy, self.cfg.optim.accum_steps
        data_time, corrupt = 0.0, 0
        loss, terms, output, batch, nonfinite = None, {}, None, {}, None
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - t0
            corrupt += int(batch.pop("corrupt", 0))
            batch = self.prepare(to_device(batch, self.device))
            if first and micro == 0:
                self.on_first_batch(batch)
            with strategy.accumulate(micro == accum - 1), autocast(self.precision, self.device):
                loss, terms, output = self.forward(strategy.model, batch)
            loss = self.inject_faults(loss, step)
            bad = ~torch.isfinite(loss.detach())
            nonfinite = bad if nonfinite is None else nonfinite | bad
            strategy.backward(loss)  # a non-finite loss still goes back: its update is skipped below, on every rank
        grad_norm, skipped = strategy.step(guard.nonfinite_anywhere(nonfinite))
        guard.record(skipped, nonfinite)
        return StepResult(loss, terms, skipped, grad_norm, data_time, corrupt, batch, output)

    def inject_faults(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The debug.* hooks: a NaN loss or a crash on one rank at a given step."""
        debug, rank = self.debug, self.env.rank
        if step in debug.nan_steps and rank == debug.nan_rank:
            loss = loss * float("nan")
        if debug.crash_step == step and rank == debug.crash_rank:
            raise RuntimeError(f"debug.crash_step: rank {rank} crashes at step {step}")
        return loss
