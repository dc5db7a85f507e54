"""Training losses per task: soft-target CE with Mixup/CutMix (single label), BCE (multi-label), MSE + CCC (V/A)."""
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from data_tools.registry import MULTI_LABEL, REGRESSION, Task


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over outputs of the concordance correlation coefficient (differentiable)."""
    mp, mt = pred.mean(0), target.mean(0)
    cov = ((pred - mp) * (target - mt)).mean(0)
    ccc = 2 * cov / (pred.var(0, unbiased=False) + target.var(0, unbiased=False) + (mp - mt) ** 2 + 1e-8)
    return 1 - ccc.mean()


class RegressionLoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = pred.float(), target.float()
        return F.mse_loss(pred, target) + ccc_loss(pred, target)


class MultiLabelLoss(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def make_criterion(task: Task, mixup_active: bool, smoothing: float) -> nn.Module:
    if task == MULTI_LABEL:
        return MultiLabelLoss()
    if task == REGRESSION:
        return RegressionLoss()
    if mixup_active:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    return LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()
