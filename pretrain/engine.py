"""The pretraining job on the runtime skeleton: data, model, teacher, strategy, MFU and reconstructions, weights."""
import json
import logging
import socket
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from timm.optim import param_groups_weight_decay

from pretrain.config import PretrainConfig
from pretrain.cache_teacher import check_teacher_cache
from pretrain.data import PretrainTransform, build_loader, check_shards, count_samples, normalize_views
from pretrain.losses import loss_weights, needs_teacher
from pretrain.mae import arch_metadata
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import make_teacher, teacher_embed_dim
from pretrain.visualize import reconstruction_grid
from runtime import distributed
from runtime.atomic import atomic_save_safetensors, atomic_write_json
from runtime.checkpoint import load_checkpoint, load_model_state
from runtime.device import compile_blocks
from runtime.flops import device_peak_tflops, training_step_flops
from runtime.guard import StopRequest
from runtime.metric_logger import MetricLogger
from runtime.precision import autocast
from runtime.training import JobParts, TrainingJob, TrainState

log = logging.getLogger("pretrain")
NO_WEIGHT_DECAY = ("mae.cls_token", "mae.mask_token", "mae.pos_embed", "mae.decoder_pos_embed")
EXIT_STOPPED = 0  # a run stopped by SIGTERM/SIGUSR1 after its checkpoint: the launcher requeues it


def export_weights(model: UniEmoXPretrainer, path: Path, step: int, ema_decay: Optional[float] = None) -> None:
    """The student's weights (its EMA's with train.ema_decay) as safetensors, with its architecture in the
    metadata (for fine-tuning)."""
    arch = model.mae.arch
    metadata = {"format": "uniemox-pretrain", "step": str(step), **arch_metadata(arch),
                **({"ema_decay": str(ema_decay)} if ema_decay else {})}
    atomic_save_safetensors(model.state_dict(), path, metadata)


class Pretraining(TrainingJob):
    """One pretraining job on this rank: built from the config, `run()` trains to the last step or a stop."""

    name = "pretraining"

    def __init__(self, cfg: PretrainConfig, env: distributed.DistEnv, stop: Optional[StopRequest] = None):
        super().__init__(cfg, env, stop)
        # DeepSpeed holds bf16 weights: the views it reads are cast (targets such as cached embeddings stay fp32)
        self.view_dtype = torch.bfloat16 if self.cfg.train.strategy == "deepspeed" and self.precision == "bf16" \
            else None
        self.peak_tflops = device_peak_tflops(self.device, self.cfg.train.peak_tflops)
        weights = next(self.strategy.module.parameters()).dtype
        if self.teacher is not None and weights != torch.float32:  # DeepSpeed's bf16/fp16 weights: the teacher's too
            self.teacher.to(weights)

    def build(self) -> JobParts:
        cfg = self.cfg
        # missing, empty or too few shards: an error naming them, once per run, before anything is built
        self.sources = check_shards(cfg.data.train, cfg.data.resampled, cfg.data.num_workers, self.env.world_size)
        distill = needs_teacher(loss_weights(cfg.loss))
        self.cache = cfg.teacher.cache if distill else None
        if self.cache is not None:  # missing or partial: an error before the model is built
            check_teacher_cache(self.cache, cfg.teacher, self.sources, cfg.data.train)
        samples = cfg.data.samples_per_epoch or count_samples(cfg.data.train, cfg.data.url_timeout_s)
        # a live teacher is data too: its embeddings are made in the batch preparation (see prepare)
        self.teacher = make_teacher(cfg.teacher) if distill and self.cache is None else None
        self.model = UniEmoXPretrainer(cfg.model, cfg.loss, teacher_embed_dim(cfg.teacher))
        if cfg.model.init_from:
            load_model_state(self.model, load_checkpoint(cfg.model.init_from)["model"])
        if cfg.train.compile:
            compile_blocks(self.model.mae.blocks, self.model.mae.decoder_blocks)
        self.transform = PretrainTransform(
            self.model.mae.arch.img_size, cfg.data.crop_scale, self.model.uses_person,
            self.teacher.tokenizer if self.teacher is not None else None, self.cache is not None,
            keep_key=cfg.debug.record_keys, person_img_size=self.model.person_img_size)
        self.flops_per_sample: Optional[float] = None
        self.fixed: Dict[str, torch.Tensor] = {}  # the batch whose reconstructions TensorBoard shows
        self.keys_log = None
        self.dropped = 0
        train = cfg.train
        return JobParts(self.model, param_groups_weight_decay(self.model, cfg.optim.weight_decay, NO_WEIGHT_DECAY),
                        cfg.data.batch_size, samples, train.epochs, train.precision, train.strategy,
                        train.deepspeed_config, train.max_nonfinite, train.ema_decay,
                        frozen=(self.teacher,) if self.teacher is not None else ())

    def train_loader(self):
        """One loader for the whole run; each rank gets the same number of batches per epoch."""
        return build_loader(self.cfg.data, self.transform, self.sources,
                            batches=self.steps_per_epoch * self.cfg.optim.accum_steps, seed=self.cfg.run.seed,
                            epoch=self.epoch, rank=self.env.rank, world_size=self.env.world_size,
                            teacher_cache=self.cache)

    def no_batch(self, loader) -> str:
        return (f"rank {self.env.rank}: a whole pass over its {loader.num_shards} shards of {self.cfg.data.train} "
                f"gave no batch of {self.cfg.data.batch_size} (unreadable shards or too few samples; the "
                f"warnings above name each shard that failed)")

    def prepare(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """uint8 views -> normalised floats; a live teacher's embeddings of the scene view and the text, under the
        step's autocast and no grad (the same fields a teacher cache brings)."""
        batch = normalize_views(batch, self.view_dtype)
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.precision, self.device):
                batch.update(self.teacher_embeddings(batch["image"], batch["text"]))
        return batch

    def teacher_embeddings(self, image: torch.Tensor, text: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"clip_image": self.teacher.encode_image(image), "clip_text": self.teacher.encode_text(text)}

    def forward(self, model, batch):
        if self.keys_log is not None:
            step = self.state.step
            self.keys_log.write(json.dumps({"step": step, "epoch": (step - 1) // self.steps_per_epoch,
                                            "keys": batch["key"], "worker_pid": batch.get("worker_pid")}) + "\n")
        out = model(batch)
        return out.loss, out.terms, out

    def count_step_flops(self, batch: Dict[str, Any]) -> int:
        """FLOPs of one step on this batch: the student's forward (three times, with its backward) and a live
        teacher's (once), counted under the step's autocast with one rule (runtime.flops)."""
        model = self.strategy.module

        def teacher():
            self.teacher_embeddings(batch["image"], batch["text"])
        # the counting forward draws masks: on a forked RNG, so a resumed run draws what an uninterrupted one does;
        # compiled blocks run eagerly for it (the counter sees the eager ops)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                torch.compiler.set_stance("force_eager"):
            return training_step_flops(lambda: model(batch), teacher if self.teacher is not None else None,
                                       context=lambda: autocast(self.precision, self.device))

    def on_start(self, state: TrainState) -> None:
        if state.step < self.total_steps:
            log.info("training steps %d..%d (%d per epoch), %d samples per step, lr %.3g, %s, %s", state.step + 1,
                     self.total_steps, self.steps_per_epoch, self.samples_per_step, self.lr, self.strategy.name,
                     self.precision)
        if self.cfg.debug.record_keys:
            (self.run_dir / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_log = open(self.run_dir / "keys" / f"rank{self.env.rank}.jsonl", "a", buffering=1)

    def close(self) -> None:
        if self.keys_log is not None:
            self.keys_log.close()
            self.keys_log = None

    def on_first_batch(self, batch: Dict[str, Any]) -> None:
        """FLOPs of a step (for MFU) and the fixed reconstruction batch, once."""
        self.flops_per_sample = self.count_step_flops(batch) / self.cfg.data.batch_size
        self.fixed = {"image": batch["image"][:8].detach().clone(),
                      "noise": torch.rand(min(8, batch["image"].shape[0]), self.model.mae.num_patches,
                                          generator=torch.Generator().manual_seed(0)).to(self.device)}

    def window_scalars(self, state: TrainState, window: Dict[str, float], lr: float) -> Dict[str, float]:
        scalars = super().window_scalars(state, window, lr)
        if self.peak_tflops and self.flops_per_sample:
            scalars["perf/mfu"] = self.flops_per_sample * window["perf/img_per_s"] / self.env.world_size / (
                self.peak_tflops * 1e12)
        return scalars

    def busy_step(self, step: int) -> bool:
        every = self.cfg.train.image_every
        return bool(every) and step % every == 0

    def after_step(self, state: TrainState, done, logger: MetricLogger) -> None:
        self.dropped += done.corrupt
        if self.busy_step(state.step) and self.env.is_main and self.fixed:
            logger.image("mae/reconstruction", reconstruction_grid(
                self.strategy.module.mae, self.fixed["image"], self.fixed["noise"], self.model.mask_ratio),
                state.step)

    def finish(self, state: TrainState, logger: MetricLogger, guard, start: int, stopped: bool) -> Dict[str, Any]:
        """The student's weights and result.json, also after a stop (the run's state so far)."""
        checksums = distributed.param_checksums(self.strategy.module)
        hosts = distributed.all_gather_object(socket.gethostname())
        dropped = int(distributed.all_reduce_sum(torch.tensor(float(self.dropped), device=self.device)).item())
        if self.env.is_main:
            export_weights(self.eval_module, self.run_dir / "weights.safetensors", state.step,
                           self.cfg.train.ema_decay)
            last = {name: s["last"] for name, s in state.summary.items()}
            if last:
                last["step"] = int(last["step"])
            summary = {"final_step": state.step, "total_steps": self.total_steps, "resumed_from_step": start,
                       "stopped_by_signal": guard.signal_name if stopped else None,
                       "skipped_steps": guard.skipped_total, "world_size": self.env.world_size,
                       "strategy": self.strategy.name, "ranks_in_sync": len(set(checksums)) == 1,
                       "param_checksums": checksums, "hosts": hosts, "dropped_in_this_run": dropped,
                       "last_window": last,
                       "history": state.summary}
            atomic_write_json(self.run_dir / "result.json", summary)
        return {"final_step": state.step, "stopped": stopped}
