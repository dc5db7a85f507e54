"""Training strategy behind one interface: DDP (or the bare model in one process) with accumulation and clipping."""
import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from runtime import distributed
from runtime.checkpoint import CheckpointStore, load_checkpoint, load_model_state

log = logging.getLogger(__name__)


class DDPStrategy:
    """Wraps the model in DDP when there is more than one rank; owns backward, clipping and the optimizer step.

    Gradient accumulation: run each micro-batch inside `accumulate(boundary)`; only the last micro-batch of a step
    (boundary=True) all-reduces gradients, the others run under DDP's `no_sync`.
    """
    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 accum_steps: int = 1, clip_grad: Optional[float] = None):
        self.module = model.to(device)
        self.device = device
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.clip_grad = clip_grad
        if distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module

    def accumulate(self, boundary: bool):
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> torch.Tensor:
        """Clip (if configured), step, zero grads; returns the pre-clip gradient norm as a device tensor."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def save_checkpoint(self, store: CheckpointStore, step: int, client_state: Dict[str, Any]) -> Optional[Path]:
        return store.save(step, {**self.state_dict(), **client_state})

    def load_checkpoint(self, path: Path) -> Dict[str, Any]:
        """Restore model and optimizer; returns the rest of the checkpoint (step, RNG, data position, ...)."""
        state = load_checkpoint(path)
        load_model_state(self.module, state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return state
