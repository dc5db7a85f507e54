"""The pretraining loop: data, strategy step with accumulation, NaN policy, checkpoints and resume, metrics."""
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save_file
from timm.optim import param_groups_weight_decay

from data_tools.reader import SharedEpoch
from pretrain.config import PretrainConfig
from pretrain.data import PretrainTransform, build_loader, check_shards, count_samples
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher
from pretrain.visualize import reconstruction_grid
from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.checkpoint import CheckpointStore, decide_resume, load_checkpoint, load_model_state
from runtime.config import config_to_dict, config_to_yaml, scaled_lr, write_run_metadata
from runtime.flops import device_peak_tflops, training_step_flops
from runtime.guard import StepGuard
from runtime.metric_logger import MetricLogger
from runtime.precision import autocast, resolve_precision
from runtime.schedule import warmup_cosine_lr
from runtime.seeding import capture_rng_state, restore_rng_state, seed_everything
from runtime.strategy import make_strategy

log = logging.getLogger("pretrain")
NO_WEIGHT_DECAY = ("mae.cls_token", "mae.mask_token", "mae.pos_embed", "mae.decoder_pos_embed")
EXIT_STOPPED = 0  # a run stopped by SIGTERM/SIGUSR1 after its checkpoint: the launcher requeues it


def to_device(batch: Dict[str, Any], device: torch.device, float_dtype: Optional[torch.dtype] = None):
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def export_weights(model: UniEmoXPretrainer, path: Path, step: int) -> None:
    """The student's weights as safetensors, with its architecture in the metadata (for fine-tuning)."""
    arch = model.mae.arch
    metadata = {"format": "uniemox-pretrain", "step": str(step),
                **{f"arch.{k}": str(v) for k, v in vars(arch).items()}}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class Pretraining:
    """One pretraining job on this rank: built from the config, `run()` trains to the last step or a stop."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.env = distributed.init_distributed(distributed.resolve_env(), cfg.run.dist_timeout_s,
                                                always=cfg.train.strategy == "deepspeed")
        self.device = distributed.default_device(self.env)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.run_dir = Path(cfg.run.output_dir)
        world, batch = self.env.world_size, cfg.data.batch_size
        self.samples_per_step = batch * cfg.optim.accum_steps * world
        check_shards(cfg.data.train)  # missing or empty shards: an error naming them, before anything is built
        samples = cfg.data.samples_per_epoch or count_samples(cfg.data.train)
        self.steps_per_epoch = max(1, samples // self.samples_per_step)
        self.total_steps = max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        cfg.optim.lr = scaled_lr(cfg.optim, batch, world)

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        teacher = None
        if cfg.loss.paired > 0 or cfg.loss.relational > 0 or not cfg.teacher.cached:
            teacher = CLIPTeacher(cfg.teacher.arch, cfg.teacher.checkpoint)  # also the tokenizer for live mode
        self.teacher = teacher
        self.model = UniEmoXPretrainer(cfg.model, cfg.loss, cfg.teacher, None if cfg.teacher.cached else teacher)
        if cfg.model.init_from:
            load_model_state(self.model, load_checkpoint(cfg.model.init_from)["model"])
        if teacher is not None:
            teacher.to(self.device)
        groups = param_groups_weight_decay(self.model, cfg.optim.weight_decay, NO_WEIGHT_DECAY)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
        self.strategy = make_strategy(cfg.train.strategy, self.model, optimizer, self.device, cfg.optim.accum_steps,
                                      cfg.optim.clip_grad, cfg.train.deepspeed_config, batch, self.precision)
        self.input_dtype = torch.bfloat16 if cfg.train.strategy == "deepspeed" and self.precision == "bf16" else None
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every)
        seed_everything(cfg.run.seed + 1000 * self.env.rank)  # different augmentations on each rank
        self.transform = PretrainTransform(
            self.model.mae.arch.img_size, cfg.data.crop_scale, self.model.uses_person,
            teacher.tokenize if teacher is not None and not cfg.teacher.cached else None, cfg.teacher.cached)
        self.epoch = SharedEpoch()
        self.step = 0

    def resume(self) -> int:
        """Restore the latest checkpoint (rank 0 decides, all follow); returns the step to continue after."""
        if self.env.is_main:
            self.store.clean_partials()
            write_run_metadata(self.run_dir, self.cfg, world_size=self.env.world_size, launcher=self.env.launcher,
                               steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                               restart_count=os.environ.get("SLURM_RESTART_COUNT", "0"))
        distributed.barrier()
        path = decide_resume(self.cfg.run.resume, self.store)
        if path is None:
            return 0
        state = self.strategy.load_checkpoint(path)
        rng = state.get("rng") or []
        if len(rng) == self.env.world_size:
            restore_rng_state(rng[self.env.rank])
        log.info("resumed from %s at step %d (epoch %.2f, %d samples seen)", path, state["step"], state["epoch"],
                 state["samples_seen"])
        return int(state["step"])

    def save(self, step: int) -> None:
        rng = distributed.all_gather_object(capture_rng_state())
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        self.strategy.save_checkpoint(self.store, step, {
            "step": step, "epoch": step / self.steps_per_epoch, "samples_seen": step * self.samples_per_step,
            "data": {"seed": self.cfg.run.seed, "epoch": epoch, "step_in_epoch": in_epoch},
            "scheduler": {"name": "warmup_cosine", "steps_per_epoch": self.steps_per_epoch,
                          "total_steps": self.total_steps},
            "scaler": None, "rng": rng, "config": config_to_dict(self.cfg)})

    def batches(self, start_step: int):
        """Micro-batches from start_step on, epoch by epoch; each rank gets the same number."""
        accum = self.cfg.optim.accum_steps
        epoch, in_epoch = divmod(start_step, self.steps_per_epoch)
        while True:
            self.epoch.set(epoch)
            needed = (self.steps_per_epoch - in_epoch) * accum
            segment = in_epoch
            while needed > 0:
                loader = build_loader(self.cfg.data, self.transform, batches=needed, seed=self.cfg.run.seed,
                                      epoch=self.epoch, rank=self.env.rank, world_size=self.env.world_size,
                                      segment=segment)
                for batch in loader:
                    yield batch
                    needed -= 1
                    if needed == 0:
                        break
                segment += 1_000_003  # plain shards ran out on this rank: another pass, so ranks stay in step
            epoch, in_epoch = epoch + 1, 0

    def count_step_flops(self, batch: Dict[str, Any]) -> int:
        model = self.strategy.module
        teacher = self.teacher if not self.cfg.teacher.cached and self.model.distill else None

        def student():
            with autocast(self.precision, self.device):
                model(batch)

        def frozen():
            teacher.encode_image(batch["image"]), teacher.encode_text(batch["text"])
        return training_step_flops(student, frozen if teacher is not None else None)

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        start = self.resume()
        logger = MetricLogger(self.run_dir / "tb", every=cfg.run.log_every, device=self.device)
        if start == 0:
            logger.text("config", "```\n" + config_to_yaml(cfg) + "```")
        guard = StepGuard(cfg.train.max_nonfinite, self.device)
        peak = device_peak_tflops(self.device, cfg.train.peak_tflops)
        flops_per_sample = None
        fixed = None
        stream = self.batches(start)
        step, stopped, result = start, False, {}
        log.info("training steps %d..%d (%d per epoch), %d samples per step, lr %.3g, %s, %s", start + 1,
                 self.total_steps, self.steps_per_epoch, self.samples_per_step, cfg.optim.lr,
                 self.strategy.name, self.precision)
        while step < self.total_steps and not stopped:
            step += 1
            lr = warmup_cosine_lr(step / self.steps_per_epoch, cfg.optim.lr, cfg.optim.min_lr,
                                  cfg.optim.warmup_epochs, self.total_steps / self.steps_per_epoch)
            self.strategy.set_lr(lr)
            data_time, corrupt, skipped = 0.0, 0, False
            for micro in range(cfg.optim.accum_steps):
                t0 = time.perf_counter()
                batch = next(stream)
                data_time += time.perf_counter() - t0
                corrupt += int(batch.pop("corrupt", 0))
                batch = to_device(batch, self.device, self.input_dtype)
                if flops_per_sample is None:
                    flops_per_sample = self.count_step_flops(batch) / cfg.data.batch_size
                    fixed = {"image": batch["image"][:8].detach().clone(),
                             "noise": torch.rand(min(8, batch["image"].shape[0]), self.model.mae.num_patches,
                                                 generator=torch.Generator().manual_seed(0)).to(self.device)}
                with self.strategy.accumulate(micro == cfg.optim.accum_steps - 1), \
                        autocast(self.precision, self.device):
                    out = self.strategy.model(batch)
                loss = out.loss
                if step in cfg.debug.nan_steps and self.env.rank == cfg.debug.nan_rank:
                    loss = loss * float("nan")
                if cfg.debug.crash_step == step and self.env.rank == cfg.debug.crash_rank:
                    raise RuntimeError(f"debug.crash_step: rank {self.env.rank} crashes at step {step}")
                skip, stop = guard.check(loss, step)
                stopped = stopped or stop
                if skip:
                    self.strategy.skip()
                    skipped = True
                    break
                self.strategy.backward(loss)
            grad_norm = torch.tensor(float("nan")) if skipped else self.strategy.step()
            values = {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in out.terms.items()}} \
                if not skipped else {}
            window = logger.update(step, samples=cfg.data.batch_size * cfg.optim.accum_steps, data_time=data_time,
                                   **values, grad_norm=grad_norm.to(self.device), corrupt_samples=float(corrupt),
                                   skipped_steps=float(skipped))
            if window:
                scalars = {"train/lr": lr, "train/samples_seen": step * self.samples_per_step,
                           "train/epoch": step / self.steps_per_epoch}
                if peak and flops_per_sample:
                    scalars["perf/mfu"] = flops_per_sample * window["perf/img_per_s"] / self.env.world_size / (
                        peak * 1e12)
                logger.write_scalars(step, scalars)
                result = {"step": step, **window, **scalars}
            if cfg.train.image_every and step % cfg.train.image_every == 0 and self.env.is_main and fixed:
                logger.image("mae/reconstruction", reconstruction_grid(
                    self.strategy.module.mae, fixed["image"], fixed["noise"], self.model.mask_ratio), step)
            if step % cfg.run.ckpt_every == 0 or step == self.total_steps or stopped:
                self.save(step)
            if cfg.debug.step_sleep_s:
                time.sleep(cfg.debug.step_sleep_s)
        logger.close()
        checksums = distributed.param_checksums(self.strategy.module)
        if self.env.is_main:
            export_weights(self.strategy.module, self.run_dir / "weights.safetensors", step)
            summary = {"final_step": step, "total_steps": self.total_steps, "resumed_from_step": start,
                       "stopped_by_signal": guard.signal_name if stopped else None,
                       "skipped_steps": guard.skipped_total, "world_size": self.env.world_size,
                       "strategy": self.strategy.name, "ranks_in_sync": len(set(checksums)) == 1,
                       "param_checksums": checksums, "last_window": result}
            atomic_write_json(self.run_dir / "result.json", summary)
        if stopped:
            log.warning("stopped by %s at step %d after saving a checkpoint; rerun (or requeue) to resume",
                        guard.signal_name, step)
        return {"final_step": step, "stopped": stopped}
