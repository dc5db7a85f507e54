"""FLOPs of a training step for the MFU estimate: counted once at start-up under one rule on CPU and GPU alike
(torch's flop counter), an analytic count of ViT-style transformers to check it, and the peaks of known devices."""
import contextlib
import time
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 peaks per device in TFLOP/s, looked up when `train.peak_tflops` is unset on a GPU
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


@contextlib.contextmanager
def counting_rule() -> Iterator[None]:
    """What every count runs under: no autograd; nn.MultiheadAttention's fast path off (its fused kernel has no FLOP
    formula and would count 0, and autocast turns it off anyway, so one forward could count it and another not);
    scaled_dot_product_attention through its math kernel, whose matmuls are counted on every device (the CPU's
    fused kernel has no formula; CUDA's flash and efficient ones count the same 4·N²·d per head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def count_flops(fn: Callable[[], object], context: Optional[Callable[[], ContextManager]] = None) -> int:
    """FLOPs of running fn() (matmuls and convolutions) under counting_rule() and `context()` (e.g. the step's
    autocast)."""
    with counting_rule(), (context or contextlib.nullcontext)(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_step_flops(forward: Callable[[], object], frozen_forward: Optional[Callable[[], object]] = None,
                        context: Optional[Callable[[], ContextManager]] = None) -> int:
    """A training step's FLOPs: `forward` is the trained model's forward (3x with its backward), `frozen_forward`
    the frozen work the step does beside it (e.g. a live teacher in the batch preparation, 1x). Both are counted
    under the same rule and context."""
    trained = count_flops(forward, context)
    frozen = count_flops(frozen_forward, context) if frozen_forward is not None else 0
    return 3 * trained + frozen


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Matmul FLOPs of `depth` ViT blocks on `tokens` tokens: qkv (6·N·d²), output projection (2·N·d²), MLP
    (4·N·d·hidden) and attention scores and values (4·N²·d); norms, softmax and activations are not counted (nor
    are they by the counter)."""
    hidden = int(width * mlp_ratio)
    per_block = 2 * tokens * width * 3 * width + 2 * tokens * width * width + 4 * tokens * width * hidden \
        + 4 * tokens * tokens * width
    return depth * per_block


def patch_embed_flops(img_size: int, patch_size: int, width: int, in_chans: int = 3) -> int:
    """The patch embedding (a stride-p convolution) over every patch of a square image."""
    patches = (img_size // patch_size) ** 2
    return 2 * patches * in_chans * patch_size ** 2 * width


def vit_flops(img_size: int, patch_size: int, width: int, depth: int, mlp_ratio: float = 4.0,
              out_dim: Optional[int] = None) -> int:
    """A ViT image tower: patch embedding, blocks on the patches + CLS, and a projection of the pooled token to
    `out_dim` (CLIP's visual projection) when given."""
    tokens = (img_size // patch_size) ** 2 + 1
    proj = 2 * width * out_dim if out_dim else 0
    return patch_embed_flops(img_size, patch_size, width) + transformer_flops(tokens, width, depth, mlp_ratio) + proj


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
