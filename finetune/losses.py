"""Training losses per task: soft-target CE with Mixup/CutMix (single label), BCE (multi-label, plus L1 on any
continuous values), MSE + CCC (V/A)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from data_tools.registry import MULTI_LABEL, REGRESSION, Task


def ccc_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - mean over outputs of the concordance correlation coefficient (differentiable); `weight` (N, 1), 1 for
    the rows that count and 0 for the rest, masks rows out without indexing (no host sync), and with no row
    counted the CCC is 0."""
    if weight is None:
        weight = torch.ones_like(pred[:, :1])
    n = weight.sum().clamp(min=1)
    mp, mt = (weight * pred).sum(0) / n, (weight * target).sum(0) / n
    cov = (weight * (pred - mp) * (target - mt)).sum(0) / n
    var_p, var_t = (weight * (pred - mp) ** 2).sum(0) / n, (weight * (target - mt) ** 2).sum(0) / n
    ccc = 2 * cov / (var_p + var_t + (mp - mt) ** 2 + 1e-8)
    return 1 - ccc.mean()


class RegressionLoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        return F.mse_loss(pred, target) + ccc_loss(pred, target)


class MultiLabelLoss(nn.Module):
    """BCE on the first `num_classes` outputs; outputs past them are continuous values (EMOTIC's V/A/D), an L1
    loss on their scale `value_range` (EMOTIC's baseline pairs the categories with an L1-type loss on V/A/D)."""

    def __init__(self, num_classes: Optional[int] = None, value_range: Tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        self.num_classes, self.span = num_classes, float(value_range[1] - value_range[0])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        n = self.num_classes or logits.shape[1]
        loss = F.binary_cross_entropy_with_logits(logits[:, :n], target[:, :n])
        if logits.shape[1] > n:
            loss = loss + F.l1_loss(logits[:, n:], target[:, n:]) / self.span
        return loss


def make_criterion(task: Task, mixup_active: bool, smoothing: float, num_classes: Optional[int] = None,
                   value_range: Tuple[float, float] = (0.0, 1.0)) -> nn.Module:
    if task == MULTI_LABEL:
        return MultiLabelLoss(num_classes, value_range)
    if task == REGRESSION:
        return RegressionLoss()
    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
