"""Clip-chunk shards (data_tools.frames) for the temporal job: the dataset from shard-frames' info.json, a chunk as
tensors (a random window of it to train on, all of it to evaluate), and chunk predictions gathered into clips by
(clip, frame)."""
import io
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from data_tools.images import load_rgb
from finetune.data import DatasetInfo
from finetune.temporal_metrics import Clip

TEMPORAL = "temporal_regression"
TARGETS = ["valence", "arousal"]


def resolve_frames(dataset: str, root: Optional[str]) -> DatasetInfo:
    """The clip-chunk shards in `root` (shard-frames' output), checked against the dataset name asked for."""
    if root is None:
        raise ValueError("data.root is required: clip-chunk shards made by `python -m data_tools shard-frames`")
    path = Path(root) / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.root must hold shards made by `python -m data_tools "
                                f"shard-frames NAME SRC --out {root}`")
    info = json.loads(path.read_text())
    if info.get("kind") != "frames":
        raise ValueError(f"{path}: kind {info.get('kind')!r}, expected 'frames' (shards of clip chunks made by "
                         f"shard-frames; image shards are fine-tuned with finetune/main.py)")
    if info["dataset"].lower() != dataset.lower():
        raise ValueError(f"--dataset {dataset!r} does not match the shards in {root}, which hold {info['dataset']!r}")
    sizes = {s: v["samples"] for s, v in info["splits"].items()}
    for split in ("train", "val", "test"):
        if not sizes.get(split):
            raise ValueError(f"{root}: split {split!r} is missing or empty (chunks per split: {sizes})")
    out = DatasetInfo(info["dataset"], TEMPORAL, list(TARGETS), Path(root), sizes)
    out.train_mean = (info.get("frames", {}).get("train") or {}).get("target_mean")
    return out


def chunk_values(meta: Dict[str, Any], frames: int, where: str):
    """(targets (T, 2), annotated (T,)) of a chunk's record, checked against its frame count."""
    lengths = {k: len(meta.get(k) or []) for k in ("valence", "arousal", "valid")}
    if set(lengths.values()) != {frames}:
        raise ValueError(f"{where}: {frames} frames but record lengths {lengths}")
    target = torch.tensor([meta["valence"], meta["arousal"]], dtype=torch.float32).T
    return target, torch.tensor(meta["valid"], dtype=torch.bool)


class ClipTransform:
    """A decoded chunk -> {'x': frames (W, 3, S, S) or cached features (W, D), 'target' (W, 2), 'valid' (W,),
    'mask' (W,), 'clip', 'start', 'key'}. With `window`, a random window of that many frames (shorter chunks padded,
    mask False); without, the whole chunk. Picklable for loader workers."""

    def __init__(self, image_transform, window: Optional[int], cached: bool):
        self.image_transform, self.window, self.cached = image_transform, window, cached

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        meta, where = sample["meta"], f"{sample.get('__url__')}:{sample['__key__']}"
        if self.cached:
            feats = sample["sidecar"]["feats"]
            frames = len(feats)
        else:
            frames = len(sample["frames"])
        target, annotated = chunk_values(meta, frames, where)
        n = frames if self.window is None else min(self.window, frames)
        start = random.randint(0, frames - n) if self.window is not None else 0
        if self.cached:
            x = torch.from_numpy(np.asarray(feats[start:start + n], np.float32))
        else:
            x = torch.stack([self.image_transform(load_rgb(Image.open(io.BytesIO(b))))
                             for b in sample["frames"][start:start + n]])
        mask = torch.ones(n, dtype=torch.bool)
        target, annotated = target[start:start + n], annotated[start:start + n]
        pad = (self.window or n) - n
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            target, mask = torch.cat([target, target.new_zeros(pad, 2)]), torch.cat([mask, mask.new_zeros(pad)])
            annotated = torch.cat([annotated, annotated.new_zeros(pad)])
        return {"x": x, "target": target, "valid": annotated & mask, "mask": mask, "clip": meta["clip"],
                "start": int(meta["start"]) + start, "key": sample["__key__"]}


def gather_clips(rows: Sequence[Dict[str, Any]]) -> Dict[str, Clip]:
    """Chunk predictions (every rank's) into one Clip per clip, frames in order; a frame predicted twice is an
    error (every frame must be scored exactly once)."""
    by_clip: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_clip.setdefault(row["clip"], []).append(row)
    clips = {}
    for name, parts in sorted(by_clip.items()):
        parts.sort(key=lambda r: r["start"])
        for a, b in zip(parts, parts[1:]):
            if b["start"] < a["start"] + len(a["pred"]):
                raise RuntimeError(f"clip {name}: frame {b['start']} is predicted twice (chunks {a['key']} and "
                                   f"{b['key']}): each frame must be scored exactly once")
        clips[name] = Clip(np.concatenate([r["pred"] for r in parts]), np.concatenate([r["true"] for r in parts]),
                           np.concatenate([r["valid"] for r in parts]),
                           np.concatenate([r["start"] + np.arange(len(r["pred"])) for r in parts]))
    return clips
