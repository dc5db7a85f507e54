"""A model's outputs on one split, gathered from every rank: each sample scored once (no padding duplicates), with
its pooled features and thumbnails when asked for (embeddings and error galleries)."""
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
from runtime import distributed
from runtime.atomic import atomic_write_bytes
from runtime.precision import autocast

THUMBNAIL_SIDE = 64
THUMBNAILS = 1000  # test images kept small for the projector and the gallery of mistakes


@dataclass
class SplitPredictions:
    outputs: np.ndarray                        # (N, C) logits / scores / regressions
    targets: np.ndarray                        # (N,) class indices or (N, C)
    keys: List[str]                            # sample keys, each exactly once
    features: Optional[np.ndarray] = None      # (N, D) pooled features before the head
    thumbnails: Optional[np.ndarray] = None    # (M, h, w, 3) uint8 of the rows `thumbnail_rows`
    thumbnail_rows: Optional[np.ndarray] = None

    def save(self, path: Path) -> None:
        """predictions_SPLIT.npz: outputs, targets, keys (and features), to recompute any metric."""
        buf = io.BytesIO()
        extra = {"features": self.features} if self.features is not None else {}
        np.savez(buf, outputs=self.outputs, targets=self.targets, keys=np.array(self.keys), **extra)
        atomic_write_bytes(path, buf.getvalue())


def thumbnails_of(images: torch.Tensor) -> np.ndarray:
    """Normalised model inputs -> small uint8 RGB images (N, h, w, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images.float().cpu() * std + mean).clamp(0, 1)
    if pixels.shape[-1] > THUMBNAIL_SIDE:
        pixels = F.interpolate(pixels, size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE), mode="bilinear", antialias=True)
    return (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def predict_split(model: torch.nn.Module, loader, device: torch.device, precision: str, features: bool = False,
                  thumbnails: int = 0) -> SplitPredictions:
    """Score one split (each rank reads its own shards; None where a rank has none). `features`: also the pooled
    features of a timm ViT; `thumbnails`: keep thumbnails of up to this many samples in all."""
    was_training = model.training
    model.eval()
    outputs, targets, keys, feats, thumbs = [], [], [], [], []
    per_rank = -(-thumbnails // distributed.get_world_size()) if thumbnails else 0
    if loader is not None:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            with autocast(precision, device):
                if features:
                    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
                    out = model.head(pooled)
                    feats.append(pooled.float().cpu())
                else:
                    out = model(images)
            outputs.append(out.float().cpu())
            targets.append(torch.as_tensor(batch["target"]).float())
            keys += list(batch["key"])
            kept = sum(len(t) for t in thumbs)
            if kept < per_rank:
                thumbs.append(thumbnails_of(batch["image"][:per_rank - kept]))
    model.train(was_training)

    def cat(parts):
        return torch.cat(parts).numpy() if parts else None
    local = (cat(outputs), cat(targets), keys, cat(feats), np.concatenate(thumbs) if thumbs else None)
    parts = [p for p in distributed.all_gather_object(local) if p[0] is not None]
    result = SplitPredictions(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                              sum((p[2] for p in parts), []))
    if features:
        result.features = np.concatenate([p[3] for p in parts])
    if thumbnails:
        starts = np.cumsum([0] + [len(p[0]) for p in parts])
        pieces = [(p[4], start) for p, start in zip(parts, starts) if p[4] is not None]
        if pieces:
            result.thumbnails = np.concatenate([t for t, _ in pieces])
            result.thumbnail_rows = np.concatenate([np.arange(len(t)) + s for t, s in pieces])
    return result
