"""The temporal job's pictures, in RUN/figures/*.png and TensorBoard: the valence/arousal plane (predicted vs true),
curves over time of the best, median and worst test clips by per-clip CCC, the clip embeddings (PCA, and UMAP when
installed) coloured by valence and arousal, and the training curves."""
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from finetune.analysis import figure_png, png_tensor, project_2d, pyplot
from finetune.metrics import ccc
from finetune.temporal_metrics import CONSTANT, Clip
from runtime.atomic import atomic_write_bytes
from runtime.metric_logger import MetricLogger

NAMES = ("valence", "arousal")


def va_plane_png(clips: Sequence[Clip]) -> bytes:
    pred = np.concatenate([c.frames()[0] for c in clips])
    true = np.concatenate([c.frames()[1] for c in clips])
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), dpi=80)
    axes[0].scatter(true[:, 0], true[:, 1], s=4, c="0.6", label="true")
    axes[0].scatter(pred[:, 0], pred[:, 1], s=4, c="tab:red", alpha=0.5, label="predicted")
    axes[0].set(xlabel="valence", ylabel="arousal", xlim=(-1.05, 1.05), ylim=(-1.05, 1.05),
                title=f"V/A plane ({len(true)} test frames)")
    axes[0].legend(fontsize=7, markerscale=3)
    for ax, d, name in zip(axes[1:], (0, 1), NAMES):
        ax.scatter(true[:, d], pred[:, d], s=4, alpha=0.5)
        ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", xlim=(-1.05, 1.05), ylim=(-1.05, 1.05),
               title=f"{name}: CCC {ccc(pred[:, d], true[:, d]):.3f}")
    fig.tight_layout()
    return figure_png(fig)


def clip_score(clip: Clip) -> Optional[float]:
    """The mean per-clip CCC over the targets that move in this clip (None where neither does)."""
    p, t = clip.frames()
    scores = [ccc(p[:, d], t[:, d]) for d in range(t.shape[1]) if len(t) > 1 and t[:, d].std() > CONSTANT]
    return float(np.mean(scores)) if scores else None


def ranked_clips(clips: Dict[str, Clip]) -> List[tuple]:
    """(label, name, clip) of the best, median and worst clips by per-clip CCC."""
    scored = sorted(((s, n) for n, c in clips.items() if (s := clip_score(c)) is not None), reverse=True)
    if not scored:
        return []
    picks = [("best", scored[0]), ("median", scored[len(scored) // 2]), ("worst", scored[-1])]
    return [(f"{label} (CCC {s:.2f})", n, clips[n]) for label, (s, n) in picks]


def curves_png(clips: Dict[str, Clip]) -> Optional[bytes]:
    picks = ranked_clips(clips)
    if not picks:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), 2, figsize=(12, 2.6 * len(picks)), dpi=80, squeeze=False)
    for row, (label, name, clip) in zip(axes, picks):
        frames = np.arange(len(clip.true)) if clip.index is None else clip.index
        valid = np.ones(len(clip.true), bool) if clip.valid is None else np.asarray(clip.valid, bool)
        for ax, d, target in zip(row, (0, 1), NAMES):
            ax.plot(frames[valid], clip.true[valid, d], "k-", lw=1.2, label="true")
            ax.plot(frames, clip.pred[:, d], "-", c="tab:red", lw=1.0, label="predicted")
            ax.set(ylim=(-1.05, 1.05), ylabel=target, title=f"{name}: {label}")
        row[0].legend(fontsize=7)
    axes[-1][0].set_xlabel("frame")
    axes[-1][1].set_xlabel("frame")
    fig.tight_layout()
    return figure_png(fig)


def embeddings_png(embeddings: np.ndarray, values: np.ndarray, method: str) -> bytes:
    xy = project_2d(embeddings, method)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=80)
    for ax, d, name in zip(axes, (0, 1), NAMES):
        points = ax.scatter(xy[:, 0], xy[:, 1], c=values[:, d], cmap="coolwarm", vmin=-1, vmax=1, s=12)
        fig.colorbar(points, ax=ax, label=f"clip mean {name}")
        ax.set_title(f"test clip embeddings ({method.upper()}, {len(xy)} clips)")
    fig.tight_layout()
    return figure_png(fig)


def training_png(run_dir: Path) -> Optional[bytes]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    loss = [(r["step"], r["train/loss"]) for r in lines if "train/loss" in r]
    val = [(r["step"], r["val/ccc"]) for r in lines if "val/ccc" in r]
    if not loss and not val:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    if loss:
        ax.plot(*zip(*loss), label="train loss (MSE + 1 - CCC)")
    if val:
        ax.plot(*zip(*val), "o-", label="val CCC (pooled)")
    ax.set(xlabel="step", title="training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def clip_embeddings(rows: Sequence[Dict[str, Any]], clips: Dict[str, Clip]):
    """One embedding per clip (the mean over its chunks, weighted by frames) and its mean valence/arousal."""
    names = sorted({r["clip"] for r in rows if "embedding" in r})
    emb, values = [], []
    for name in names:
        parts = [r for r in rows if r["clip"] == name]
        weights = np.array([len(r["pred"]) for r in parts], float)
        emb.append((np.stack([r["embedding"] for r in parts]) * weights[:, None]).sum(0) / weights.sum())
        _, true = clips[name].frames()
        values.append(true.mean(0) if len(true) else np.zeros(2))
    return np.array(emb), np.array(values)


def write_figures(run_dir: Path, clips: Dict[str, Clip], rows: Sequence[Dict[str, Any]], state,
                  logger: MetricLogger) -> List[Path]:
    """Rank 0, after the test split: every figure into RUN/figures and TensorBoard (test/...); returns the files."""
    figures: Dict[str, Optional[bytes]] = {"va_plane": va_plane_png(list(clips.values())),
                                           "curves": curves_png(clips), "training": training_png(run_dir)}
    emb, values = clip_embeddings(rows, clips)
    if len(emb) >= 3:
        methods = ["pca"] + (["umap"] if importlib.util.find_spec("umap") and len(emb) > 4 else [])
        for method in methods:
            figures[f"embeddings_{method}"] = embeddings_png(emb, values, method)
    written = []
    for name, png in figures.items():
        if png is None:
            continue
        path = run_dir / "figures" / f"{name}.png"
        atomic_write_bytes(path, png)
        logger.image(f"test/{name}", png_tensor(png), state.step)
        written.append(path)
    return written
