"""Zero-shot emotion: the student's distilled embedding lives in CLIP's space, so prompts embedded by the teacher's
text tower classify images without a head (CLIP's zero-shot recipe: several templates averaged per label).

    python -m finetune.zeroshot --checkpoint runs/vit_l16 --teacher-checkpoint /models/clip_b16.bin \
        --dataset FI --data shards/FI            # top-1 / top-5 on the test split
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import LossConfig, ModelConfig, TeacherConfig
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher
from runtime.checkpoint import CheckpointError, load_checkpoint, load_model_state
from runtime.config import load_config

log = logging.getLogger("finetune.zeroshot")
TEMPLATES = ("a photo that conveys {}.", "a photo that makes people feel {}.", "an image evoking {}.",
             "The overall emotion conveyed is {}.")


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
        teacher_cfg = TeacherConfig(checkpoint="random", arch=cfg["teacher"]["arch"], cached=True)
        self.student = UniEmoXPretrainer(model_cfg, LossConfig(), teacher_cfg)
        load_model_state(self.student, state["model"])
        self.student.eval()
        self.img_size = self.student.mae.arch.img_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mae = self.student.mae
        n = images.shape[0]
        both = torch.cat([images, images]) if self.student.uses_person else images
        latent, _, _ = mae.forward_encoder(both, 0.0)
        projected = self.student.project(latent[:, 0])
        g = self.student.fusion(projected[:n], projected[n:] if self.student.uses_person else None)
        return F.normalize(g.float(), dim=-1)


@torch.no_grad()
def label_embeddings(teacher: CLIPTeacher, labels: Sequence[str], templates: Sequence[str] = TEMPLATES):
    """(C, E): per label, the normalised mean of its normalised template embeddings."""
    out = []
    for label in labels:
        e = teacher.encode_text(teacher.tokenize([t.format(label) for t in templates]))
        out.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(out)


def zero_shot_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image to each label (both normalised)."""
    return image_emb @ text_emb.T


def evaluate(checkpoint: str, teacher: CLIPTeacher, dataset: str, data: str, run_dir: str,
             batch_size: int = 64) -> Dict[str, float]:
    from finetune.config import AugmentConfig, FinetuneDataConfig
    from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
    info = resolve_dataset(dataset, data, Path(run_dir))
    if info.task != "single_label":
        raise ValueError(f"zero-shot evaluation needs a single-label dataset; {info.name} is {info.task}")
    encoder = ZeroShotEncoder(checkpoint)
    _, eval_tf = make_transforms(encoder.img_size, AugmentConfig())
    loader = eval_loader(info, "test", LabelledTransform(eval_tf, info.task, len(info.classes)),
                         FinetuneDataConfig(dataset=dataset, batch_size=batch_size, num_workers=0))
    text = label_embeddings(teacher, info.classes)
    scores, targets = [], []
    for batch in loader:
        scores.append(zero_shot_scores(encoder(batch["image"]), text))
        targets.append(torch.as_tensor(batch["target"]))
    s, y = torch.cat(scores).numpy(), torch.cat(targets).numpy()
    k = min(5, len(info.classes))
    topk = np.argsort(-s, axis=1)[:, :k]
    result = {"dataset": info.name, "n": int(len(y)), "top1": float((topk[:, 0] == y).mean()),
              f"top{k}": float((topk == y[:, None]).any(1).mean()), "classes": info.classes,
              "templates": list(TEMPLATES)}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "zeroshot.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a pretraining run or checkpoint")
    parser.add_argument("--teacher-arch", default=None, help="default: the run's teacher.arch")
    parser.add_argument("--teacher-checkpoint", required=True, help="the CLIP weights file (its text tower)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", required=True, help="the dataset's shards (or image folder)")
    parser.add_argument("--out", default="runs/zeroshot", help="directory for zeroshot.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    arch = args.teacher_arch or load_checkpoint(args.checkpoint)["config"]["teacher"]["arch"]
    result = evaluate(args.checkpoint, CLIPTeacher(arch, args.teacher_checkpoint), args.dataset, args.data, args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("classes", "templates")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
