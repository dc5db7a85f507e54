"""Linear probe: frozen encoder features extracted once, a grid of learning rates trained together on them,
the best on val reported on test (no BatchNorm: a plain linear head on the pooled, normalised features) and kept
with the encoder as best.safetensors, beside metrics.json and tb/."""
import logging
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.registry import MULTI_LABEL, SINGLE_LABEL, Task
from finetune.config import FinetuneConfig
from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
from finetune.encoder import create_encoder
from finetune.analysis import write_analysis
from finetune.engine import BEST
from finetune.losses import ccc_loss
from finetune.metrics import PRIMARY, compute_metrics
from finetune.predictions import THUMBNAILS, SplitPredictions, predict_split
from runtime import distributed
from pretrain.mae import arch_metadata
from runtime.atomic import atomic_save_safetensors, atomic_write_json
from runtime.checkpoint import CheckpointStore
from runtime.config import config_to_yaml
from runtime.device import resolve_device, with_loader_workers
from runtime.metric_logger import MetricLogger
from runtime.precision import resolve_precision
from runtime.run_dir import check_same_run, record_run
from runtime.seeding import seed_everything

log = logging.getLogger("finetune.linear_probe")


def probe_loss(task: Task, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-head losses summed over the heads: logits (G, N, C)."""
    if task == SINGLE_LABEL:
        g = logits.shape[0]
        return F.cross_entropy(logits.flatten(0, 1), targets.long().repeat(g), reduction="sum") / logits.shape[1]
    if task == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="sum") / (
            logits.shape[1] * logits.shape[2])
    return sum(F.mse_loss(l, targets) + ccc_loss(l, targets) for l in logits)


def train_probes(train_x: torch.Tensor, train_y: torch.Tensor, task: Task, num_outputs: int, lrs: List[float],
                 epochs: int, batch_size: int, seed: int) -> tuple:
    """One linear head per learning rate, trained in the same passes over the cached features (SGD with
    momentum, cosine decay): weights (G, C, D), biases (G, C)."""
    g = torch.Generator().manual_seed(seed)
    d = train_x.shape[1]
    weight = torch.zeros(len(lrs), num_outputs, d, requires_grad=True)
    bias = torch.zeros(len(lrs), num_outputs, requires_grad=True)
    lr_vec = torch.tensor(lrs).view(-1, 1, 1)
    optim = torch.optim.SGD([weight, bias], lr=1.0, momentum=0.9)  # per-head lr scales the gradients below
    steps = epochs * max(1, -(-len(train_x) // batch_size))
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for start in range(0, len(train_x), batch_size):
            idx = order[start:start + batch_size]
            logits = torch.einsum("nd,gcd->gnc", train_x[idx], weight) + bias[:, None, :]
            loss = probe_loss(task, logits, train_y[idx])
            optim.zero_grad()
            loss.backward()
            cosine = 0.5 * (1 + np.cos(np.pi * step / steps))
            weight.grad.mul_(lr_vec * cosine)
            bias.grad.mul_(lr_vec.view(-1, 1) * cosine)
            optim.step()
            step += 1
    return weight.detach(), bias.detach()


class LinearProbe:
    """Linear heads on the frozen encoder's features (one per learning rate), the best on val tested."""

    def __init__(self, cfg: FinetuneConfig, env: distributed.DistEnv):
        self.cfg, self.env = with_loader_workers(cfg), env
        self.device = resolve_device(self.env, cfg.run.device, cfg.train.precision)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.run_dir = Path(cfg.run.output_dir)
        check_same_run(self.run_dir, self.cfg, cfg.run.resume)  # e.g. a fine-tuning run's directory
        self.info = resolve_dataset(cfg.data.dataset, cfg.data.root, self.run_dir)
        seed_everything(cfg.run.seed)
        self.model, self.arch, self.source = create_encoder(cfg.encoder, len(self.info.classes))
        self.model.to(self.device)

    def run(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        record_run(self.run_dir, CheckpointStore(self.run_dir / "checkpoints"), cfg, self.env, dataset=info.name,
                    task=info.task, encoder_source=self.source, mode="linear_probe")
        _, eval_tf = make_transforms(self.model.patch_embed.img_size[0], cfg.aug)
        transform = LabelledTransform(eval_tf, info.task, len(info.classes))
        preds = {s: predict_split(self.model, eval_loader(info, s, transform, cfg.data), self.device, self.precision,
                                  features=True, thumbnails=THUMBNAILS if s == "test" else 0)
                 for s in ("train", "val", "test")}
        feats = {s: (torch.from_numpy(p.features), torch.from_numpy(p.targets)) for s, p in preds.items()}
        primary = PRIMARY[info.task]
        result: Dict[str, Any] = {}
        if self.env.is_main:  # the probes are small: rank 0 trains them all
            weight, bias = train_probes(*feats["train"], info.task, len(info.classes), cfg.train.probe_lrs,
                                        cfg.train.probe_epochs, max(64, cfg.data.batch_size), cfg.run.seed)

            def outputs(split, head):
                return (feats[split][0] @ weight[head].T + bias[head]).numpy()
            val = [compute_metrics(info.task, outputs("val", h), feats["val"][1].numpy(), info.classes)
                   for h in range(len(cfg.train.probe_lrs))]
            best = int(np.nanargmax([m[primary] for m in val]))
            test = compute_metrics(info.task, outputs("test", best), feats["test"][1].numpy(), info.classes)
            result = {"dataset": info.name, "task": info.task, "mode": "linear_probe", "primary_metric": primary,
                      "encoder_source": self.source, "best_lr": cfg.train.probe_lrs[best],
                      "val_by_lr": {str(lr): m[primary] for lr, m in zip(cfg.train.probe_lrs, val)},
                      "val": val[best], "test": test, "classes": info.classes, "stopped": False}
            self.save_classifier(weight[best], bias[best], val[best][primary])
            atomic_write_json(self.run_dir / "metrics.json", result)
            preds["test"].outputs = outputs("test", best)
            self.write_tensorboard(result, val, preds["test"])
            log.info("linear probe: best lr %g, val %s %.4f, test %.4f", result["best_lr"], primary,
                     val[best][primary], test[primary])
        return distributed.broadcast_object(result)

    def save_classifier(self, weight: torch.Tensor, bias: torch.Tensor, val_metric: float) -> None:
        """The frozen encoder with the best head, as fine-tuning's best.safetensors: predict, export and zero-shot
        read a probe run like a fine-tuning run (the head acts on the same pooled, fc_norm'ed features)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state["head.weight"], state["head.bias"] = weight.contiguous(), bias.contiguous()
        atomic_save_safetensors(state, self.run_dir / BEST, {"step": "0", PRIMARY[self.info.task]: str(val_metric),
                                                             **arch_metadata(self.arch)})

    def write_tensorboard(self, result: Dict[str, Any], val: List[Dict[str, Any]], test: SplitPredictions) -> None:
        """tb/ as fine-tuning writes it: the config, val and test of the chosen head, val for every lr; the
        confusion matrix, the mistakes and the embeddings of the test split."""
        primary = result["primary_metric"]
        logger = MetricLogger(self.run_dir / "tb")
        logger.text("config", "```\n" + config_to_yaml(self.cfg) + "```")
        logger.write_scalars(0, {f"val/{primary}": result["val"][primary], f"test/{primary}": result["test"][primary],
                                 **{f"probe/val_{primary}_lr_{lr:g}": m[primary]
                                    for lr, m in zip(self.cfg.train.probe_lrs, val)}})
        write_analysis(self.run_dir, test, result["test"], self.info.task, self.info.classes, logger, 0)
        logger.close()
