"""Clip shards for the temporal job's tests: a generic frame layout (frame folders + annotations.csv) whose
valence follows each frame's brightness and arousal its red/blue tint, both drifting over the clip."""
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.frames import shard_frames


def make_generic_clips(root: Path, clips: int = 12, frames: int = 20, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(clips):
        clip = f"clip{c:02d}"
        v = np.clip(np.cumsum(rng.normal(0, 0.15, frames)) + rng.uniform(-0.5, 0.5), -1, 1)
        a = np.clip(np.cumsum(rng.normal(0, 0.15, frames)) + rng.uniform(-0.5, 0.5), -1, 1)
        for i in range(frames):
            img = np.full((size, size, 3), 127.5 + 100 * v[i])
            img[..., 0] += 40 * a[i]
            img[..., 2] -= 40 * a[i]
            img += rng.normal(0, 8, img.shape)
            path = root / "frames" / clip / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
            rows.append({"clip": clip, "frame": f"{i:04d}", "valence": f"{v[i]:.4f}", "arousal": f"{a[i]:.4f}",
                         "subject": f"s{c // 2}", "valid": "0" if (c == 1 and i == 5) else "1"})
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def clip_shards(root: Path, clips: int = 12, frames: int = 20, max_frames: int = 12) -> Path:
    """Shards of `clips` clips (6 subjects; 2 chunks per clip at max_frames=12), split by subject."""
    src = make_generic_clips(root / "src", clips, frames)
    shard_frames("toyva", str(src), str(root / "shards"), fmt="generic", max_frames=max_frames,
                 ratios=(0.5, 0.25, 0.25), shard_size=2, min_shards=2, max_side=32)
    return root / "shards"
