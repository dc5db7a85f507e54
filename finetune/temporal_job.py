"""The temporal valence/arousal jobs on the training skeleton. Stage 2 (`TemporalRegression`): a random window per
clip chunk, masked MSE + (1 - CCC), val scored after every epoch from stitched overlapping windows (every frame once,
gathered over the ranks by clip and frame), the best weights kept and tested beside the reference predictors.
Stage 1 (`TemporalPretraining`): the contrastive terms over frames, the queue checkpointed with the run."""
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.cache_frames import check_frame_cache, frame_view
from finetune.labelled_job import LabelledJob
from finetune.temporal import stitch, va_loss
from finetune.temporal_contrastive import EmbeddingQueue, clip_ids, global_infonce, local_infonce, smoothness
from finetune.temporal_data import ClipTransform, gather_clips, resolve_frames
from finetune.temporal_metrics import Clip, clip_mean_oracle, temporal_metrics, train_mean_predictor
from finetune.temporal_model import (ClipModel, assemble_clip_model, encoder_identity, load_trainable_state,
                                     param_groups, stitched_frames, trainable_state)
from finetune.data import eval_loader, train_loader
from runtime import distributed
from runtime.atomic import atomic_save_safetensors, atomic_write_json
from runtime.device import to_device
from runtime.metric_logger import MetricLogger
from runtime.precision import autocast
from runtime.training import JobParts, TrainingJob, TrainState

log = logging.getLogger("finetune.temporal")
BEST = "best.safetensors"
STAGE1 = "stage1.safetensors"


class ClipJobMixin:
    """What both stages share: the clip-chunk data, the model the config asks for, the loaders."""

    def build_model(self, with_head: bool) -> ClipModel:
        cfg, t = self.cfg, self.cfg.temporal
        self.info = resolve_frames(cfg.data.dataset, cfg.data.root)
        self.task = self.info.task
        self.cached = t.encoder_mode == "cached"
        model, encoder, self.arch, self.source = assemble_clip_model(cfg, with_head, self.cached)
        self.img_size = int(encoder.patch_embed.img_size[0])
        if self.cached:
            check_frame_cache(cfg.data.cache, self.info, encoder_identity(encoder, self.source, self.arch))
        if t.stage1:
            path = Path(t.stage1)
            path = path / STAGE1 if path.is_dir() else path
            left = load_trainable_state(model, load_file(str(path)), str(path), allow_missing=True)
            log.info("stage 2 starts from %s (new: %d weights of the head)", path, len(left))
        view = frame_view(self.img_size)
        self.train_transform = ClipTransform(view, cfg.data.window, self.cached)
        self.eval_transform = ClipTransform(view, None, self.cached)
        return model

    def job_parts(self, model: ClipModel, **kwargs) -> JobParts:
        cfg, train = self.cfg, self.cfg.train
        return JobParts(model, param_groups(model, cfg.temporal, cfg.optim.weight_decay), cfg.data.batch_size,
                        self.info.sizes["train"], train.epochs, train.precision, train.strategy,
                        train.deepspeed_config, train.max_nonfinite, **kwargs)

    def reading(self, split: str) -> Dict[str, Any]:
        return {"image_format": "frames", **({"sidecar_dir": str(Path(self.cfg.data.cache) / split)}
                                             if self.cached else {})}

    def train_loader(self):
        return train_loader(self.info, self.train_transform, self.cfg.data,
                            batches=self.steps_per_epoch * self.cfg.optim.accum_steps, seed=self.cfg.run.seed,
                            epoch=self.epoch, **self.reading("train"))

    def no_batch(self, loader) -> str:
        return (f"the training chunks of {self.info.name} in {self.info.root} gave no batch of "
                f"{self.cfg.data.batch_size} in a whole pass")

    def run_metadata(self) -> Dict[str, Any]:
        return {"dataset": self.info.name, "task": self.task, "encoder_source": self.source,
                "encoder_mode": self.cfg.temporal.encoder_mode, "stage": self.cfg.train.stage,
                "steps_per_epoch": self.steps_per_epoch}


class TemporalRegression(ClipJobMixin, LabelledJob):
    """Stage 2: per-frame valence/arousal of clips."""

    name = "temporal"

    def resolve_dataset(self):
        return self.info

    def build(self) -> JobParts:
        model = self.build_model(with_head=True)
        self.primary = "ccc"
        return self.job_parts(model)

    def forward(self, model, batch):
        pred = model(batch["x"], batch["mask"])
        return va_loss(pred, batch["target"], batch["valid"]), {}, None

    def eval_split(self, split: str):
        return eval_loader(self.info, split, self.eval_transform, self.cfg.data, batch_size=1,
                           **self.reading(split))

    @torch.no_grad()
    def predict_chunks(self, split: str, embeddings: bool = False, shuffle_seed=None):
        """Every rank's chunks of `split`, each frame predicted from stitched windows (data.window long, every
        data.eval_stride) over features the encoder makes once per frame; with `shuffle_seed`, also the same
        features with each chunk's frames (and targets) permuted. Returns (rows, shuffled rows or None)."""
        model = self.eval_module
        was_training = model.training
        model.eval()
        loader = self.eval_split(split)
        rows, shuffled = [], []
        g = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        window, stride = self.cfg.data.window, self.cfg.data.eval_stride
        for batch in loader if loader is not None else []:
            batch = to_device(batch, self.device)
            target, valid = batch["target"][0].cpu().numpy(), batch["valid"][0].cpu().numpy()
            where = {"clip": batch["clip"][0], "start": int(batch["start"][0]), "key": batch["key"][0]}
            with autocast(self.precision, self.device):
                pred, feats = stitched_frames(model, batch["x"][0], window, stride)
                if g is not None:  # the encoder sees one frame at a time: shuffled frames, shuffled features
                    perm = g.permutation(len(feats))
                    shuffled.append({**where, "pred": stitch(model.head, feats[torch.from_numpy(perm).to(
                        feats.device)], window, stride).numpy(), "true": target[perm], "valid": valid[perm]})
            row = {**where, "pred": pred.numpy(), "true": target, "valid": valid}
            if embeddings:
                row["embedding"] = feats.float().mean(0).cpu().numpy()
            rows.append(row)
        if was_training:
            model.train()
        gathered = distributed.all_gather_object((rows, shuffled))
        return ([r for part, _ in gathered for r in part],
                [r for _, part in gathered for r in part] if g is not None else None)

    def evaluate(self, split: str, save_predictions: bool = False) -> Dict[str, Any]:
        control = save_predictions and self.cfg.temporal.shuffle_control
        rows, shuffled = self.predict_chunks(split, embeddings=save_predictions,
                                             shuffle_seed=self.cfg.run.seed if control else None)
        clips = gather_clips(rows)
        metrics = temporal_metrics(list(clips.values()), bootstrap=1000 if save_predictions else 0,
                                   seed=self.cfg.run.seed)
        if save_predictions:
            self.test_clips, self.test_rows = clips, rows
            metrics["references"] = self.references(clips)
            if control:
                metrics["references"]["frames shuffled at test"] = temporal_metrics(
                    list(gather_clips(shuffled).values()), bootstrap=1000, seed=self.cfg.run.seed)
        return metrics

    def references(self, clips: Dict[str, Clip]) -> Dict[str, Any]:
        """The rows that say what a score means: the train-mean constant and the clip-mean oracle."""
        truth = [Clip(np.zeros_like(c.true), c.true, c.valid) for c in clips.values()]
        refs = {"clip-mean oracle": temporal_metrics(clip_mean_oracle(truth), bootstrap=1000, seed=self.cfg.run.seed)}
        if self.info.train_mean is None:  # shards written before shard-frames recorded it: no row, not a wrong one
            log.warning("%s/info.json records no train mean (frames.train.target_mean): the train-mean reference is "
                        "left out; rewrite the shards with shard-frames to have it", self.info.root)
        else:
            refs["train-mean constant"] = temporal_metrics(train_mean_predictor(truth, self.info.train_mean),
                                                           bootstrap=1000, seed=self.cfg.run.seed)
        return refs

    def on_start(self, state: TrainState) -> None:
        state.extra.update(encoder_mode=self.cfg.temporal.encoder_mode, head=self.cfg.temporal.head)
        log.info("%s: %d train / %d val / %d test chunks; encoder %s (%s), head %s; steps %s (%d per epoch)",
                 self.info.name, self.info.sizes["train"], self.info.sizes["val"], self.info.sizes["test"],
                 self.source, self.cfg.temporal.encoder_mode, self.cfg.temporal.head,
                 f"{state.step + 1}..{self.total_steps}" if state.step < self.total_steps else "all done",
                 self.steps_per_epoch)

    def save_best(self, metrics: Dict[str, Any], step: int) -> None:
        if self.env.is_main:
            t = self.cfg.temporal
            atomic_save_safetensors(trainable_state(self.eval_module), self.run_dir / BEST,
                                    {"step": str(step), "ccc": str(metrics["ccc"]), "encoder_mode": t.encoder_mode,
                                     "head": t.head, "encoder_source": self.source})
        distributed.barrier()

    def load_best(self) -> None:
        load_trainable_state(self.eval_module, load_file(str(self.run_dir / BEST)), str(self.run_dir / BEST))

    def results(self, state: TrainState, test: Dict[str, Any]) -> Dict[str, Any]:
        references = test.pop("references", {})  # beside the test's figures, not inside them
        return {"task": self.task, "primary_metric": "ccc", "encoder_source": self.source,
                "encoder_mode": self.cfg.temporal.encoder_mode, "head": self.cfg.temporal.head,
                "val": state.best["val"], "test": test, "references": references}

    def write_results(self, state: TrainState, test: Dict[str, Any], logger: MetricLogger) -> None:
        from finetune.temporal_figures import write_figures
        write_figures(self.run_dir, self.test_clips, self.test_rows, state, logger)
        np.savez(self.run_dir / "predictions_test.npz",
                 **{f"{name}/{k}": v for name, c in self.test_clips.items()
                    for k, v in (("pred", c.pred), ("true", c.true), ("valid", c.valid))})
        log.info("test CCC %.4f pooled, %s per clip (best val %.4f at epoch %s)", test["ccc"],
                 "-" if test["ccc_per_clip"] is None else f"{test['ccc_per_clip']:.4f}", state.best["metric"],
                 state.best["epoch"])


class TemporalPretraining(ClipJobMixin, TrainingJob):
    """Stage 1: the encoder's adapters (or weights) and the frame projector trained by the contrastive terms."""

    name = "temporal stage 1"

    def build(self) -> JobParts:
        model = self.build_model(with_head=False)
        self.queue = EmbeddingQueue(self.cfg.contrastive.queue, self.cfg.contrastive.dim)
        return self.job_parts(model, states={"queue": self.queue})

    def on_start(self, state: TrainState) -> None:
        self.queue.to(self.device)

    def forward(self, model, batch):
        c = self.cfg.contrastive
        mask, va, valid = batch["mask"], batch["target"], batch["valid"]
        z = model(batch["x"], mask)  # through DDP / DeepSpeed: the head-less model gives the frame embeddings
        ids = clip_ids(batch["clip"], z.device)
        queue_z, queue_ids = self.queue.contents()
        local = local_infonce(z, mask, va, valid, ids, queue_z, queue_ids, c.local_temperature, c.va_sigma)
        glob = global_infonce(z, mask, va, valid, ids, c.global_temperature, c.va_sigma)
        smooth = smoothness(z, mask)
        # every frame of the window, padded ones with the id of no clip (-1): every rank pushes as many rows
        frame_ids = ids.repeat_interleave(z.shape[1])
        self.queue.push(z.reshape(-1, z.shape[-1]), torch.where(mask.reshape(-1), frame_ids, -1))
        loss = local + c.global_weight * glob + c.smooth_weight * smooth
        return loss, {"local": local.detach(), "global": glob.detach(), "smooth": smooth.detach()}, None

    def finish(self, state: TrainState, logger: MetricLogger, guard, start: int, stopped: bool) -> Dict[str, Any]:
        if stopped:
            return {"final_step": state.step, "stopped": True}
        result = {"dataset": self.info.name, "stage": 1, "final_step": state.step, "train": state.summary,
                  "encoder_mode": self.cfg.temporal.encoder_mode, "world_size": self.env.world_size,
                  "stopped": False}
        if self.env.is_main:
            atomic_save_safetensors(trainable_state(self.strategy.module), self.run_dir / STAGE1,
                                    {"step": str(state.step), "encoder_mode": self.cfg.temporal.encoder_mode,
                                     "encoder_source": self.source})
            atomic_write_json(self.run_dir / "metrics.json", result)
        return result
