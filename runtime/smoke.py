"""Cluster check: train a tiny regression net with the whole runtime (DDP, checkpoints, resume, TensorBoard).

    torchrun --standalone --nproc_per_node 2 -m runtime.smoke --config configs/smoke.yaml run.output_dir=runs/smoke

Run it on a new cluster before a long job: it proves the rendezvous, gradient all-reduce, atomic checkpoints,
resume from `latest` and event files work there. It ends by checking every rank holds identical weights and
writes `smoke_result.json` into the run directory.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.checkpoint import CheckpointStore, decide_resume
from runtime.config import OptimConfig, RunConfig, config_to_dict, config_to_yaml, scaled_lr, \
    write_run_metadata
from runtime.loop import run_job
from runtime.metric_logger import MetricLogger
from runtime.optim import adamw
from runtime.schedule import warmup_cosine_lr
from runtime.seeding import capture_rng_state, restore_rng_state, seed_everything
from runtime.strategy import DDPStrategy

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
    step_sleep_s: float = 0.0     # slows each step, so a test can interrupt a run part-way


def make_batch(cfg: SmokeConfig, step: int, rank: int, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs from (seed, step, rank, micro) alone, so a resumed run sees exactly the data it would have seen."""
    g = torch.Generator().manual_seed(((cfg.run.seed * 1_000_003 + step) * 1009 + rank) * 31 + micro)
    x = torch.randn(cfg.batch_size, cfg.dim, generator=g)
    target = torch.Generator().manual_seed(cfg.run.seed + 12345)
    w = torch.randn(cfg.dim, cfg.dim, generator=target) / cfg.dim ** 0.5
    return x, torch.tanh(x @ w)


def train(cfg: SmokeConfig) -> Dict[str, object]:
    env = distributed.init_distributed(distributed.resolve_env(), cfg.run.dist_timeout_s)
    device = distributed.default_device(env)
    run_dir = Path(cfg.run.output_dir)
    seed_everything(cfg.run.seed)
    model = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
    cfg.optim.lr = scaled_lr(cfg.optim, cfg.batch_size, env.world_size)
    optimizer = adamw(model.parameters(), cfg.optim)
    strategy = DDPStrategy(model, optimizer, device, cfg.optim.accum_steps, cfg.optim.clip_grad)
    store = CheckpointStore(run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every)
    if env.is_main:
        store.clean_partials()
        write_run_metadata(run_dir, cfg, world_size=env.world_size, launcher=env.launcher)
    distributed.barrier()

    start_step = 0
    resume_from = decide_resume(cfg.run.resume, store)
    if resume_from is not None:
        state = strategy.load_checkpoint(resume_from)
        start_step = state["step"]
        if len(state["rng"]) == env.world_size:
            restore_rng_state(state["rng"][env.rank])
        log.info("resumed from %s at step %d", resume_from, start_step)

    logger = MetricLogger(run_dir / "tb", every=cfg.run.log_every, device=device)
    logger.text("config", "```\n" + config_to_yaml(cfg) + "```", start_step)
    windows: List[Dict[str, float]] = []
    for step in range(start_step + 1, cfg.steps + 1):
        lr = warmup_cosine_lr(step / cfg.steps_per_epoch, cfg.optim.lr, cfg.optim.min_lr,
                              cfg.optim.warmup_epochs, cfg.steps / cfg.steps_per_epoch)
        strategy.set_lr(lr)
        data_time = 0.0
        for micro in range(cfg.optim.accum_steps):
            t0 = time.perf_counter()
            x, y = (t.to(device) for t in make_batch(cfg, step, env.rank, micro))
            data_time += time.perf_counter() - t0
            with strategy.accumulate(boundary=micro == cfg.optim.accum_steps - 1):
                loss = F.mse_loss(strategy.model(x), y)
                strategy.backward(loss)
        grad_norm = strategy.step()
        window = logger.update(step, samples=cfg.batch_size * cfg.optim.accum_steps, data_time=data_time,
                               loss=loss, grad_norm=grad_norm)
        if window:
            logger.write_scalars(step, {"train/lr": lr})
            windows.append({"step": step, **window})
        if step % cfg.run.ckpt_every == 0 or step == cfg.steps:
            rng = distributed.all_gather_object(capture_rng_state())
            strategy.save_checkpoint(store, step, {
                "step": step, "epoch": step / cfg.steps_per_epoch,
                "samples_seen": step * cfg.batch_size * cfg.optim.accum_steps * env.world_size,
                "scheduler": {"name": "warmup_cosine", "steps_per_epoch": cfg.steps_per_epoch},
                "scaler": None, "rng": rng, "config": config_to_dict(cfg)})
        if cfg.step_sleep_s:
            time.sleep(cfg.step_sleep_s)
    logger.close()

    checksums = distributed.param_checksums(strategy.module)
    result = {"final_step": max(start_step, cfg.steps), "resumed_from_step": start_step,
              "world_size": env.world_size, "param_checksums": checksums,
              "ranks_in_sync": len(set(checksums)) == 1, "windows": windows}
    if env.is_main:
        atomic_write_json(run_dir / "smoke_result.json", result)
        log.info("smoke run done: step %d, %d ranks, weights identical on all ranks: %s",
                 result["final_step"], env.world_size, result["ranks_in_sync"])
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_job(SmokeConfig, argv, __doc__, log, lambda cfg: 0 if train(cfg)["ranks_in_sync"] else 1)


if __name__ == "__main__":
    raise SystemExit(main())
