"""FLOPs of a training step, counted once at start-up (torch.utils.flop_counter), for the MFU estimate."""
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 peaks per device in TFLOP/s, looked up when `train.peak_tflops` is unset on a GPU
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running fn() (matmuls and convolutions, as torch's counter sees them)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_step_flops(student_forward: Callable[[], object], frozen_forward: Optional[Callable[[], object]] = None
                        ) -> int:
    """A trained forward costs 3x its FLOPs with the backward (2x for it); a frozen one (the teacher) 1x."""
    total = count_flops(student_forward)
    frozen = count_flops(frozen_forward) if frozen_forward is not None else 0
    return 3 * (total - frozen) + frozen


def measure_matmul_tflops(device: torch.device = torch.device("cpu"), n: int = 2048, repeats: int = 5,
                          dtype: torch.dtype = torch.float32) -> float:
    """Best TFLOP/s of an n x n matmul on this device and thread count: the practical peak for MFU where no
    vendor figure applies (a CPU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def device_peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    """The configured peak, else a known GPU's bf16 peak; None (no MFU) on an unknown device or CPU."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return None
