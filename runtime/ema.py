"""An exponential moving average of the trained weights (timm's ModelEmaV3, kept in fp32), a checkpointed part."""
import logging
from typing import Any, Dict

import torch
from timm.utils import ModelEmaV3

log = logging.getLogger(__name__)


class WeightEma:
    """EMA weights of `module`, updated after every optimizer step (`train.ema_decay`); saved and restored with the
    run's checkpoints like any registered part, so a resumed run's EMA equals an uninterrupted one's."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.source = module
        self.ema = ModelEmaV3(module, decay=decay, dtype=torch.float32)
        self.ema.requires_grad_(False)
        for part in self.ema.module.modules():  # a deep copy keeps a wrapper's hooks (DeepSpeed's engine): not ours
            part._forward_hooks.clear()
            part._forward_pre_hooks.clear()

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    @torch.no_grad()
    def update(self, step: int) -> None:
        self.ema.update(self.source, step)

    def state_dict(self) -> Dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state)

    def start_fresh(self) -> None:
        """A checkpoint without EMA weights (written before train.ema_decay was set): start from the weights."""
        log.warning("the checkpoint holds no EMA weights: the EMA starts from the resumed weights")
        self.ema.set(self.source)
