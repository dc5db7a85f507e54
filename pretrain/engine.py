"""The pretraining loop: data, strategy step with accumulation, NaN policy, checkpoints and resume, metrics."""
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any, Dict

import torch
from timm.optim import param_groups_weight_decay

from data_tools.reader import SharedEpoch, epoch_stream
from pretrain.config import PretrainConfig
from pretrain.cache_teacher import check_teacher_cache
from pretrain.data import PretrainTransform, build_loader, check_shards, count_samples, normalize_views
from pretrain.losses import loss_weights, needs_teacher
from pretrain.mae import arch_metadata
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import make_teacher
from pretrain.visualize import reconstruction_grid
from runtime import distributed
from runtime.atomic import atomic_save_safetensors, atomic_write_json
from runtime.checkpoint import CheckpointStore, load_checkpoint, load_model_state
from runtime.config import config_to_yaml, scaled_lr
from runtime.flops import device_peak_tflops, training_step_flops
from runtime.guard import StepGuard
from runtime.metric_logger import MetricLogger
from runtime.optim import adamw
from runtime.precision import autocast, resolve_precision
from runtime.schedule import warmup_cosine_lr
from runtime.loop import inject_faults, optimizer_step, prepare_run, resume_run, save_run
from runtime.seeding import seed_everything
from runtime.strategy import make_strategy

log = logging.getLogger("pretrain")
NO_WEIGHT_DECAY = ("mae.cls_token", "mae.mask_token", "mae.pos_embed", "mae.decoder_pos_embed")
EXIT_STOPPED = 0  # a run stopped by SIGTERM/SIGUSR1 after its checkpoint: the launcher requeues it


def export_weights(model: UniEmoXPretrainer, path: Path, step: int) -> None:
    """The student's weights as safetensors, with its architecture in the metadata (for fine-tuning)."""
    arch = model.mae.arch
    metadata = {"format": "uniemox-pretrain", "step": str(step), **arch_metadata(arch)}
    atomic_save_safetensors(model.state_dict(), path, metadata)


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
        distill = needs_teacher(loss_weights(cfg.loss))
        if cfg.teacher.cached and cfg.data.teacher_cache and distill:
            check_teacher_cache(cfg.data.teacher_cache, cfg.teacher)
        samples = cfg.data.samples_per_epoch or count_samples(cfg.data.train, cfg.data.url_timeout_s)
        self.steps_per_epoch = max(1, samples // self.samples_per_step)
        self.total_steps = max(1, int(round(cfg.train.epochs * self.steps_per_epoch)))
        cfg.optim.lr = scaled_lr(cfg.optim, batch, world)

        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        teacher = make_teacher(cfg.teacher) if distill and not cfg.teacher.cached else None  # live mode only
        self.teacher = teacher
        self.model = UniEmoXPretrainer(cfg.model, cfg.loss, cfg.teacher, teacher)
        if cfg.model.init_from:
            load_model_state(self.model, load_checkpoint(cfg.model.init_from)["model"])
        if teacher is not None:
            teacher.to(self.device)
        groups = param_groups_weight_decay(self.model, cfg.optim.weight_decay, NO_WEIGHT_DECAY)
        optimizer = adamw(groups, cfg.optim)
        self.strategy = make_strategy(cfg.train.strategy, self.model, optimizer, self.device, cfg.optim.accum_steps,
                                      cfg.optim.clip_grad, cfg.train.deepspeed_config, batch, self.precision)
        self.input_dtype = torch.bfloat16 if cfg.train.strategy == "deepspeed" and self.precision == "bf16" else None
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every,
                                     cfg.debug.save_sleep_s)
        seed_everything(cfg.run.seed + 1000 * self.env.rank)  # different augmentations on each rank
        self.transform = PretrainTransform(
            self.model.mae.arch.img_size, cfg.data.crop_scale, self.model.uses_person,
            teacher.tokenizer if teacher is not None else None, distill and cfg.teacher.cached,
            keep_key=cfg.debug.record_keys, person_img_size=self.model.person_img_size)
        self.epoch = SharedEpoch()
        self.step = 0

    def resume(self) -> int:
        """Restore the latest checkpoint (rank 0 decides, all follow); returns the step to continue after."""
        prepare_run(self.run_dir, self.store, self.cfg, self.env, steps_per_epoch=self.steps_per_epoch,
                    total_steps=self.total_steps)
        state = resume_run(self.cfg.run.resume, self.store, self.strategy, self.env)
        return int(state["step"]) if state else 0

    def save(self, step: int) -> None:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        save_run(self.store, self.strategy, step, self.cfg, {
            "epoch": step / self.steps_per_epoch, "samples_seen": step * self.samples_per_step,
            "data": {"seed": self.cfg.run.seed, "epoch": epoch, "step_in_epoch": in_epoch},
            "scheduler": {"name": "warmup_cosine", "steps_per_epoch": self.steps_per_epoch,
                          "total_steps": self.total_steps}})

    def batches(self, start_step: int):
        """Micro-batches from start_step on, epoch by epoch; each rank gets the same number."""
        def loader_for(needed: int, segment: int):
            return build_loader(self.cfg.data, self.transform, batches=needed, seed=self.cfg.run.seed,
                                epoch=self.epoch, rank=self.env.rank, world_size=self.env.world_size, segment=segment)

        def no_batch(loader) -> str:
            return (f"rank {self.env.rank}: a whole pass over its {loader.num_shards} shards of {self.cfg.data.train} "
                    f"gave no batch of {self.cfg.data.batch_size} (unreadable shards or too few samples; the "
                    f"warnings above name each shard that failed)")
        return epoch_stream(loader_for, self.steps_per_epoch, self.cfg.optim.accum_steps, start_step, self.epoch,
                            no_batch)

    def count_step_flops(self, batch: Dict[str, Any]) -> int:
        model = self.strategy.module
        teacher = self.teacher if not self.cfg.teacher.cached and self.model.distill else None

        def student():
            with autocast(self.precision, self.device):
                model(batch)

        def frozen():
            teacher.encode_image(batch["image"]), teacher.encode_text(batch["text"])
        # the counting forward draws masks: on a forked RNG, so a resumed run draws what an uninterrupted one does
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return training_step_flops(student, frozen if teacher is not None else None)

    def inject_faults(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return inject_faults(self.cfg.debug, loss, step, self.env.rank)

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        start = self.resume()
        logger = MetricLogger(self.run_dir / "tb", every=cfg.run.log_every, device=self.device)
        if start == 0:
            logger.text("config", "```\n" + config_to_yaml(cfg) + "```")
        guard = StepGuard(cfg.train.max_nonfinite, self.device)
        peak = device_peak_tflops(self.device, cfg.train.peak_tflops)
        flops_per_sample, fixed = None, None

        def first_batch(batch):  # FLOPs of a step and the fixed reconstruction batch, once
            nonlocal flops_per_sample, fixed
            flops_per_sample = self.count_step_flops(batch) / cfg.data.batch_size
            fixed = {"image": batch["image"][:8].detach().clone(),
                     "noise": torch.rand(min(8, batch["image"].shape[0]), self.model.mae.num_patches,
                                         generator=torch.Generator().manual_seed(0)).to(self.device)}

        stream = self.batches(start)
        step, stopped, result, dropped = start, False, {}, 0
        log.info("training steps %d..%d (%d per epoch), %d samples per step, lr %.3g, %s, %s", start + 1,
                 self.total_steps, self.steps_per_epoch, self.samples_per_step, cfg.optim.lr,
                 self.strategy.name, self.precision)

        keys_log = None
        if cfg.debug.record_keys:
            (self.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            keys_log = open(self.run_dir / "keys" / f"rank{self.env.rank}.jsonl", "a", buffering=1)  # line by line

        def forward(model, batch):
            if keys_log is not None:
                keys_log.write(json.dumps({"step": step, "epoch": (step - 1) // self.steps_per_epoch,
                                           "keys": batch["key"]}) + "\n")
            out = model(batch)
            return out.loss, out.terms, out

        try:
            while step < self.total_steps and not stopped:
                step += 1
                lr = warmup_cosine_lr(step / self.steps_per_epoch, cfg.optim.lr, cfg.optim.min_lr,
                                      cfg.optim.warmup_epochs, self.total_steps / self.steps_per_epoch)
                self.strategy.set_lr(lr)
                done = optimizer_step(self.strategy, stream, forward, guard, step, cfg.optim.accum_steps,
                                      self.precision, self.device, self.input_dtype, on_loss=self.inject_faults,
                                      on_first_batch=first_batch if flops_per_sample is None else None,
                                      prepare=lambda b: normalize_views(b, self.input_dtype))
                stopped = stopped or done.stop
                dropped += done.corrupt
                values = {} if done.skipped else {"loss": done.loss.detach(),
                                                  **{f"loss_{k}": v.detach() for k, v in done.terms.items()}}
                window = logger.update(step, samples=cfg.data.batch_size * cfg.optim.accum_steps,
                                       data_time=done.data_time, **values, grad_norm=done.grad_norm.to(self.device),
                                       corrupt_samples=float(done.corrupt), skipped_steps=float(done.skipped))
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
        finally:
            stream.close()  # shuts the loader's workers down now, not at interpreter exit (where they would hang)
            if keys_log is not None:
                keys_log.close()
        logger.close()
        checksums = distributed.param_checksums(self.strategy.module)
        hosts = distributed.all_gather_object(socket.gethostname())
        dropped = int(distributed.all_reduce_sum(torch.tensor(float(dropped), device=self.device)).item())
        if self.env.is_main:
            export_weights(self.strategy.module, self.run_dir / "weights.safetensors", step)
            summary = {"final_step": step, "total_steps": self.total_steps, "resumed_from_step": start,
                       "stopped_by_signal": guard.signal_name if stopped else None,
                       "skipped_steps": guard.skipped_total, "world_size": self.env.world_size,
                       "strategy": self.strategy.name, "ranks_in_sync": len(set(checksums)) == 1,
                       "param_checksums": checksums, "hosts": hosts, "dropped_in_this_run": dropped,
                       "last_window": result}
            atomic_write_json(self.run_dir / "result.json", summary)
        if stopped:
            log.warning("stopped by %s at step %d after saving a checkpoint; rerun (or requeue) to resume",
                        guard.signal_name, step)
        return {"final_step": step, "stopped": stopped}
