"""Mixed precision: bf16 autocast on GPU by default (no loss scaling needed), fp32 or bf16 on CPU by config."""
import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 on CUDA (fp16 overflows in these losses; bf16 does not) and fp32 on CPU."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's autocast context; losses leave it themselves to compute in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
