"""LoRA on the query and value parts of a ViT's fused `qkv` projection (timm's Attention): the frozen weight W gets
(alpha / r) B A added to its Q and V rows only, so the attention logits themselves change; mergeable, and saved as
an adapter-only state dict. (peft adapts a fused qkv Linear as a whole, Q, K and V together.)"""
import math
from typing import Dict, List, Sequence

import torch
from torch import nn

PARTS = ("q", "k", "v")


class QVLoRA(nn.Module):
    """A wrapped fused qkv Linear: base(x) plus, for each part in `targets`, scale * x A^T B^T in that part's rows.
    B starts at zero (the wrapped layer's output is unchanged at init), A as in LoRA (Kaiming uniform)."""

    def __init__(self, qkv: nn.Linear, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q", "v")):
        super().__init__()
        if qkv.out_features % 3:
            raise ValueError(f"a fused qkv projection has 3 x dim outputs, got {qkv.out_features}")
        unknown = set(targets) - set(PARTS)
        if unknown or not targets:
            raise ValueError(f"LoRA targets {list(targets)}: expected a non-empty subset of {PARTS}")
        self.base, self.rank, self.scale = qkv, rank, alpha / rank
        self.targets = [p for p in PARTS if p in targets]
        self.dim = qkv.out_features // 3
        for p in qkv.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, qkv.in_features)) for t in self.targets})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(self.dim, rank)) for t in self.targets})
        for a in self.lora_A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update to the fused weight (3 dim, in): zero rows for every part not adapted."""
        rows = [self.scale * self.lora_B[p] @ self.lora_A[p] if p in self.targets else
                self.base.weight.new_zeros(self.dim, self.base.in_features) for p in PARTS]
        return torch.cat(rows, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        parts = [self.scale * (x @ self.lora_A[p].T) @ self.lora_B[p].T if p in self.targets else None
                 for p in PARTS]
        zeros = out.new_zeros(*out.shape[:-1], self.dim)
        return out + torch.cat([zeros if p is None else p.to(out.dtype) for p in parts], -1)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("q", "v"),
               last_blocks: int = 0) -> List[QVLoRA]:
    """Freeze `model` and wrap the qkv projection of its transformer blocks (the last `last_blocks`, or all) with
    LoRA; the adapters are then the only parameters that train (a head added later trains too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model.blocks)
    chosen = blocks[-last_blocks:] if last_blocks else blocks
    adapters = []
    for block in chosen:
        block.attn.qkv = QVLoRA(block.attn.qkv, rank, alpha, targets)
        adapters.append(block.attn.qkv)
    return adapters


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters alone (lora_A.*, lora_B.* under their module paths): what a LoRA run needs to save."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load adapters into a model wrapped the same way; a key it lacks or does not have is an error."""
    own = set(lora_state_dict(model))
    given = set(state)
    if own != given:
        raise KeyError(f"adapter state does not fit: missing {sorted(own - given)[:4]}, unexpected "
                       f"{sorted(given - own)[:4]}")
    model.load_state_dict(state, strict=False)
