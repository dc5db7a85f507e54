"""Zero-shot emotion: the student's distilled embedding lives in CLIP's space, so prompts embedded by the teacher's
text tower classify images without a head (CLIP's zero-shot recipe: several templates averaged per label).

    python -m finetune.zeroshot --checkpoint runs/vit_l16 --teacher-checkpoint path/to/clip_b16.bin \
        --dataset FI --data shards/FI            # top-1 / top-3 / macro-F1 on the test split
    python -m finetune.zeroshot --checkpoint runs/demo --dataset fashion --data shards/fashion --teacher-only

The teacher defaults to the run's own teacher section (override with --teacher-*). --teacher-only scores the
teacher's image embedding instead of the student's: the bar the student is distilled towards.
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_tools.registry import SINGLE_LABEL
from data_tools.text import label_text
from pretrain.config import LossConfig, ModelConfig
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import make_teacher, teacher_embed_dim
from pretrain.teacher_cli import add_teacher_args, stored_teacher_config, teacher_config_from_args
from runtime.atomic import atomic_write_json
from runtime.checkpoint import CheckpointError, load_checkpoint, load_model_state, trained_weights
from runtime.cli import HelpFormatter, with_one_line_errors
from runtime.config import load_config
from runtime.logs import setup_logging

log = logging.getLogger("finetune.zeroshot")
TEMPLATES = ("a photo that conveys {}.", "a photo that makes people feel {}.", "an image evoking {}.",
             "The overall emotion conveyed is {}.")
TEMPLATE_SETS = {"emotion": TEMPLATES, "object": ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")}


def resolve_templates(name: str) -> Sequence[str]:
    """A named template set (emotion, object) or a file of templates, one per line, each with one '{}'."""
    if name in TEMPLATE_SETS:
        return TEMPLATE_SETS[name]
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"--templates {name!r}: neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{path}: each line must hold exactly one '{{}}' for the label (bad: {bad[:3]})")
    return templates


def read_labels(path: str) -> List[str]:
    """One label per line; a blank line or a repeated label is an error naming its line."""
    labels: List[str] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        label = line.strip()
        if not label:
            raise ValueError(f"{path}:{n}: blank line (one label per line, no blank lines)")
        if label in labels:
            raise ValueError(f"{path}:{n}: label {label!r} repeats line {labels.index(label) + 1}")
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels


class ZeroShotEncoder(nn.Module):
    """A pretraining checkpoint's student as an image embedder: no masking, the whole image as the person crop
    (what training does for photos without a person box), projection and fusion, L2-normalised."""

    def __init__(self, checkpoint: str):
        super().__init__()
        state = load_checkpoint(checkpoint)
        cfg = state.get("config", {})
        if "model" not in cfg or "teacher" not in cfg:
            raise CheckpointError(f"{checkpoint} is not a pretraining checkpoint (zero-shot needs the distilled "
                                  f"projection and fusion)")
        model_cfg = load_config(ModelConfig, None, [f"{k}={v}" for k, v in cfg["model"].items()
                                                     if v is not None and k not in ("mae_checkpoint", "init_from")])
        width = teacher_embed_dim(stored_teacher_config(cfg["teacher"]))  # from its config: no weights loaded
        self.student = UniEmoXPretrainer(model_cfg, LossConfig(), width)
        load_model_state(self.student, trained_weights(state))  # the EMA's, where the run kept one
        self.student.eval()
        self.img_size = self.student.mae.arch.img_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        both = torch.cat([images, images]) if self.student.uses_person else images
        cls = self.student.mae.forward_encoder(both, 0.0)[0][:, 0]
        return F.normalize(self.student.embed(cls[:n], cls[n:]).float(), dim=-1)


@torch.no_grad()
def label_embeddings(teacher: nn.Module, labels: Sequence[str], templates: Sequence[str] = TEMPLATES):
    """(C, E): per label, the normalised mean of its normalised template embeddings."""
    out = []
    for label in labels:
        e = teacher.encode_text(teacher.tokenize([t.format(label_text(label)) for t in templates]))
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def zero_shot_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image to each label (both normalised)."""
    return image_emb @ text_emb.T


def evaluate(checkpoint: Optional[str], teacher: nn.Module, dataset: str, data: str, run_dir: str,
             batch_size: int = 64, templates: Sequence[str] = TEMPLATES, crop_pct: float = 0.875,
             splits: Sequence[str] = ("test",)) -> Dict[str, Any]:
    """Zero-shot metrics of the student of `checkpoint` (or, with checkpoint=None, of the teacher's own image
    embedding of the centre view it is cached from) per split, in the fine-tuning runs' metrics format;
    written to run_dir/zeroshot.json."""
    from finetune.config import AugmentConfig, FinetuneDataConfig
    from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
    from finetune.metrics import compute_metrics
    from pretrain.cache_teacher import center_view
    info = resolve_dataset(dataset, data, Path(run_dir))
    if info.task != SINGLE_LABEL:
        raise ValueError(f"zero-shot evaluation needs a single-label dataset; {info.name} is {info.task}")
    if checkpoint is None:
        embed, view = teacher.encode_image, center_view(teacher.image_size)
    else:
        encoder = ZeroShotEncoder(checkpoint)
        embed, view = encoder, make_transforms(encoder.img_size, AugmentConfig(crop_pct=crop_pct))[1]
    text = label_embeddings(teacher, info.classes, templates)
    result: Dict[str, Any] = {"dataset": info.name, "task": SINGLE_LABEL, "primary_metric": "top1",
                              "encoder_source": "zero-shot: " + ("teacher" if checkpoint is None else "student"),
                              "chance": 1 / len(info.classes), "classes": info.classes, "templates": list(templates)}
    for split in splits:
        loader = eval_loader(info, split, LabelledTransform(view, info.task, len(info.classes)),
                             FinetuneDataConfig(dataset=dataset, batch_size=batch_size, num_workers=0))
        scores, targets = [], []
        for batch in loader:
            scores.append(zero_shot_scores(embed(batch["image"]), text))
            targets.append(torch.as_tensor(batch["target"]))
        result[split] = compute_metrics(SINGLE_LABEL, torch.cat(scores).numpy(), torch.cat(targets).numpy(),
                                        info.classes)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / "zeroshot.json", result)
    return result


def default_out(checkpoint: str, dataset: str, teacher_only: bool) -> Path:
    """RUN/zeroshot_<dataset>[_teacher] beside the pretraining run's checkpoints (the run the figures belong to)."""
    path = Path(checkpoint)
    run = path.parent.parent if path.parent.name == "checkpoints" else (path if path.is_dir() else path.parent)
    return run / f"zeroshot_{dataset}{'_teacher' if teacher_only else ''}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pretraining run or checkpoint")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", required=True, help="the dataset's shards (or image folder)")
    parser.add_argument("--out", help="directory for zeroshot.json (default: RUN/zeroshot_DATASET, or "
                                      "RUN/zeroshot_DATASET_teacher with --teacher-only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zeroshot.json in --out")
    parser.add_argument("--templates", default="emotion",
                        help=f"prompt templates: {', '.join(TEMPLATE_SETS)}, or a file with one per line")
    parser.add_argument("--splits", nargs="+", default=["test"], choices=["train", "val", "test"])
    parser.add_argument("--crop-pct", type=float, default=0.875, help="evaluation resize/centre-crop ratio")
    parser.add_argument("--teacher-only", action="store_true",
                        help="score the teacher's image embedding instead of the student's")
    add_teacher_args(parser, "the teacher's weights file (default: the run's)")
    args = parser.parse_args(argv)
    setup_logging()

    def body() -> int:
        out = Path(args.out) if args.out else default_out(args.checkpoint, args.dataset, args.teacher_only)
        if (out / "zeroshot.json").exists() and not args.overwrite:
            raise FileExistsError(f"{out / 'zeroshot.json'} exists: give another --out, or --overwrite to replace it")
        teacher = make_teacher(teacher_config_from_args(args, load_checkpoint(args.checkpoint)["config"]["teacher"]))
        result = evaluate(None if args.teacher_only else args.checkpoint, teacher, args.dataset, args.data, str(out),
                          templates=resolve_templates(args.templates), crop_pct=args.crop_pct, splits=args.splits)
        print(json.dumps({split: {k: result[split][k] for k in ("top1", "top3", "n")} for split in args.splits}))
        log.info("zero-shot metrics -> %s", out / "zeroshot.json")
        return 0
    return with_one_line_errors(body)

if __name__ == "__main__":
    raise SystemExit(main())
