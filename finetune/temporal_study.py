"""`python -m finetune.temporal_study`: does the temporal machinery learn temporal structure? Not an emotion
benchmark. Clips are built from real labelled images (scikit-learn's 8x8 digits, split into train/val/test before
any clip is made): each frame shows two digits side by side whose classes follow slow bounded random walks;
valence is read from the left class, arousal from the right one, both on [-1, 1]; a quarter of the frames are
drowned in noise, so a frame alone is often unreadable and its neighbours are the way to it. Heads on frozen
features (a PCA of the training frames) are scored with finetune.temporal_metrics beside the reference rows."""
import argparse
import json
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from finetune.temporal import MeanPoolHead, PerFrameHead, TemporalTransformerHead, stitch, va_loss
from finetune.temporal_metrics import Clip, clip_mean_oracle, temporal_metrics, train_mean_predictor


def digit_pools(seed: int) -> Dict[str, Dict[int, np.ndarray]]:
    """Each split's images by class: no image is in two splits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    cut = {"train": order[:1000], "val": order[1000:1400], "test": order[1400:]}
    return {s: {c: digits.images[idx[digits.target[idx] == c]] / 16.0 for c in range(10)} for s, idx in cut.items()}


def walk(rng: np.random.Generator, frames: int, p_move: float = 0.15) -> np.ndarray:
    """A class index 0..9 moving by one step now and then, bounded at the ends."""
    c = [int(rng.integers(0, 10))]
    for _ in range(frames - 1):
        step = rng.choice([-1, 0, 1], p=[p_move, 1 - 2 * p_move, p_move])
        c.append(int(np.clip(c[-1] + step, 0, 9)))
    return np.array(c)


def make_clips(pool: Dict[int, np.ndarray], n: int, frames: int, rng: np.random.Generator, noisy: float = 0.25):
    """(images (n, T, 8, 16), targets (n, T, 2)): valence from the left digit's class, arousal from the right's."""
    images, targets = np.zeros((n, frames, 8, 16), np.float32), np.zeros((n, frames, 2), np.float32)
    for i in range(n):
        left, right = walk(rng, frames), walk(rng, frames)
        for t in range(frames):
            a = pool[left[t]][rng.integers(len(pool[left[t]]))]
            b = pool[right[t]][rng.integers(len(pool[right[t]]))]
            img = np.concatenate([a, b], 1)
            if rng.random() < noisy:
                img = 0.2 * img + rng.normal(0, 1.0, img.shape)
            images[i, t] = img
        targets[i] = np.stack([(left - 4.5) / 4.5, (right - 4.5) / 4.5], 1)
    return images, targets


def pca_encoder(train_frames: np.ndarray, dim: int):
    """A frozen encoder fitted without labels: the first `dim` principal directions of the training frames."""
    x = train_frames.reshape(len(train_frames), -1)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:dim].T / np.sqrt(np.var((x - mean) @ vt[:dim].T, 0) + 1e-6)
    return lambda frames: ((frames.reshape(*frames.shape[:-2], -1) - mean) @ basis).astype(np.float32)


HEADS = {"per-frame linear head": lambda d: PerFrameHead(d), "mean-pool head": lambda d: MeanPoolHead(d),
         "temporal head": lambda d: TemporalTransformerHead(d, width=64, depth=2, heads=4, max_frames=64)}


def train_head(head: torch.nn.Module, feats: np.ndarray, targets: np.ndarray, steps: int, seed: int,
               shuffle: bool = False, window: int = 16, batch: int = 32) -> torch.nn.Module:
    """Random windows of the training clips (frames permuted within each clip when `shuffle`), AdamW, va_loss."""
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.01)
    n, t = feats.shape[:2]
    head.train()
    for _ in range(steps):
        clips, starts = g.integers(0, n, batch), g.integers(0, t - window + 1, batch)
        x = np.stack([feats[c, s:s + window] for c, s in zip(clips, starts)])
        y = np.stack([targets[c, s:s + window] for c, s in zip(clips, starts)])
        if shuffle:
            perm = np.stack([g.permutation(window) for _ in range(batch)])
            x, y = np.take_along_axis(x, perm[..., None], 1), np.take_along_axis(y, perm[..., None], 1)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        loss = va_loss(head(x, torch.ones(x.shape[:2], dtype=torch.bool)), y, torch.ones(x.shape[:2], dtype=torch.bool))
        optim.zero_grad()
        loss.backward()
        optim.step()
    return head.eval()


@torch.no_grad()
def predict_clips(head, feats: np.ndarray, targets: np.ndarray, window: int = 16,
                  shuffle_seed: Optional[int] = None) -> List[Clip]:
    """Every test frame predicted once: overlapping windows of the training length (stride half of it) stitched;
    with `shuffle_seed`, each clip's frames (and their targets) permuted first."""
    out = []
    g = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for x, y in zip(feats, targets):
        if g is not None:
            perm = g.permutation(len(x))
            x, y = x[perm], y[perm]
        out.append(Clip(stitch(head, torch.from_numpy(x), window, max(1, window // 2)).numpy(), y))
    return out


def run_seed(seed: int, frames: int = 48, clips: Sequence[int] = (150, 60), steps: int = 250,
             bootstrap: int = 500) -> Dict[str, Dict]:
    pools = digit_pools(seed)
    rng = np.random.default_rng(seed + 1)
    # fixed recipes, nothing tuned on this data: the val images stay unused
    data = {s: make_clips(pools[s], n, frames, rng) for s, n in zip(("train", "test"), clips)}
    encode = pca_encoder(data["train"][0].reshape(-1, 8, 16), dim=24)
    feats = {s: encode(images) for s, (images, _) in data.items()}
    test_y = data["test"][1]
    rows = {}
    for name, make in HEADS.items():
        head = train_head(make(24), feats["train"], data["train"][1], steps, seed)
        rows[name] = temporal_metrics(predict_clips(head, feats["test"], test_y), bootstrap=bootstrap, seed=seed)
    # the same transformer seeing one frame at a time: its capacity without the context
    alone = train_head(HEADS["temporal head"](24), feats["train"], data["train"][1], steps, seed, window=1,
                       batch=32 * 16)
    rows["temporal head, one frame (no context)"] = temporal_metrics(
        predict_clips(alone, feats["test"], test_y, window=1), bootstrap=bootstrap, seed=seed)
    shuffled = train_head(HEADS["temporal head"](24), feats["train"], data["train"][1], steps, seed, shuffle=True)
    rows["temporal head, frames shuffled"] = temporal_metrics(
        predict_clips(shuffled, feats["test"], test_y, shuffle_seed=seed), bootstrap=bootstrap, seed=seed)
    truth = [Clip(np.zeros_like(y), y) for y in test_y]
    rows["reference: train-mean constant"] = temporal_metrics(
        train_mean_predictor(truth, data["train"][1].reshape(-1, 2).mean(0)), bootstrap=bootstrap, seed=seed)
    rows["reference: clip-mean oracle"] = temporal_metrics(clip_mean_oracle(truth), bootstrap=bootstrap, seed=seed)
    return rows


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"


def table(results: Dict[int, Dict[str, Dict]]) -> str:
    """Mean CCC (V, A) over the seeds, pooled and per clip, with the first seed's bootstrap intervals."""
    seeds = sorted(results)
    lines = [f"| model | pooled CCC (mean ± sd over {len(seeds)} seeds) | 95 % CI (seed {seeds[0]}) | per-clip CCC | "
             f"valence RMSE |", "|---|---|---|---|---|"]
    for name in results[seeds[0]]:
        pooled = [results[s][name]["ccc"] for s in seeds]
        per = [results[s][name]["ccc_per_clip"] for s in seeds]
        rmse = [results[s][name]["valence"]["rmse"] for s in seeds]
        first = results[seeds[0]][name]
        ci = f"V {_ci(first['valence']['ccc_ci95'])} A {_ci(first['arousal']['ccc_ci95'])}"
        lines.append(f"| {name} | {np.mean(pooled):.3f} ± {np.std(pooled):.3f} | {ci} | "
                     f"{np.mean(per):.3f} ± {np.std(per):.3f} | {np.mean(rmse):.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    start = time.time()
    torch.set_num_threads(2)
    results = {s: run_seed(s, steps=args.steps) for s in args.seeds}
    print(table(results))
    print(f"\n{time.time() - start:.0f} s")
    if args.json:
        from runtime.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
