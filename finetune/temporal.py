"""Heads over a clip's per-frame features and what scores them: a per-frame head (no context), mean pooling, a small
transformer over frames (time embedding, padding mask); the masked MSE + (1 - CCC) loss in fp32; overlapping
windows stitched so that every frame is predicted once from the windows that cover it."""
from typing import Callable, List

import torch
from torch import nn

from finetune.losses import ccc_loss


class PerFrameHead(nn.Module):
    """Each frame's values from its own features alone: the reference a temporal head must beat."""

    def __init__(self, dim: int, outputs: int = 2):
        super().__init__()
        self.head = nn.Linear(dim, outputs)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(feats)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames of each clip: x (B, T, D), mask (B, T) True where a frame is real."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class MeanPoolHead(nn.Module):
    """The clip's mean feature over its valid frames, one value pair for the whole clip (given to every frame)."""

    def __init__(self, dim: int, outputs: int = 2):
        super().__init__()
        self.head = nn.Linear(dim, outputs)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(masked_mean(feats, mask)).unsqueeze(1).expand(-1, feats.shape[1], -1)


class TemporalTransformerHead(nn.Module):
    """Frames projected, a learned time embedding added, pre-norm transformer layers over the clip with padded frames
    masked out of attention, then a value pair per frame: every frame's output sees its context."""

    def __init__(self, dim: int, width: int = 128, depth: int = 2, heads: int = 4, max_frames: int = 256,
                 outputs: int = 2, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(dim, width)
        self.time = nn.Parameter(torch.zeros(1, max_frames, width))
        nn.init.trunc_normal_(self.time, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, outputs)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = feats.shape[1]
        if t > self.time.shape[1]:
            raise ValueError(f"{t} frames in a window, the head's time embedding has {self.time.shape[1]}")
        x = self.proj(feats) + self.time[:, :t]
        x = self.encoder(x, src_key_padding_mask=~mask.bool())
        return self.head(self.norm(x))


def va_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE + (1 - mean CCC) over the valid frames, in fp32 whatever the autocast: padded and unannotated
    frames (mask False) change neither term."""
    with torch.autocast(pred.device.type, enabled=False):
        w = mask.reshape(-1, 1).float()  # a weight, not an index: no host sync, and a batch with no valid frame is 1
        p = pred.reshape(-1, pred.shape[-1]).float()
        t = target.reshape(-1, target.shape[-1]).float()
        mse = (w * (p - t) ** 2).sum() / (w.sum().clamp(min=1) * p.shape[-1])
        return mse + ccc_loss(p, t, w)  # CCC pooled over the batch's valid frames


def window_starts(frames: int, size: int, stride: int) -> List[int]:
    """Starts of overlapping windows of `size` frames every `stride`, the last one ending at the clip's end, so
    every frame is in at least one window."""
    if frames <= size:
        return [0]
    starts = list(range(0, frames - size + 1, stride))
    if starts[-1] != frames - size:
        starts.append(frames - size)
    return starts


@torch.no_grad()
def stitch(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], feats: torch.Tensor, size: int,
           stride: int) -> torch.Tensor:
    """One clip's per-frame predictions (T, D) from overlapping windows of its features (T, F): each frame the mean
    of the predictions of the windows that cover it (predict: (1, w, F), mask (1, w) -> (1, w, D))."""
    t = feats.shape[0]
    total, count = None, torch.zeros(t, 1)
    for s in window_starts(t, size, stride):
        window = feats[s:s + size].unsqueeze(0)
        out = predict(window, torch.ones(window.shape[:2], dtype=torch.bool, device=window.device))[0].float().cpu()
        total = torch.zeros(t, out.shape[-1]) if total is None else total
        total[s:s + out.shape[0]] += out
        count[s:s + out.shape[0]] += 1
    return total / count
