"""Loss terms as a registry of named functions (docs/method.md §1), weighted from config and computed in fp32."""
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def paired_similarity(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L2 = 1 - mean_i cos(z_i, v_i): the student's fused embedding against CLIP's image embedding."""
    return 1.0 - F.cosine_similarity(z.float(), v.float(), dim=-1).mean()


def relational_similarity(z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """L1 = 1 - mean_i cos(A_i, C_i), A = s z t^T, C = s v t^T: the student's similarity profile over the batch's
    texts must match CLIP's (diagonal: paired image-text; off-diagonal: unpaired). `s` cancels in the cosine."""
    z, v, t = F.normalize(z.float(), dim=-1), F.normalize(v.float(), dim=-1), F.normalize(t.float(), dim=-1)
    a = scale * z @ t.T
    c = scale * v @ t.T
    return 1.0 - F.cosine_similarity(a, c, dim=-1).mean()


@dataclass(frozen=True)
class LossTerm:
    fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor]  # of the step's outputs dict; reads only what it needs
    needs_teacher: bool                                     # its inputs include the teacher's embeddings


# The single source of truth for the terms: a new term is an entry here plus its weight field (same name) in
# pretrain.config.LossConfig; the model, the trainer and the teacher cache check ask this registry.
LOSS_TERMS: Dict[str, LossTerm] = {
    "mae": LossTerm(lambda out: out["reconstruction"], needs_teacher=False),
    "paired": LossTerm(lambda out: paired_similarity(out["student"], out["clip_image"]), needs_teacher=True),
    "relational": LossTerm(lambda out: relational_similarity(out["student"], out["clip_image"], out["clip_text"]),
                           needs_teacher=True),
}


def loss_weights(loss_cfg) -> Dict[str, float]:
    """The weight of every registered term, from the config's field of the same name (a term without one is an
    error: the registry and the config must agree)."""
    missing = [name for name in LOSS_TERMS if not hasattr(loss_cfg, name)]
    if missing:
        raise ValueError(f"loss terms {missing} have no weight in {type(loss_cfg).__name__}")
    weights = {name: float(getattr(loss_cfg, name)) for name in LOSS_TERMS}
    check_weights(weights)
    return weights


def needs_teacher(weights: Dict[str, float]) -> bool:
    """Whether any enabled term reads the teacher's embeddings."""
    return any(weight > 0 and LOSS_TERMS[name].needs_teacher for name, weight in weights.items())


def check_weights(weights: Dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; known: {', '.join(LOSS_TERMS)}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"every loss weight is 0 ({weights}): nothing to train")


def combine(outputs: Dict[str, torch.Tensor], weights: Dict[str, float]):
    """total = sum_k w_k * term_k over the terms with w_k > 0 (fp32, outside autocast); returns (total, terms)."""
    device_type = next(iter(outputs.values())).device.type
    terms: Dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=device_type, enabled=False):
        for name, weight in weights.items():
            if weight > 0:
                terms[name] = LOSS_TERMS[name].fn(outputs)
        total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
