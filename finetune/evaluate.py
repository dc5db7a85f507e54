"""Evaluate only (`finetune/main.py --eval --checkpoint CKPT --dataset FI --data shards/FI`): a trained classifier
scored on val and test, each sample once across the ranks, with fine-tuning's metrics.json, predictions, confusion
matrix, gallery of mistakes and embeddings."""
import json
import logging
from pathlib import Path
from typing import Any, Dict

from finetune.analysis import write_analysis
from finetune.classifier import open_classifier
from finetune.config import FinetuneConfig
from finetune.data import LabelledTransform, eval_loader, resolve_dataset
from finetune.metrics import PRIMARY, compute_metrics
from finetune.predictions import THUMBNAILS, predict_split
from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.checkpoint import CheckpointError, CheckpointStore
from runtime.config import config_to_yaml
from runtime.device import resolve_device, with_loader_workers
from runtime.metric_logger import MetricLogger
from runtime.precision import resolve_precision
from runtime.run_dir import RunDirError, check_same_run, record_run

log = logging.getLogger("finetune.evaluate")


def refuse_other_results(run_dir: Path) -> None:
    """An evaluation never writes over the results of a training or probe run (its metrics.json, tb/, config)."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        try:
            mode = json.loads(metrics.read_text()).get("mode", "finetune")
        except (json.JSONDecodeError, AttributeError):
            mode = "unknown"
        if mode != "eval":
            raise RunDirError(f"{run_dir} holds the results of a {mode} run (metrics.json): set run.output_dir to a "
                              f"new directory for the evaluation")


class Evaluation:
    """A classifier (a fine-tuning or probe run, an export, a reference .pth) on one dataset's val and test."""

    def __init__(self, cfg: FinetuneConfig, env: distributed.DistEnv):
        self.cfg, self.env = with_loader_workers(cfg), env
        self.device = resolve_device(env, cfg.run.device, cfg.train.precision)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.run_dir = Path(cfg.run.output_dir)
        check_same_run(self.run_dir, self.cfg, cfg.run.resume)
        refuse_other_results(self.run_dir)
        self.info = resolve_dataset(cfg.data.dataset, cfg.data.root, self.run_dir)
        self.classifier = open_classifier(cfg.encoder.checkpoint, self.info.classes, self.info.task,
                                          cfg.encoder.preset)
        own = [c.lower() for c in self.classifier.classes]
        heads = self.classifier.model.head.weight.shape[0]
        # a head of the classes alone (a probe, a reference file) on shards with continuous values: classes only
        self.continuous = self.info.continuous if heads == self.info.num_outputs else []
        if own != [c.lower() for c in self.info.classes] or self.classifier.task != self.info.task \
                or heads != len(self.info.classes) + len(self.continuous):
            raise CheckpointError(f"{cfg.encoder.checkpoint} classifies {self.classifier.task} "
                                  f"{self.classifier.classes}, the shards in {self.info.root} hold {self.info.task} "
                                  f"{self.info.classes}: is it a classifier of {self.info.name}?")
        self.classifier.model.to(self.device)

    def run(self) -> Dict[str, Any]:
        cfg, info = self.cfg, self.info
        record_run(self.run_dir, CheckpointStore(self.run_dir / "checkpoints"), cfg, self.env, dataset=info.name,
                   task=info.task, encoder_source="eval", mode="eval", checkpoint=str(cfg.encoder.checkpoint))
        transform = LabelledTransform(self.classifier.transform, info.task, len(info.classes), self.continuous)
        scored, preds = {}, {}
        for split in ("val", "test"):
            preds[split] = predict_split(self.classifier.model, eval_loader(info, split, transform, cfg.data),
                                         self.device, self.precision, features=True,
                                         thumbnails=THUMBNAILS if split == "test" else 0)
            scored[split] = compute_metrics(info.task, preds[split].outputs, preds[split].targets, info.classes,
                                            self.continuous)
        primary = PRIMARY[info.task]
        result = {"dataset": info.name, "final_step": None, "best_epoch": None, "task": info.task,
                  "primary_metric": primary, "encoder_source": "eval", "val": scored["val"], "test": scored["test"],
                  "history": [], "train": {}, "classes": info.classes, "continuous": self.continuous,
                  "continuous_range": list(info.continuous_range), "world_size": self.env.world_size,
                  "stopped": False, "mode": "eval", "checkpoint": str(cfg.encoder.checkpoint)}
        if self.env.is_main:
            for split, pred in preds.items():
                pred.save(self.run_dir / f"predictions_{split}.npz")
            atomic_write_json(self.run_dir / "metrics.json", result)
            logger = MetricLogger(self.run_dir / "tb")
            logger.text("config", "```\n" + config_to_yaml(cfg) + "```")
            logger.write_scalars(0, {f"{s}/{primary}": scored[s][primary] for s in scored})
            write_analysis(self.run_dir, preds["test"], scored["test"], info.task, info.classes, logger, 0)
            logger.close()
            log.info("%s: val %s %.4f, test %.4f (%d / %d samples)", info.name, primary, scored["val"][primary],
                     scored["test"][primary], scored["val"]["n"], scored["test"]["n"])
        distributed.barrier()
        return result
