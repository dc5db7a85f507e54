"""Attention fusion of the scene (a) and person (b) embeddings into one (docs/method.md §3), chosen by name."""
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SumLNELU(nn.Module):
    """Reference default: g = ELU(W (LN(a) + LN(b)) + w0), one LayerNorm shared by both inputs."""
    uses_person = True

    def __init__(self, dim: int, heads: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.elu(self.linear(self.norm(a) + self.norm(b)))


class WeightedSum(nn.Module):
    """g = LN(sum_h alpha_h * a + beta_h * b) + bias, with learnable per-head vectors alpha_h, beta_h."""
    uses_person = True

    def __init__(self, dim: int, heads: int = 3):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((heads, dim), 1.0 / heads))
        self.beta = nn.Parameter(torch.full((heads, dim), 1.0 / heads))
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mixed = (self.alpha[None] * a[:, None] + self.beta[None] * b[:, None]).sum(dim=1)
        return self.norm(mixed) + self.bias


class GatedAttention(nn.Module):
    """Per head a score for a and one for b, softmax across the two inputs (the reference normalised over a
    size-1 axis, so its weights were always 1); g = swish(sum_h w_a^h a + w_b^h b) + bias."""
    uses_person = True

    def __init__(self, dim: int, heads: int = 3):
        super().__init__()
        self.score_a = nn.Linear(dim, heads)
        self.score_b = nn.Linear(dim, heads)
        self.bias = nn.Parameter(torch.zeros(dim))

    def gate_weights(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, heads, 2): the weights of a and b in each head; they sum to 1 over the last axis."""
        return torch.stack([self.score_a(a), self.score_b(b)], dim=-1).softmax(dim=-1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        w = self.gate_weights(a, b)
        mixed = w[..., 0].sum(dim=1, keepdim=True) * a + w[..., 1].sum(dim=1, keepdim=True) * b
        return F.silu(mixed) + self.bias


class MLPGLU(nn.Module):
    """Per head softmax(W_a^h a) * a + softmax(W_b^h b) * b (softmax over channels), heads concatenated, an MLP,
    a GLU gate m * sigmoid(W m), ReLU, + bias."""
    uses_person = True

    def __init__(self, dim: int, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.attn_a = nn.Linear(dim, dim * heads)
        self.attn_b = nn.Linear(dim, dim * heads)
        self.mlp = nn.Sequential(nn.Linear(dim * heads, dim), nn.GELU(), nn.Linear(dim, dim))
        self.gate = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, dim = a.shape
        wa = self.attn_a(a).view(n, self.heads, dim).softmax(dim=-1)
        wb = self.attn_b(b).view(n, self.heads, dim).softmax(dim=-1)
        heads = wa * a[:, None] + wb * b[:, None]
        m = self.mlp(heads.reshape(n, self.heads * dim))
        return F.relu(m * torch.sigmoid(self.gate(m))) + self.bias


class BilinearResidual(nn.Module):
    """Not released by the authors: g = a + b + P((U a) * (V b)), low-rank bilinear pooling; P starts at zero,
    so training starts from the plain sum."""
    uses_person = True

    def __init__(self, dim: int, heads: int = 3, rank: int = 64):
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(dim, rank, bias=False)
        self.p = nn.Linear(rank, dim)
        nn.init.zeros_(self.p.weight)
        nn.init.zeros_(self.p.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b + self.p(self.u(a) * self.v(b))


class SceneOnly(nn.Module):
    """Ablation without the person branch: g = a."""
    uses_person = False

    def __init__(self, dim: int, heads: int = 3):
        super().__init__()

    def forward(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return a


FUSIONS: Dict[str, Callable[..., nn.Module]] = {
    "sum_ln_elu": SumLNELU,
    "weighted_sum": WeightedSum,
    "gated_attention": GatedAttention,
    "mlp_glu": MLPGLU,
    "bilinear_residual": BilinearResidual,
    "scene_only": SceneOnly,
}


def make_fusion(name: str, dim: int, heads: int = 3) -> nn.Module:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[name](dim, heads)
