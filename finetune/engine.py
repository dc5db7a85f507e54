"""The fine-tuning loop: MAE's recipe (layer decay, Mixup/CutMix, RandAugment), evaluation every epoch, the
best-validation weights kept and tested at the end."""
import dataclasses
import logging
from typing import Any, Dict

import torch
from safetensors.torch import load_file
from timm.data import Mixup
from timm.optim import param_groups_layer_decay

from data_tools.registry import SINGLE_LABEL
from finetune.data import LabelledTransform, make_transforms
from finetune.encoder import create_encoder
from finetune.analysis import write_analysis
from finetune.labelled_job import LabelledJob
from finetune.predictions import THUMBNAILS, predict_split
from finetune.losses import make_criterion
from finetune.metrics import PRIMARY, compute_metrics
from pretrain.mae import arch_metadata
from runtime import distributed
from runtime.atomic import atomic_save_safetensors
from runtime.device import compile_blocks
from runtime.metric_logger import MetricLogger
from runtime.training import JobParts, TrainState

log = logging.getLogger("finetune")
BEST = "best.safetensors"


class Finetuning(LabelledJob):
    """One fine-tuning job on this rank: the encoder with a fresh head, MAE's recipe, best val weights tested."""

    name = "fine-tuning"

    def build(self) -> JobParts:
        cfg, info = self.cfg, self.resolve_dataset()
        n = len(info.classes)
        model, self.arch, self.source = create_encoder(cfg.encoder, info.num_outputs)
        torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head on the loaded encoder
        torch.nn.init.zeros_(model.head.bias)
        with torch.no_grad():  # continuous outputs (EMOTIC's V/A/D) start at the middle of their scale
            model.head.bias[n:] = sum(info.continuous_range) / 2
        self.img_size = model.patch_embed.img_size[0]
        if cfg.train.compile:
            compile_blocks(model.blocks)
        mixup_on = self.task == SINGLE_LABEL and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)
        self.mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, label_smoothing=cfg.aug.smoothing,
                           num_classes=n) if mixup_on else None
        self.criterion = make_criterion(self.task, mixup_on, cfg.aug.smoothing, n, info.continuous_range)
        train_tf, eval_tf = make_transforms(self.img_size, cfg.aug)
        self.train_transform = LabelledTransform(train_tf, self.task, n, info.continuous)
        self.eval_transform = LabelledTransform(eval_tf, self.task, n, info.continuous)
        self.primary = PRIMARY[self.task]
        groups = param_groups_layer_decay(model, cfg.optim.weight_decay, model.no_weight_decay(),
                                          layer_decay=cfg.train.layer_decay)
        train = cfg.train
        return JobParts(model, groups, cfg.data.batch_size, info.sizes["train"], train.epochs, train.precision,
                        max_nonfinite=train.max_nonfinite, ema_decay=train.ema_decay)

    def forward(self, model, batch):
        images, targets = batch["image"], batch["target"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), {}, None

    def evaluate(self, split: str, save_predictions: bool = False) -> Dict[str, Any]:
        """Metrics of one split; with save_predictions (the test at the end) also its predictions, features and
        thumbnails, kept for write_results."""
        pred = predict_split(self.eval_module, self.eval_split(split), self.device, self.precision,
                             features=save_predictions, thumbnails=THUMBNAILS if save_predictions else 0)
        if save_predictions:
            self.test_predictions = pred
            if self.env.is_main:  # for error analysis, and to recompute any metric
                pred.save(self.run_dir / f"predictions_{split}.npz")
        return compute_metrics(self.task, pred.outputs, pred.targets, self.info.classes, self.info.continuous)

    def run_metadata(self) -> Dict[str, Any]:
        return {"dataset": self.info.name, "task": self.task, "encoder_source": self.source,
                "steps_per_epoch": self.steps_per_epoch}

    def on_start(self, state: TrainState) -> None:
        state.extra.update(arch=dataclasses.asdict(self.arch), classes=self.info.classes, task=self.task)
        log.info("%s (%s): %d classes, %d train / %d val / %d test; encoder from %s; steps %s (%d per epoch)",
                 self.info.name, self.task, len(self.info.classes), self.info.sizes["train"], self.info.sizes["val"],
                 self.info.sizes["test"], self.source, f"{state.step + 1}..{self.total_steps}"
                 if state.step < self.total_steps else "all done", self.steps_per_epoch)

    def save_best(self, metrics: Dict[str, Any], step: int) -> None:
        if self.env.is_main:
            ema = {"ema_decay": str(self.cfg.train.ema_decay)} if self.ema is not None else {}
            atomic_save_safetensors(self.eval_module.state_dict(), self.run_dir / BEST,
                                    {"step": str(step), self.primary: str(metrics[self.primary]),
                                     **arch_metadata(self.arch), **ema})
        distributed.barrier()

    def load_best(self) -> None:
        self.eval_module.load_state_dict(load_file(str(self.run_dir / BEST)))

    def results(self, state: TrainState, test: Dict[str, Any]) -> Dict[str, Any]:
        return {"task": self.task, "primary_metric": self.primary, "encoder_source": self.source,
                "val": state.best["val"], "test": test, "continuous": self.info.continuous,
                "continuous_range": list(self.info.continuous_range)}

    def write_results(self, state: TrainState, test: Dict[str, Any], logger: MetricLogger) -> None:
        """The confusion matrix (CSV, PNG, TensorBoard), the gallery of mistakes, the embeddings."""
        write_analysis(self.run_dir, self.test_predictions, test, self.task, self.info.classes, logger, state.step)
        log.info("test %s %.4f (best val %.4f at epoch %s)", self.primary, test[self.primary], state.best["metric"],
                 state.best["epoch"])
