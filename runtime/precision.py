"""Mixed precision: bf16 autocast on GPUs that have bf16 tensor cores (compute capability >= 8.0), fp16 with a
GradScaler on older ones, fp32 on CPU unless asked."""
import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def bf16_capable(device: torch.device) -> bool:
    """Ampere (8.0) and later: bf16 tensor cores. V100 (7.0) and T4 (7.5) emulate bf16 slowly."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 on a CUDA GPU of compute capability >= 8.0 (fp16 overflows in these losses, bf16 does
    not), fp16 with loss scaling on an older GPU, and fp32 on CPU. An explicit bf16 on an older GPU is an error."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if bf16_capable(device) else "fp16"
    if precision == "bf16" and not bf16_capable(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"train.precision=bf16 on {name} (compute capability "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}), which has no bf16 tensor "
                         f"cores: use precision auto or fp16 (loss-scaled)")
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's autocast context; losses leave it themselves to compute in fp32."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
