"""`python -m finetune.baseline --dataset NAME --data SHARDS --out DIR`: logistic regression on raw pixels, the
floor any learned encoder must clear on the same split (single-label sets).

The images go through the fine-tuning evaluation transform at --img-size (resize, centre crop, normalise); the
pixels are standardised per feature; the inverse regularisation C is chosen on val from --c-grid. Writes
DIR/metrics.json in the fine-tuning runs' format (so finetune.report lists it beside them).
"""
import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from data_tools.registry import SINGLE_LABEL
from finetune.config import AugmentConfig, FinetuneDataConfig
from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
from finetune.metrics import compute_metrics
from runtime.atomic import atomic_write_json
from runtime.cli import HelpFormatter
from runtime.logs import setup_logging

log = logging.getLogger("finetune.baseline")


def split_pixels(info, split: str, img_size: int, crop_pct: float) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 3 * img_size**2) float32 pixels and (N,) labels of one split, in shard order."""
    view = make_transforms(img_size, AugmentConfig(crop_pct=crop_pct))[1]
    loader = eval_loader(info, split, LabelledTransform(view, info.task, len(info.classes)),
                         FinetuneDataConfig(dataset=info.name, batch_size=256, num_workers=0))
    xs, ys = [], []
    for batch in loader:
        xs.append(batch["image"].flatten(1).numpy())
        ys.append(torch.as_tensor(batch["target"]).numpy())
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(int)


def pixel_logreg(dataset: str, data: str, out: str, img_size: int = 32, crop_pct: float = 1.0,
                 c_grid: Sequence[float] = (1e-3, 1e-2), max_iter: int = 300) -> Dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    start = time.time()
    info = resolve_dataset(dataset, data, Path(out))
    if info.task != SINGLE_LABEL:
        raise ValueError(f"the pixel baseline is for single-label sets; {info.name} is {info.task}")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (split_pixels(info, s, img_size, crop_pct)
                                                             for s in ("train", "val", "test"))
    scaler = StandardScaler().fit(x_train)
    x_train, x_val, x_test = scaler.transform(x_train), scaler.transform(x_val), scaler.transform(x_test)
    best = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=max_iter).fit(x_train, y_train)
        val = compute_metrics(SINGLE_LABEL, model.decision_function(x_val), y_val, info.classes)
        log.info("C=%g: val top1 %.4f", c, val["top1"])
        if best is None or val["top1"] > best[1]["top1"]:
            best = (c, val, model)
    c, val, model = best
    test = compute_metrics(SINGLE_LABEL, model.decision_function(x_test), y_test, info.classes)
    result = {"dataset": info.name, "task": SINGLE_LABEL, "primary_metric": "top1",
              "encoder_source": f"pixels {img_size}px, logistic regression C={c:g}", "best_epoch": None,
              "val": val, "test": test, "classes": info.classes, "c_grid": list(c_grid),
              "seconds": round(time.time() - start, 1)}
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out) / "metrics.json", result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data", required=True, help="the dataset's shards (with info.json) or an image folder")
    parser.add_argument("--out", required=True, help="run directory for metrics.json")
    parser.add_argument("--img-size", type=int, default=32, help="pixels per side (the encoder's input size)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="evaluation resize/centre-crop ratio")
    parser.add_argument("--c-grid", type=float, nargs="+", default=[1e-3, 1e-2], help="C values tried on val")
    args = parser.parse_args(argv)
    setup_logging()
    result = pixel_logreg(args.dataset, args.data, args.out, args.img_size, args.crop_pct, args.c_grid)
    print(json.dumps({"val_top1": result["val"]["top1"], "test_top1": result["test"]["top1"],
                      "C": result["encoder_source"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
