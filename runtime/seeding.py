"""Seeding; capture/restore of the python, numpy and torch CPU RNGs and of this rank's own CUDA generator."""
import logging
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """RNG states as tensors and plain tuples only, so checkpoints load with weights_only=True. On a CUDA `device`
    only that device's generator is kept: the one this rank draws from, whatever else is visible to it (torchrun
    shows a rank every GPU of the node, per-task binding shows it one)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Dict[str, Any], device: Optional[torch.device] = None) -> None:
    """The states capture_rng_state took, onto this process; the saved CUDA generator goes to `device` (a
    checkpoint written under one GPU layout resumes under another)."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        return
    if isinstance(saved, (list, tuple)):  # older checkpoints: every visible device's generator, by index
        index = device.index or 0
        if index >= len(saved):
            log.warning("the checkpoint holds CUDA RNG states of %d devices, none for %s: its generator is left "
                        "as seeded", len(saved), device)
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


def _as_tuples(obj: Any) -> Any:
    # random.setstate needs tuples; some serialisers hand lists back
    return tuple(_as_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj
