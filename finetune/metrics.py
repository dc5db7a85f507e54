"""Evaluation metrics: top-k, per-class accuracy, macro-F1, confusion (single label); mAP and V/A/D error
(multi-label); CCC (V/A)."""
from typing import Dict, List, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score

from data_tools.registry import MULTI_LABEL, REGRESSION, SINGLE_LABEL, Task

PRIMARY: Dict[Task, str] = {SINGLE_LABEL: "top1", MULTI_LABEL: "mAP", REGRESSION: "ccc"}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict:
    pred = logits.argmax(1)
    cm = confusion_matrix(labels, pred, labels=list(range(len(classes))))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(cm.sum(1) > 0, np.diag(cm) / cm.sum(1), np.nan)
    return {"top1": topk_accuracy(logits, labels, 1), "top3": topk_accuracy(logits, labels, min(3, len(classes))),
            "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(len(classes))),
                                       zero_division=0)),
            "per_class_accuracy": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, per_class)},
            "confusion": cm.tolist(), "n": int(len(labels))}


def multilabel_metrics(scores: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                       continuous: Sequence[str] = ()) -> Dict:
    """mAP: mean over the classes that have a positive of sklearn's average precision (EMOTIC's mean over its 26
    categories); the continuous values after the classes: mean absolute error each and their mean (vad_error)."""
    n = len(classes)
    values = {}
    if continuous:
        err = np.abs(scores[:, n:n + len(continuous)] - targets[:, n:n + len(continuous)]).mean(0)
        values = {**{f"mae_{name}": float(e) for name, e in zip(continuous, err)}, "vad_error": float(err.mean())}
    scores, targets = scores[:, :n], targets[:, :n]
    ap = {}
    for j, name in enumerate(classes):
        if targets[:, j].any():
            ap[name] = float(average_precision_score(targets[:, j], scores[:, j]))
    return {"mAP": float(np.mean(list(ap.values()))) if ap else float("nan"), "per_class_ap": ap,
            "n": int(len(targets)), **values}


def ccc(pred: np.ndarray, target: np.ndarray) -> float:
    """Lin's concordance correlation: 2 cov / (var_p + var_t + (mean_p - mean_t)^2), population moments."""
    mp, mt = pred.mean(), target.mean()
    cov = ((pred - mp) * (target - mt)).mean()
    return float(2 * cov / (pred.var() + target.var() + (mp - mt) ** 2 + 1e-12))


def regression_metrics(pred: np.ndarray, target: np.ndarray, names: List[str]) -> Dict:
    per = {f"ccc_{n}": ccc(pred[:, i], target[:, i]) for i, n in enumerate(names)}
    return {"ccc": float(np.mean(list(per.values()))), **per, "mse": float(((pred - target) ** 2).mean()),
            "n": int(len(target))}


def compute_metrics(task: Task, outputs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                    continuous: Sequence[str] = ()) -> Dict:
    if task == SINGLE_LABEL:
        return classification_metrics(outputs, targets.astype(int), classes)
    if task == MULTI_LABEL:
        return multilabel_metrics(outputs, targets, classes, continuous)
    return regression_metrics(outputs, targets, list(classes))
