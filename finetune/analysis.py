"""What a scored test split shows beyond its numbers: the confusion matrix, a gallery of misclassified images, and
the embeddings (TensorBoard's projector, a PCA / UMAP picture) coloured by class."""
import csv
import io
import logging
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from data_tools.registry import SINGLE_LABEL
from finetune.predictions import SplitPredictions
from runtime.atomic import atomic_write_bytes, atomic_write_text
from runtime.metric_logger import MetricLogger

log = logging.getLogger("finetune")
GALLERY_MAX = 64


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a cluster node)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_png(fig, dpi=None) -> bytes:
    """A figure as PNG bytes, the figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def png_tensor(png: bytes) -> torch.Tensor:
    """A PNG as the (3, H, W) float image TensorBoard's add_image takes."""
    from PIL import Image
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def confusion_png(cm, classes: Sequence[str]) -> bytes:
    plt = pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)), dpi=80)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    return figure_png(fig)


def write_confusion(run_dir: Path, cm, classes: Sequence[str], logger: MetricLogger, step: int) -> None:
    """confusion_test.csv and .png, and test/confusion in TensorBoard."""
    rows = [["true\\predicted", *classes]] + [[c, *r] for c, r in zip(classes, cm)]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write_text(run_dir / "confusion_test.csv", buf.getvalue())
    png = confusion_png(cm, classes)
    atomic_write_bytes(run_dir / "confusion_test.png", png)
    logger.image("test/confusion", png_tensor(png), step)


def misclassified(pred: SplitPredictions) -> List[int]:
    """Rows (among those with thumbnails) whose top-1 is wrong, most confident mistakes first."""
    if pred.thumbnails is None:
        return []
    rows = pred.thumbnail_rows
    logits = pred.outputs[rows]
    top = logits.argmax(1)
    wrong = np.nonzero(top != pred.targets[rows].astype(int))[0]
    margin = logits[wrong, top[wrong]] - logits[wrong, pred.targets[rows][wrong].astype(int)]
    return [int(i) for i in wrong[np.argsort(-margin)]]


def gallery_png(pred: SplitPredictions, classes: Sequence[str], limit: int = GALLERY_MAX) -> Optional[bytes]:
    """A grid of misclassified test images titled 'true -> predicted' (None when there are none to show)."""
    order = misclassified(pred)[:limit]
    if not order:
        return None
    plt = pyplot()
    cols = min(8, len(order))
    nrows = -(-len(order) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.6 * cols, 1.9 * nrows), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        row = pred.thumbnail_rows[i]
        ax.imshow(pred.thumbnails[i])
        ax.set_title(f"{classes[int(pred.targets[row])]}\n-> {classes[int(pred.outputs[row].argmax())]}", fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def class_names(pred: SplitPredictions, task: str, classes: Sequence[str]) -> List[str]:
    """The class each row is coloured by: its label (multi-label: its first positive, or 'none')."""
    if task == SINGLE_LABEL:
        return [classes[int(t)] for t in pred.targets]
    if pred.targets.ndim == 2 and pred.targets.shape[1] >= len(classes):
        return [classes[int(np.argmax(t[:len(classes)]))] if t[:len(classes)].any() else "none"
                for t in pred.targets]
    return ["-"] * len(pred.targets)


def project_2d(features: np.ndarray, method: str = "pca") -> np.ndarray:
    """Embeddings (n, d) -> (n, 2): PCA (numpy) or UMAP (umap-learn, when installed)."""
    x = features - features.mean(0)
    if method == "umap":
        import umap
        return umap.UMAP(n_components=2, random_state=0, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def projection_png(features: np.ndarray, names: Sequence[str], method: str = "pca") -> bytes:
    """A 2-D picture of the embeddings (project_2d), one colour per class."""
    xy = project_2d(features, method)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=80)
    for name in sorted(set(names)):
        rows = [i for i, n in enumerate(names) if n == name]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=6, label=name)
    ax.legend(fontsize=6, markerscale=2, loc="best")
    ax.set_title(f"test embeddings ({method.upper()}, {len(names)} samples)")
    fig.tight_layout()
    return figure_png(fig)


def write_embeddings(run_dir: Path, pred: SplitPredictions, task: str, classes: Sequence[str],
                     logger: MetricLogger, step: int) -> List[Path]:
    """TensorBoard's projector (the thumbnailed rows, with label and prediction) and embeddings_pca.png (and
    embeddings_umap.png with umap-learn); returns the PNGs written."""
    if pred.features is None:
        return []
    names = class_names(pred, task, classes)
    if logger.writer is not None and pred.thumbnails is not None:
        rows = pred.thumbnail_rows
        predicted = [classes[int(o[:len(classes)].argmax())] for o in pred.outputs[rows]]
        images = torch.from_numpy(pred.thumbnails).permute(0, 3, 1, 2).float() / 255
        logger.writer.add_embedding(torch.from_numpy(pred.features[rows]),
                                    metadata=[[names[r], p, pred.keys[r]] for r, p in zip(rows, predicted)],
                                    metadata_header=["label", "predicted", "key"], label_img=images,
                                    global_step=step, tag="test_embeddings")
    written = []
    import importlib.util
    methods = ["pca"] + (["umap"] if importlib.util.find_spec("umap") else [])
    for method in methods:
        path = run_dir / f"embeddings_{method}.png"
        atomic_write_bytes(path, projection_png(pred.features, names, method))
        written.append(path)
    return written


def write_analysis(run_dir: Path, pred: SplitPredictions, metrics, task: str, classes: Sequence[str],
                   logger: MetricLogger, step: int) -> None:
    """Rank 0, after the test split: confusion (single label), the gallery of mistakes, the embeddings."""
    if task == SINGLE_LABEL:
        write_confusion(run_dir, metrics["confusion"], classes, logger, step)
        png = gallery_png(pred, classes)
        if png is not None:
            atomic_write_bytes(run_dir / "misclassified_test.png", png)
            logger.image("test/misclassified", png_tensor(png), step)
    write_embeddings(run_dir, pred, task, classes, logger, step)
