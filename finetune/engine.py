"""The fine-tuning loop: MAE's recipe (layer decay, Mixup/CutMix, RandAugment), evaluation every epoch, the
best-validation weights kept and tested at the end."""
import csv
import dataclasses
import io
import logging
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from timm.data import Mixup
from timm.optim import param_groups_layer_decay

from data_tools.reader import SharedEpoch, epoch_stream
from data_tools.registry import SINGLE_LABEL
from finetune.config import FinetuneConfig
from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset, train_loader
from finetune.encoder import create_encoder
from finetune.losses import make_criterion
from finetune.metrics import PRIMARY, compute_metrics
from pretrain.mae import arch_metadata
from runtime import distributed
from runtime.atomic import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, atomic_write_text
from runtime.checkpoint import CheckpointStore
from runtime.config import with_scaled_lr
from runtime.device import compile_blocks
from runtime.guard import StopRequest
from runtime.metric_logger import MetricLogger
from runtime.optim import adamw
from runtime.precision import autocast
from runtime.seeding import seed_everything
from runtime.strategy import DDPStrategy
from runtime.training import TrainingJob, TrainState

log = logging.getLogger("finetune")
BEST = "best.safetensors"


@torch.no_grad()
def predict_split(model: torch.nn.Module, loader, device: torch.device, precision: str):
    """(outputs, targets, keys) of one split, gathered from every rank (each sample was read by one rank)."""
    was_training = model.training
    model.eval()
    outputs, targets, keys = [], [], []
    if loader is not None:
        for batch in loader:
            with autocast(precision, device):
                out = model(batch["image"].to(device, non_blocking=True))
            outputs.append(out.float().cpu())
            targets.append(torch.as_tensor(batch["target"]).float())
            keys += list(batch["key"])
    model.train(was_training)
    local = (torch.cat(outputs).numpy() if outputs else None, torch.cat(targets).numpy() if targets else None, keys)
    parts = [p for p in distributed.all_gather_object(local) if p[0] is not None]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), sum((p[2] for p in parts), [])


def confusion_image(cm, classes) -> torch.Tensor:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)), dpi=80)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    arr = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class Finetuning(TrainingJob):
    """One fine-tuning job on this rank. `on_epoch(epoch, val_metrics)` is called on every rank after each
    evaluation (Ray Tune reports through it)."""

    name = "fine-tuning"

    def __init__(self, cfg: FinetuneConfig, env: distributed.DistEnv, stop: Optional[StopRequest] = None,
                 on_epoch: Optional[Callable[[int, Dict], None]] = None):
        super().__init__(with_scaled_lr(cfg, cfg.data.batch_size, env.world_size), env, stop, cfg.debug,
                         cfg.train.precision)
        cfg, self.on_epoch = self.cfg, on_epoch
        self.lr, self.max_nonfinite, self.batch_size = cfg.optim.lr, cfg.train.max_nonfinite, cfg.data.batch_size
        self.info = resolve_dataset(cfg.data.dataset, cfg.data.root, self.run_dir)
        self.task = self.info.task
        seed_everything(cfg.run.seed)
        model, self.arch, self.source = create_encoder(cfg.encoder, len(self.info.classes))
        torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head on the loaded encoder
        torch.nn.init.zeros_(model.head.bias)
        self.img_size = model.patch_embed.img_size[0]
        if cfg.train.compile:
            compile_blocks(model.blocks)
        self.steps_per_epoch = max(1, self.info.sizes["train"] // self.samples_per_step)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        groups = param_groups_layer_decay(model, cfg.optim.weight_decay, model.no_weight_decay(),
                                          layer_decay=cfg.train.layer_decay)
        optimizer = adamw(groups, cfg.optim)
        self.strategy = DDPStrategy(model, optimizer, self.device, cfg.optim.accum_steps, cfg.optim.clip_grad,
                                    self.precision)
        mixup_on = self.task == SINGLE_LABEL and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)
        self.mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, label_smoothing=cfg.aug.smoothing,
                           num_classes=len(self.info.classes)) if mixup_on else None
        self.criterion = make_criterion(self.task, mixup_on, cfg.aug.smoothing)
        train_tf, eval_tf = make_transforms(self.img_size, cfg.aug)
        n = len(self.info.classes)
        self.train_transform = LabelledTransform(train_tf, self.task, n)
        self.eval_transform = LabelledTransform(eval_tf, self.task, n)
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every)
        self.primary = PRIMARY[self.task]
        seed_everything(cfg.run.seed + 1000 * self.env.rank)
        self.epoch = SharedEpoch()

    def forward(self, model, batch):
        images, targets = batch["image"], batch["target"]
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), {}, None

    def evaluate(self, split: str, save_predictions: bool = False) -> Dict[str, Any]:
        loader = eval_loader(self.info, split, self.eval_transform, self.cfg.data)
        outputs, targets, keys = predict_split(self.strategy.module, loader, self.device, self.precision)
        if save_predictions and self.env.is_main:  # for error analysis, and to recompute any metric
            buf = io.BytesIO()
            np.savez(buf, outputs=outputs, targets=targets, keys=np.array(keys))
            atomic_write_bytes(self.run_dir / f"predictions_{split}.npz", buf.getvalue())
        return compute_metrics(self.task, outputs, targets, self.info.classes)

    def batches(self, start_step: int):
        loader = train_loader(self.info, self.train_transform, self.cfg.data,
                              batches=self.steps_per_epoch * self.cfg.optim.accum_steps, seed=self.cfg.run.seed,
                              epoch=self.epoch)
        return epoch_stream(loader, self.steps_per_epoch, self.cfg.optim.accum_steps, start_step, self.epoch,
                            lambda loader: f"the training shards of {self.info.name} in {self.info.root} gave no "
                                           f"batch of {self.cfg.data.batch_size} in a whole pass")

    def run_metadata(self) -> Dict[str, Any]:
        return {"dataset": self.info.name, "task": self.task, "encoder_source": self.source,
                "steps_per_epoch": self.steps_per_epoch}

    def on_start(self, state: TrainState) -> None:
        state.extra.update(arch=dataclasses.asdict(self.arch), classes=self.info.classes, task=self.task)
        log.info("%s (%s): %d classes, %d train / %d val / %d test; encoder from %s; steps %s (%d per epoch)",
                 self.info.name, self.task, len(self.info.classes), self.info.sizes["train"], self.info.sizes["val"],
                 self.info.sizes["test"], self.source, f"{state.step + 1}..{self.total_steps}"
                 if state.step < self.total_steps else "all done", self.steps_per_epoch)

    def checkpoint_due(self, step: int) -> bool:
        return super().checkpoint_due(step) or step % self.steps_per_epoch == 0

    def busy_step(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0  # evaluates on val

    def save_best(self, metrics: Dict[str, Any], step: int) -> None:
        if self.env.is_main:
            atomic_save_safetensors(self.strategy.module.state_dict(), self.run_dir / BEST,
                                    {"step": str(step), self.primary: str(metrics[self.primary]),
                                     **arch_metadata(self.arch)})
        distributed.barrier()

    def after_step(self, state: TrainState, done, logger: MetricLogger) -> None:
        """At the end of an epoch: evaluate on val, keep the best weights."""
        if state.step % self.steps_per_epoch:
            return
        epoch, best = state.step // self.steps_per_epoch, state.best
        val = self.evaluate("val")
        state.history.append({"epoch": epoch, "step": state.step, f"val_{self.primary}": val[self.primary]})
        logger.write_scalars(state.step, {f"val/{self.primary}": val[self.primary],
                                          **({"val/top3": val["top3"], "val/macro_f1": val["macro_f1"]}
                                             if self.task == SINGLE_LABEL else {})})
        if best["metric"] is None or val[self.primary] > best["metric"]:
            best = state.best = {"epoch": epoch, "metric": val[self.primary], "val": val}
            self.save_best(val, state.step)
        log.info("epoch %d: val %s %.4f (best %.4f at epoch %d)", epoch, self.primary, val[self.primary],
                 best["metric"], best["epoch"])
        if self.on_epoch is not None:
            self.on_epoch(epoch, val)

    def finish(self, state: TrainState, logger: MetricLogger, guard, start: int, stopped: bool) -> Dict[str, Any]:
        """Test the best-validation weights; write metrics.json, the confusion matrix (CSV, TensorBoard)."""
        if stopped:
            return {"final_step": state.step, "stopped": True}
        self.strategy.module.load_state_dict(load_file(str(self.run_dir / BEST)))
        test = self.evaluate("test", save_predictions=True)
        logger.write_scalars(state.step, {f"test/{self.primary}": test[self.primary]})
        best = state.best
        result = {"dataset": self.info.name, "task": self.task, "primary_metric": self.primary,
                  "encoder_source": self.source, "final_step": state.step, "best_epoch": best["epoch"],
                  "val": best["val"], "test": test, "history": state.history, "train": state.summary,
                  "classes": self.info.classes, "world_size": self.env.world_size, "stopped": False}
        if self.env.is_main:
            atomic_write_json(self.run_dir / "metrics.json", result)
            if self.task == SINGLE_LABEL:
                rows = [["true\\predicted", *self.info.classes]] + [[c, *r] for c, r in
                                                                    zip(self.info.classes, test["confusion"])]
                buf = io.StringIO()
                csv.writer(buf).writerows(rows)
                atomic_write_text(self.run_dir / "confusion_test.csv", buf.getvalue())
                logger.image("test/confusion", confusion_image(test["confusion"], self.info.classes), state.step)
            log.info("test %s %.4f (best val %.4f at epoch %s)", self.primary, test[self.primary], best["metric"],
                     best["epoch"])
        return result
