"""Learning-rate schedule: linear warmup then half-cycle cosine, a pure function of the fractional epoch."""
import math


def warmup_cosine_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """MAE's schedule, evaluated per step from `epoch = step / steps_per_epoch`; stateless, so resume is exact."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
