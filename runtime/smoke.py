"""Cluster check: train a tiny regression net with the whole runtime (DDP, checkpoints, resume, TensorBoard).

    torchrun --standalone --nproc_per_node 2 -m runtime.smoke --config configs/smoke.yaml run.output_dir=runs/smoke

Run it on a new cluster before a long job: it proves the rendezvous, gradient all-reduce, atomic checkpoints,
resume from `latest` and event files work there. It ends by checking every rank holds identical weights and
writes `smoke_result.json` into the run directory.
"""
import itertools
import logging
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.config import DebugConfig, OptimConfig, RunConfig, bounded
from runtime.device import DeviceError
from runtime.entry import init_distributed_for, run_job
from runtime.guard import StopRequest
from runtime.training import JobParts, TrainingJob, TrainState

log = logging.getLogger("runtime.smoke")


@dataclass
class SmokeConfig:
    run: RunConfig
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=0.2, weight_decay=0.0, warmup_epochs=1.0))
    steps: int = 40
    steps_per_epoch: int = 10
    batch_size: int = 16          # per rank and micro-batch
    dim: int = 16
    hidden: int = 64
    ema_decay: Optional[float] = bounded(None, 0, 1, open_high=True)  # an EMA of the weights, saved and restored
    debug: DebugConfig = field(default_factory=DebugConfig)  # e.g. debug.step_sleep_s to interrupt a run


def make_batch(cfg: SmokeConfig, step: int, rank: int, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs from (seed, step, rank, micro) alone, so a resumed run sees exactly the data it would have seen."""
    g = torch.Generator().manual_seed(((cfg.run.seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)
    x = torch.randn(cfg.batch_size, cfg.dim, generator=g)
    target = torch.Generator().manual_seed(cfg.run.seed + 12345)
    w = torch.randn(cfg.dim, cfg.dim, generator=target) / cfg.dim ** 0.5
    return x, torch.tanh(x @ w)


class SmokeRun(TrainingJob):
    """The tiny regression net through the same skeleton the trainers run (guarded steps, checkpoints, resume)."""

    name = "smoke run"

    def __init__(self, cfg: SmokeConfig, env: distributed.DistEnv, stop: Optional[StopRequest] = None):
        self.windows: List[Dict[str, float]] = []  # this process's log windows, for the result file
        super().__init__(cfg, env, stop)

    def build(self) -> JobParts:
        cfg = self.cfg
        model = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
        per_step = cfg.batch_size * cfg.optim.accum_steps * self.env.world_size
        return JobParts(model, model.parameters(), cfg.batch_size, samples_per_epoch=cfg.steps_per_epoch * per_step,
                        epochs=cfg.steps / cfg.steps_per_epoch, ema_decay=cfg.ema_decay)

    def window_scalars(self, state: TrainState, window: Dict[str, float], lr: float) -> Dict[str, float]:
        scalars = super().window_scalars(state, window, lr)
        self.windows.append({"step": state.step, **window, **scalars})
        return scalars

    def batches(self, start_step: int) -> Iterator[Dict[str, torch.Tensor]]:
        for step in itertools.count(start_step + 1):
            for micro in range(self.cfg.optim.accum_steps):
                x, y = make_batch(self.cfg, step, self.env.rank, micro)
                yield {"x": x, "y": y}

    def forward(self, model, batch):
        return F.mse_loss(model(batch["x"]), batch["y"]), {}, None

    def finish(self, state: TrainState, logger, guard, start: int, stopped: bool) -> Dict[str, object]:
        checksums = distributed.param_checksums(self.strategy.module)
        result = {"final_step": state.step, "resumed_from_step": start, "world_size": self.env.world_size,
                  "param_checksums": checksums, "ranks_in_sync": len(set(checksums)) == 1,
                  "stopped": stopped, "windows": self.windows, "history": state.summary}
        if self.env.is_main:
            atomic_write_json(self.run_dir / "smoke_result.json", result)
            log.info("smoke run done: step %d, %d ranks, weights identical on all ranks: %s",
                     result["final_step"], self.env.world_size, result["ranks_in_sync"])
        return result


def smoke(cfg: SmokeConfig, stop: StopRequest) -> int:
    env = init_distributed_for("ddp", cfg.run.dist_timeout_s, cfg.run.device, "fp32")
    return 0 if SmokeRun(cfg, env, stop).run()["ranks_in_sync"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_job(SmokeConfig, argv, __doc__, log, smoke, expected=(DeviceError,))


if __name__ == "__main__":
    raise SystemExit(main())
