"""`python -m finetune.predict --checkpoint RUN_OR_FILE IMAGES...`: emotions of new images, as CSV or JSONL; with
a temporal run (finetune/temporal_main.py), per-frame valence/arousal of videos or frame folders, and their curves.

    python -m finetune.predict --checkpoint runs/ft_FI photos/ more/*.jpg shards/x/00000.tar --out preds.csv
    python -m finetune.predict --zero-shot --labels plutchik24.txt --checkpoint runs/vit_l16 \
        --teacher-checkpoint path/to/clip_b16.bin photos/ --out preds.jsonl

IMAGES are files, folders (searched recursively for image files), glob patterns or shards (.tar). The checkpoint
is a fine-tuning run directory, a classifier exported by finetune.export, or a reference (MAE / UniEmoX
models_vit) fine-tuned classifier .pth with --dataset naming its benchmark; its own evaluation transform is used.
One row per input: top-k labels with probabilities (sigmoid scores for multi-label heads, valence/arousal for
regression heads), or the reason it could not be read.

    python -m finetune.predict --checkpoint runs/temporal clip.mp4 frames/clip7/ --detect face --out va.csv
"""
import argparse
import csv
import glob
import io
import json
import logging
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from timm.data import create_transform
from tqdm import tqdm

from data_tools.images import ImageError, decode_image, read_file
from data_tools.registry import MULTI_LABEL, REGRESSION, SINGLE_LABEL, get_dataset
from data_tools.splits import IMAGE_EXTENSIONS
from data_tools.tars import read_tar
from pretrain.teacher import make_teacher
from pretrain.teacher_cli import add_teacher_args, teacher_config_from_args
from runtime.atomic import atomic_write_text
from runtime.checkpoint import CheckpointError
from runtime.cli import HelpFormatter, bad_input_errors
from runtime.logs import setup_logging

log = logging.getLogger("finetune.predict")


def iter_inputs(items: Sequence[str]) -> Iterator[Tuple[str, Optional[bytes], Optional[str]]]:
    """(name, bytes or None, failure reason or None) for every input image; an input matching nothing is an
    error naming it."""
    for item in items:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"no images found under {path} (extensions: {sorted(IMAGE_EXTENSIONS)})")
        elif path.suffix == ".tar" and path.is_file():
            members, error = read_tar(path)
            for key, member in members.items():
                if "jpg" in member:
                    yield f"{path}:{key}", member["jpg"], None
            if error:
                yield str(path), None, f"unreadable_tar: {error}"
            continue
        elif path.is_file():
            files = [path]
        else:
            files = [Path(p) for p in sorted(glob.glob(item))]
            if not files:
                raise FileNotFoundError(f"no such file, folder or pattern: {item}")
        for f in files:
            try:
                yield str(f), read_file(f), None
            except ImageError as e:
                yield str(f), None, str(e)


class Predictor:
    """A classifier with its class names, task and evaluation transform (classes and task: for a reference .pth,
    which names neither)."""

    def __init__(self, checkpoint: str, classes: Optional[Sequence[str]] = None, task: str = SINGLE_LABEL):
        from finetune.classifier import open_classifier
        clf = open_classifier(checkpoint, classes, task)
        self.model, self.classes, self.task, self.transform = clf.model, clf.classes, clf.task, clf.transform
        self.continuous = clf.continuous

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images).float()
        if self.continuous:  # sigmoid scores of the classes, then the values as they are
            return torch.cat([out[:, :len(self.classes)].sigmoid(), out[:, len(self.classes):]], 1)
        if self.task == SINGLE_LABEL:
            return out.softmax(-1)
        return out.sigmoid() if self.task == MULTI_LABEL else out


class ZeroShotPredictor:
    def __init__(self, checkpoint: str, labels_file: str, teacher, templates: Sequence[str]):
        from finetune.zeroshot import ZeroShotEncoder, label_embeddings, read_labels
        from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
        self.classes = read_labels(labels_file)
        self.task, self.continuous = SINGLE_LABEL, []
        self.encoder = ZeroShotEncoder(checkpoint)
        self.text = label_embeddings(teacher, self.classes, templates)
        self.scale = teacher.logit_scale
        self.transform = create_transform(self.encoder.img_size, is_training=False, interpolation="bicubic",
                                          crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.encoder(images) @ self.text.T).softmax(-1)


def predict(predictor, items: Sequence[str], topk: int = 3, batch_size: int = 32) -> List[Dict]:
    rows: List[Dict] = []
    pending: List[Tuple[str, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        scores = predictor.scores(torch.stack([t for _, t in pending]))
        for (name, _), s in zip(pending, scores):
            row = {"input": name, "status": "ok", "reason": ""}
            n = len(predictor.classes)
            if predictor.task == REGRESSION:
                row.update({c: float(v) for c, v in zip(predictor.classes, s)})
            else:
                row.update({c: float(v) for c, v in zip(predictor.continuous, s[n:])})
                s = s[:n]
                order = torch.argsort(s, descending=True)[:topk]
                for rank, j in enumerate(order.tolist(), 1):
                    row[f"label{rank}"], row[f"score{rank}"] = predictor.classes[j], float(s[j])
                if predictor.task == SINGLE_LABEL:
                    row["probabilities"] = {c: float(v) for c, v in zip(predictor.classes, s)}
            rows.append(row)
        pending.clear()
    for name, data, reason in tqdm(iter_inputs(items), desc="predict", unit="img"):
        if data is None:
            rows.append({"input": name, "status": "failed", "reason": reason})
            continue
        try:
            image = decode_image(data)
        except ImageError as e:
            rows.append({"input": name, "status": "failed", "reason": str(e)})
            continue
        pending.append((name, predictor.transform(image)))
        if len(pending) == batch_size:
            flush()
    flush()
    return rows


def write_rows(rows: List[Dict], out: Optional[str]) -> None:
    if out and out.endswith(".jsonl"):
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        return
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and k != "probabilities"]
    buf = io.StringIO() if out else sys.stdout
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    if out:
        atomic_write_text(out, buf.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", help=".csv or .jsonl (default: CSV on standard output)")
    parser.add_argument("--dataset", help="a reference classifier .pth: the registered benchmark its head was "
                                          "trained on (names its outputs)")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--zero-shot", action="store_true", help="rank --labels by the distilled CLIP embedding")
    parser.add_argument("--labels", help="zero-shot label vocabulary: one label per line")
    parser.add_argument("--templates", default="emotion", help="zero-shot prompt templates: emotion, object, "
                                                                  "or a file with one per line")
    add_teacher_args(parser, "zero-shot: the teacher's weights file (default: the run's)")
    parser.add_argument("--plot-dir", help="a temporal run: one curve PNG per input here (default: beside --out, "
                                           "in OUT_curves/)")
    parser.add_argument("--detect", default="none", help="a temporal run on videos: crop each frame to the person "
                                                         "or face (hog, face, hog+face, none)")
    parser.add_argument("--every", type=int, default=1, help="a temporal run on videos: every n-th frame")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        from finetune.predict_temporal import is_temporal_run, predict_temporal
        if is_temporal_run(args.checkpoint):  # videos or frame folders: one row per frame, and a curve
            plot_dir = args.plot_dir or (str(Path(args.out).with_name(Path(args.out).stem + "_curves"))
                                         if args.out else None)
            rows = predict_temporal(args.checkpoint, args.images, plot_dir, args.detect, args.every)
            write_rows(rows, args.out)
            return 0
        if args.zero_shot:
            from finetune.zeroshot import resolve_templates
            from runtime.checkpoint import load_checkpoint
            if not args.labels:
                raise ValueError("--zero-shot needs --labels FILE (one label per line)")
            teacher_cfg = load_checkpoint(args.checkpoint).get("config", {}).get("teacher")
            if teacher_cfg is None:
                raise CheckpointError(f"{args.checkpoint} is not a pretraining checkpoint (zero-shot needs one)")
            teacher = make_teacher(teacher_config_from_args(args, teacher_cfg))
            predictor = ZeroShotPredictor(args.checkpoint, args.labels, teacher, resolve_templates(args.templates))
        else:
            spec = get_dataset(args.dataset) if args.dataset else None
            predictor = Predictor(args.checkpoint, spec and spec.classes, spec.task if spec else SINGLE_LABEL)
        rows = predict(predictor, args.images, args.topk, args.batch_size)
    except bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_rows(rows, args.out)
    failed = sum(r["status"] != "ok" for r in rows)
    log.info("%d inputs, %d predicted, %d failed%s", len(rows), len(rows) - failed, failed,
             f" -> {args.out}" if args.out else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
