"""The teacher-adaptation job: fine-tuning's loop with an open_clip model, ClipLoss on image/prompt pairs,
class-balanced draws and zero-shot evaluation (configured and launched by finetune.adapt_teacher)."""
import dataclasses
import json
import logging
import random
from typing import Any, Dict, List, Optional, Sequence

import open_clip
import torch
from safetensors.torch import load_file
from torch import nn

from data_tools.registry import REGRESSION, SINGLE_LABEL
from data_tools.text import label_text
from finetune.data import LabelledTransform, make_transforms
from finetune.labelled_job import LabelledJob
from finetune.predictions import predict_split
from finetune.metrics import compute_metrics
from finetune.zeroshot import label_embeddings, resolve_templates
from pretrain.cache_teacher import center_view
from pretrain.teacher import CLIPTeacher
from runtime import distributed
from runtime.atomic import atomic_save_safetensors
from runtime.training import JobParts, TrainState

log = logging.getLogger("finetune.adapt_teacher")
TEACHER_FILE = "teacher.safetensors"


class BalancedClasses:
    """Keeps a sample of class c with probability (smallest class count) / count(c): every class is drawn equally
    often (picklable for loader workers; torch's per-worker seed drives it)."""

    def __init__(self, counts: Sequence[int]):
        smallest = min(c for c in counts if c > 0)
        self.keep = [smallest / c if c else 0.0 for c in counts]

    def __call__(self, label: int) -> bool:
        return torch.rand(1).item() < self.keep[label]


class PromptedTransform:
    """Decoded sample -> {'image', 'label', 'key'}, the label one of the record's classes (multi-label: a random
    positive one), or None for a sample the balancing skips (the reader drops it uncounted)."""

    def __init__(self, view, num_classes: int, balance: Optional[BalancedClasses]):
        self.view, self.num_classes, self.balance = view, num_classes, balance

    def label(self, meta: Dict[str, Any]) -> int:
        labels = meta.get("labels")
        if isinstance(labels, list) and len(labels) == self.num_classes and any(labels):
            return random.choice([i for i, v in enumerate(labels) if v])
        label = meta.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_classes:
            raise ValueError(f"label {label!r} is not a class index in [0, {self.num_classes})")
        return label

    def __call__(self, sample: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        label = self.label(sample["meta"])
        if self.balance is not None and not self.balance(label):
            return None
        return {"image": self.view(sample["image"]), "label": label, "key": sample["__key__"]}


class ZeroShotHead(nn.Module):
    """Images -> cosine similarity to each class's averaged prompt embedding, through the teacher's own
    encode_image (the path finetune.zeroshot scores a teacher by)."""

    def __init__(self, teacher, class_text: torch.Tensor):
        super().__init__()
        self.teacher, self.class_text = teacher, class_text

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.encode_image(images) @ self.class_text.T


def class_counts(info, classes: List[str]) -> List[int]:
    """Training samples per class, from the shards' info.json."""
    splits = json.loads((info.root / "info.json").read_text())["splits"]
    per_class = splits["train"].get("classes", {})
    return [int(per_class.get(c, 0)) for c in classes]



class TeacherAdaptation(LabelledJob):
    """The labelled jobs' loop (resume, guarded steps, checkpoints, TensorBoard, per-epoch validation, best kept)
    with an open_clip model, ClipLoss on image/prompt pairs and zero-shot evaluation."""

    name = "teacher adaptation"

    def build(self) -> JobParts:
        cfg, info = self.cfg, self.resolve_dataset()
        if info.task == REGRESSION:
            raise ValueError(f"{info.name} is a regression set: adaptation needs class labels")
        self.task, self.primary = SINGLE_LABEL, "top1"
        self.templates = list(resolve_templates(cfg.train.templates))
        self.teacher = CLIPTeacher(cfg.teacher.arch, cfg.teacher.checkpoint)
        model = self.teacher.model
        model.requires_grad_(True)
        if cfg.train.freeze_text:
            model.lock_text_tower()
        if cfg.train.vision_unlocked_groups is not None:
            model.lock_image_tower(unlocked_groups=cfg.train.vision_unlocked_groups)
        self.source = f"open_clip {self.teacher.arch} from {cfg.teacher.checkpoint}"
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in trainable)
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # gains, biases, logit_scale
        self.loss = open_clip.ClipLoss(rank=self.env.rank, world_size=self.env.world_size)
        train_view = make_transforms(self.teacher.image_size, cfg.aug)[0]
        balance = BalancedClasses(class_counts(info, info.classes)) if cfg.train.balanced else None
        self.train_transform = PromptedTransform(train_view, len(info.classes), balance)
        self.eval_transform = LabelledTransform(center_view(self.teacher.image_size), SINGLE_LABEL, len(info.classes))
        self.before: Dict[str, Any] = {}
        return JobParts(model, groups, cfg.data.batch_size, info.sizes["train"], cfg.train.epochs,
                        cfg.train.precision, max_nonfinite=cfg.train.max_nonfinite, frozen=(self.teacher,))

    def forward(self, model, batch):
        prompts = [random.choice(self.templates).format(label_text(self.info.classes[int(c)]))
                   for c in batch["label"]]
        tokens = self.teacher.tokenize(prompts).to(self.device)
        out = model(image=self.teacher.to_clip_input(batch["image"]), text=tokens)
        image_features, text_features, logit_scale = (out["image_features"], out["text_features"],
                                                      out["logit_scale"]) if isinstance(out, dict) else out[:3]
        return self.loss(image_features, text_features, logit_scale), {}, None

    def evaluate(self, split: str, save_predictions: bool = False) -> Dict[str, Any]:
        was_training = self.teacher.model.training
        self.teacher.model.eval()
        text = label_embeddings(self.teacher, self.info.classes, self.templates)
        pred = predict_split(ZeroShotHead(self.teacher, text), self.eval_split(split), self.device, "fp32")
        self.teacher.model.train(was_training)
        return compute_metrics(SINGLE_LABEL, pred.outputs, pred.targets, self.info.classes)

    def run_metadata(self) -> Dict[str, Any]:
        return {"dataset": self.info.name, "task": self.task, "teacher": self.source,
                "steps_per_epoch": self.steps_per_epoch}

    def on_start(self, state: TrainState) -> None:
        self.teacher.model.train()
        self.before = state.extra.get("before") or {split: self.evaluate(split) for split in ("val", "test")}
        state.extra.update(before=self.before, teacher_arch=self.teacher.arch)
        log.info("before adaptation: zero-shot val top1 %.4f, test top1 %.4f (%d trainable parameters)",
                 self.before["val"]["top1"], self.before["test"]["top1"], self.trainable)

    def save_best(self, metrics: Dict[str, Any], step: int) -> None:
        if self.env.is_main:
            atomic_save_safetensors(self.teacher.model.state_dict(), self.run_dir / TEACHER_FILE,
                                    {"step": str(step), "val_top1": str(metrics["top1"]),
                                     "arch": self.teacher.arch})
        distributed.barrier()

    def load_best(self) -> None:
        self.teacher.model.load_state_dict(load_file(str(self.run_dir / TEACHER_FILE)))

    def results(self, state: TrainState, test: Dict[str, Any]) -> Dict[str, Any]:
        return {"teacher": dataclasses.asdict(self.cfg.teacher),
                "teacher_file": str((self.run_dir / TEACHER_FILE).resolve()), "templates": self.templates,
                "before": self.before, "after": {"val": state.best["val"], "test": test}}

    def write_results(self, state: TrainState, test: Dict[str, Any], logger) -> None:
        log.info("zero-shot top1: val %.4f -> %.4f, test %.4f -> %.4f; %s", self.before["val"]["top1"],
                 state.best["val"]["top1"], self.before["test"]["top1"], test["top1"], self.run_dir / TEACHER_FILE)
