"""Teacher adaptation: contrastive fine-tuning of an open_clip teacher on labelled shards with emotion prompts,
before it is distilled (stage 1 of adapt teacher -> pretrain with it -> fine-tune).

    torchrun --nproc_per_node 2 -m finetune.adapt_teacher --dataset FI --data shards/FI \
        teacher.arch=ViT-B-16 teacher.checkpoint=/models/clip_b16.bin run.output_dir=runs/teacher_fi
    # then: pretrain/main.py ... teacher.checkpoint=runs/teacher_fi/teacher.safetensors

Each image is paired with its class's prompt ("a photo that conveys {emotion}.", a template drawn at random per
sample; for a multi-label record, one of its labels) and trained with open_clip's ClipLoss, on class-balanced
draws. Zero-shot top-1 on val (the templates averaged per class, as finetune.zeroshot scores a teacher) is measured
before training and after every epoch; the best epoch's weights are written as `teacher.safetensors`, an open_clip
state dict that `teacher.checkpoint=` loads unchanged, and its zero-shot test metrics to metrics.json.
"""
import argparse
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from finetune.config import AugmentConfig, FinetuneDataConfig  # noqa: E402
from runtime.config import DebugConfig, OptimConfig, RunConfig  # noqa: E402

log = logging.getLogger("finetune.adapt_teacher")
TEACHER_FILE = "teacher.safetensors"


@dataclass
class AdaptTeacherConfig:
    arch: str = "ViT-B-16"              # open_clip model name or model-config .json
    checkpoint: str = "random"          # the teacher's local weights file ("random": plumbing tests only)


@dataclass
class AdaptTrainConfig:
    epochs: int = 10
    templates: str = "emotion"          # finetune.zeroshot template set (emotion, object) or a file, one per line
    freeze_text: bool = True            # keep the text tower as it is (open_clip's lock_text_tower)
    vision_unlocked_groups: Optional[int] = None  # train only the last k groups of the image tower (None: all)
    balanced: bool = True               # class-balanced draws (each class equally often per epoch)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_nonfinite: int = 3


@dataclass
class AdaptConfig:
    run: RunConfig
    data: FinetuneDataConfig
    teacher: AdaptTeacherConfig = field(default_factory=AdaptTeacherConfig)
    aug: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        auto_augment=None, crop_scale=(0.5, 1.0), re_prob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, crop_pct=1.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-5, weight_decay=0.1, betas=(0.9, 0.98),
                                                                   warmup_epochs=1, min_lr=0.0))
    train: AdaptTrainConfig = field(default_factory=AdaptTrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


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
    positive one); samples that balancing skips raise SkippedSample (not counted as bad)."""

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
    import json
    splits = json.loads((info.root / "info.json").read_text())["splits"]
    per_class = splits["train"].get("classes", {})
    return [int(per_class.get(c, 0)) for c in classes]


def build(cfg: AdaptConfig):
    """The adaptation job (imported late: torch, open_clip and the trainers load only when it runs)."""
    import dataclasses

    import open_clip
    from safetensors.torch import load_file

    from data_tools.reader import SharedEpoch
    from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
    from finetune.engine import Finetuning, predict_split
    from finetune.metrics import compute_metrics
    from finetune.zeroshot import label_embeddings, label_text, resolve_templates
    from pretrain.cache_teacher import center_view
    from pretrain.teacher import CLIPTeacher
    from runtime import distributed
    from runtime.atomic import atomic_save_safetensors, atomic_write_json
    from runtime.checkpoint import CheckpointStore
    from runtime.config import scaled_lr
    from runtime.optim import adamw
    from runtime.precision import resolve_precision
    from runtime.seeding import seed_everything
    from runtime.strategy import DDPStrategy

    class TeacherAdaptation(Finetuning):
        """Finetuning's loop (resume, guarded steps, checkpoints, TensorBoard, per-epoch validation, best kept)
        with an open_clip model, ClipLoss on image/prompt pairs and zero-shot evaluation."""

        def __init__(self, cfg: AdaptConfig):  # noqa: super().__init__ builds a classifier: not wanted here
            self.cfg, self.on_epoch = cfg, None
            if cfg.aug.mixup or cfg.aug.cutmix or cfg.aug.smoothing:
                raise ValueError("aug.mixup, aug.cutmix and aug.smoothing have no meaning for contrastive "
                                 "adaptation: set them to 0")
            self.env = distributed.init_distributed(distributed.resolve_env(), cfg.run.dist_timeout_s)
            self.device = distributed.default_device(self.env)
            self.precision = resolve_precision(cfg.train.precision, self.device)
            self.run_dir = Path(cfg.run.output_dir)
            self.info = resolve_dataset(cfg.data.dataset, cfg.data.root, self.run_dir)
            if self.info.task == "regression":
                raise ValueError(f"{self.info.name} is a regression set: adaptation needs class labels")
            self.task, self.primary = "single_label", "top1"
            self.templates = list(resolve_templates(cfg.train.templates))
            seed_everything(cfg.run.seed)
            self.teacher = CLIPTeacher(cfg.teacher.arch, cfg.teacher.checkpoint)
            model = self.teacher.model
            model.requires_grad_(True)
            if cfg.train.freeze_text:
                model.lock_text_tower()
            if cfg.train.vision_unlocked_groups is not None:
                model.lock_image_tower(unlocked_groups=cfg.train.vision_unlocked_groups)
            self.source = f"open_clip {self.teacher.arch} from {cfg.teacher.checkpoint}"
            world, batch = self.env.world_size, cfg.data.batch_size
            self.steps_per_epoch = max(1, self.info.sizes["train"] // (batch * cfg.optim.accum_steps * world))
            self.total_steps = cfg.train.epochs * self.steps_per_epoch
            cfg.optim.lr = scaled_lr(cfg.optim, batch, world)
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.trainable = sum(p.numel() for p in trainable)
            decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on gains, biases, logit_scale
            rest = [p for p in trainable if p.ndim < 2]
            optimizer = adamw([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                               {"params": rest, "weight_decay": 0.0}], cfg.optim)
            self.strategy = DDPStrategy(model, optimizer, self.device, cfg.optim.accum_steps, cfg.optim.clip_grad)
            self.teacher.to(self.device)
            self.loss = open_clip.ClipLoss(rank=self.env.rank, world_size=self.env.world_size)
            train_view = make_transforms(self.teacher.image_size, cfg.aug)[0]
            balance = BalancedClasses(class_counts(self.info, self.info.classes)) if cfg.train.balanced else None
            self.train_transform = PromptedTransform(train_view, len(self.info.classes), balance)
            self.eval_transform = LabelledTransform(center_view(self.teacher.image_size), "single_label",
                                                    len(self.info.classes))
            self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.run.keep_last, cfg.run.milestone_every)
            seed_everything(cfg.run.seed + 1000 * self.env.rank)
            self.epoch = SharedEpoch()
            self.before: Dict[str, Any] = {}

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
            loader = eval_loader(self.info, split, self.eval_transform, self.cfg.data)
            scores, targets, _ = predict_split(ZeroShotHead(self.teacher, text), loader, self.device, "fp32")
            self.teacher.model.train(was_training)
            return compute_metrics("single_label", scores, targets, self.info.classes)

        def on_start(self, resumed: Dict[str, Any]) -> None:
            self.teacher.model.train()
            self.before = resumed.get("before") or {split: self.evaluate(split) for split in ("val", "test")}
            log.info("before adaptation: zero-shot val top1 %.4f, test top1 %.4f (%d trainable parameters)",
                     self.before["val"]["top1"], self.before["test"]["top1"], self.trainable)

        def checkpoint_extra(self, resumed: Dict[str, Any]) -> Dict[str, Any]:
            return {"before": self.before, "teacher_arch": self.teacher.arch}

        def save_best(self, metrics: Dict[str, Any], step: int) -> None:
            if self.env.is_main:
                atomic_save_safetensors(self.teacher.model.state_dict(), self.run_dir / TEACHER_FILE,
                                        {"step": str(step), "val_top1": str(metrics["top1"]),
                                         "arch": self.teacher.arch})
            distributed.barrier()

        def finish(self, step: int, best: Dict, history, logger) -> Dict[str, Any]:
            self.teacher.model.load_state_dict(load_file(str(self.run_dir / TEACHER_FILE)))
            test = self.evaluate("test")
            logger.write_scalars(step, {"test/top1": test["top1"]})
            result = {"dataset": self.info.name, "teacher": dataclasses.asdict(self.cfg.teacher),
                      "teacher_file": str((self.run_dir / TEACHER_FILE).resolve()), "templates": self.templates,
                      "final_step": step, "best_epoch": best["epoch"], "before": self.before,
                      "after": {"val": best["val"], "test": test}, "history": history,
                      "classes": self.info.classes, "world_size": self.env.world_size, "stopped": False}
            if self.env.is_main:
                atomic_write_json(self.run_dir / "metrics.json", result)
                log.info("zero-shot top1: val %.4f -> %.4f, test %.4f -> %.4f; %s", self.before["val"]["top1"],
                         best["val"]["top1"], self.before["test"]["top1"], test["top1"], self.run_dir / TEACHER_FILE)
            return result

    return TeacherAdaptation(cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from runtime import distributed
    from runtime.config import ConfigError, parse_cli
    from runtime.launcher_watch import exit_with_launcher
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="shortcut for data.dataset=NAME")
    parser.add_argument("--data", help="shortcut for data.root=DIR")
    args, rest = parser.parse_known_args(argv)
    shortcuts = ([f"data.dataset={args.dataset}"] if args.dataset else []) + \
        ([f"data.root={args.data}"] if args.data else [])
    try:
        cfg, _ = parse_cli(AdaptConfig, rest + shortcuts, description=__doc__)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = distributed.resolve_env()
    distributed.setup_logging(env.rank)
    exit_with_launcher(env.launcher)
    from data_tools.registry import UnknownDatasetError
    from pretrain.teacher import TeacherError
    from runtime.checkpoint import CheckpointError
    from runtime.guard import NonFiniteLossError
    try:
        build(cfg).run()
        distributed.shutdown(wait_for_peers=True)
    except (UnknownDatasetError, TeacherError, CheckpointError, NonFiniteLossError, FileNotFoundError,
            ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 3
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    from runtime.loop import run_as_script
    run_as_script(main, "teacher adaptation")
