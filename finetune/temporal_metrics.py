"""Valence/arousal over time scored as the field does: CCC pooled over every frame (the ABAW convention) and per clip,
PCC, RMSE, SAGR, clip-bootstrap 95 % intervals, and the reference predictors that expose what a score means."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from finetune.metrics import ccc

CONSTANT = 1e-9  # a standard deviation at or below this is a constant series (rounding leaves ~1e-17)


@dataclass
class Clip:
    """One clip's per-frame predictions and targets (T, D) and which frames are annotated (T,)."""
    pred: np.ndarray
    true: np.ndarray
    valid: Optional[np.ndarray] = None
    index: Optional[np.ndarray] = None  # each frame's index in its clip (frames of missing images are absent)

    def frames(self):
        keep = np.ones(len(self.true), bool) if self.valid is None else np.asarray(self.valid, bool)
        return np.asarray(self.pred, float)[keep], np.asarray(self.true, float)[keep]


def pcc(pred: np.ndarray, true: np.ndarray) -> Optional[float]:
    """Pearson's r; None where either side is constant (undefined)."""
    sp, st = pred.std(), true.std()
    if sp <= CONSTANT or st <= CONSTANT:
        return None
    return float(((pred - pred.mean()) * (true - true.mean())).mean() / (sp * st))


def sagr(pred: np.ndarray, true: np.ndarray) -> float:
    """Sign agreement: the share of frames whose prediction has the sign of the target (on a scale centred at 0)."""
    return float((np.sign(pred) == np.sign(true)).mean())


def _pooled(clips: Sequence[Clip], d: int) -> float:
    p = np.concatenate([c.frames()[0][:, d] for c in clips])
    t = np.concatenate([c.frames()[1][:, d] for c in clips])
    return ccc(p, t)


def _per_clip(clips: Sequence[Clip], d: int):
    """Mean CCC over the clips whose target moves (a constant target has no CCC worth averaging), and how many
    clips were left out for that."""
    values, constant = [], 0
    for c in clips:
        p, t = c.frames()
        if len(t) < 2 or t[:, d].std() <= CONSTANT:
            constant += 1
            continue
        values.append(ccc(p[:, d], t[:, d]))
    return (float(np.mean(values)) if values else None), constant


def bootstrap_interval(clips: Sequence[Clip], statistic, samples: int, seed: int):
    """95 % interval of `statistic(clips)` over clips drawn with replacement (clips, not frames, are the units)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        v = statistic([clips[i] for i in rng.integers(0, len(clips), len(clips))])
        if v is not None:
            values.append(v)
    if not values:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def temporal_metrics(clips: Sequence[Clip], names: Sequence[str] = ("valence", "arousal"),
                     bootstrap: int = 1000, seed: int = 0) -> Dict:
    """Per target: pooled CCC, per-clip mean CCC (with the constant-target clips counted), PCC, RMSE, SAGR, and
    clip-bootstrap intervals of both CCCs; then the means over the targets (`ccc`, `ccc_per_clip`)."""
    clips = [c for c in clips if len(c.frames()[1])]
    out: Dict = {"clips": len(clips), "frames": int(sum(len(c.frames()[1]) for c in clips))}
    for d, name in enumerate(names):
        p = np.concatenate([c.frames()[0][:, d] for c in clips])
        t = np.concatenate([c.frames()[1][:, d] for c in clips])
        per_clip, constant = _per_clip(clips, d)
        out[name] = {
            "ccc": ccc(p, t), "ccc_per_clip": per_clip, "clips_constant_target": constant,
            "pcc": pcc(p, t), "rmse": float(np.sqrt(((p - t) ** 2).mean())), "sagr": sagr(p, t),
            "ccc_ci95": bootstrap_interval(clips, lambda cs, d=d: _pooled(cs, d), bootstrap, seed) if bootstrap else None,
            "ccc_per_clip_ci95": bootstrap_interval(clips, lambda cs, d=d: _per_clip(cs, d)[0], bootstrap, seed)
            if bootstrap else None}
    out["ccc"] = float(np.mean([out[n]["ccc"] for n in names]))
    per = [out[n]["ccc_per_clip"] for n in names]
    out["ccc_per_clip"] = float(np.mean(per)) if all(v is not None for v in per) else None
    return out


def train_mean_predictor(clips: Sequence[Clip], train_mean: Sequence[float]) -> List[Clip]:
    """The constant reference: every frame predicted as the training set's mean."""
    return [Clip(np.broadcast_to(np.asarray(train_mean, float), c.true.shape).copy(), c.true, c.valid)
            for c in clips]


def clip_mean_oracle(clips: Sequence[Clip]) -> List[Clip]:
    """The oracle that knows each clip's true mean and nothing of its course: a high pooled CCC where clips differ
    in level, a per-clip CCC of 0 (the reference that shows how much of a pooled score is level, not time)."""
    out = []
    for c in clips:
        _, t = c.frames()
        out.append(Clip(np.broadcast_to(t.mean(0), c.true.shape).copy(), c.true, c.valid))
    return out
