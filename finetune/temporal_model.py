"""The model of the temporal job: the image encoder (frozen, LoRA-adapted, fully trained, or absent when features
come from a cache) applied to every frame, an optional frame projector, and a head over frames; what of it a run
trains and saves; and the encoder's identity, which a feature cache records."""
import dataclasses
import hashlib
from typing import Any, Dict, List, Optional

import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from finetune.encoder import create_encoder
from finetune.lora import apply_lora
from finetune.temporal import MeanPoolHead, PerFrameHead, TemporalTransformerHead, stitch
from finetune.temporal_contrastive import FrameProjector


class ClipModel(nn.Module):
    """x (B, T, 3, S, S) frames, or (B, T, D) cached features, and mask (B, T) -> per-frame outputs (B, T, 2); a
    frozen encoder runs without gradients and stays in eval mode."""

    def __init__(self, encoder: Optional[nn.Module], head: Optional[nn.Module], projector: Optional[nn.Module] = None,
                 frozen: bool = False):
        super().__init__()
        self.encoder, self.head, self.projector, self.frozen = encoder, head, projector, frozen

    def train(self, mode: bool = True) -> "ClipModel":
        super().train(mode)
        if self.frozen and self.encoder is not None:
            self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features (B, T, F): the encoder's pooled output (or x itself), through the projector if any."""
        if self.encoder is not None:
            b, t = x.shape[:2]
            with torch.no_grad() if self.frozen else torch.enable_grad():
                x = self.encoder(x.flatten(0, 1)).reshape(b, t, -1)
        return self.projector(x) if self.projector is not None else x

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-frame outputs; without a head (stage 1), the frame features themselves."""
        feats = self.features(x)
        return self.head(feats, mask) if self.head is not None else feats


@torch.no_grad()
def stitched_frames(model: ClipModel, x: torch.Tensor, window: int, stride: int):
    """One chunk's per-frame predictions (T, D, on the CPU) from the head stitched over overlapping windows, and
    its per-frame features (T, F): the encoder runs once per frame, not once per window that covers it."""
    feats = model.features(x[None])[0]
    return stitch(model.head, feats, window, stride), feats


def make_head(cfg, dim: int) -> nn.Module:
    if cfg.head == "per_frame":
        return PerFrameHead(dim)
    if cfg.head == "mean_pool":
        return MeanPoolHead(dim)
    return TemporalTransformerHead(dim, cfg.width, cfg.depth, cfg.heads, cfg.max_frames, dropout=cfg.dropout)


def prepare_encoder(encoder: nn.Module, cfg) -> None:
    """Set up the encoder for temporal.encoder_mode: frozen (and cached) keep it fixed, lora wraps the Q/V parts
    of the last `lora_blocks` blocks' qkv, full trains every weight."""
    if cfg.encoder_mode == "lora":
        apply_lora(encoder, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_blocks)
    elif cfg.encoder_mode != "full":
        for p in encoder.parameters():
            p.requires_grad_(False)


def assemble_clip_model(cfg, with_head: bool = True, cached: bool = False):
    """The model a temporal config describes: (model, the encoder as built, its arch, where its weights came from).
    With `cached` the model has no encoder (its features come from a cache; the encoder is returned for its
    identity). The same calls in the same order for a run and for prediction from it, so that a seeded scratch
    encoder comes out identical."""
    t = cfg.temporal
    encoder, arch, source = create_encoder(cfg.encoder, 0)
    dim = int(encoder.num_features)
    if not cached:
        prepare_encoder(encoder, t)
    projector = FrameProjector(dim, cfg.contrastive.dim) if cfg.train.stage == 1 or t.stage1 else None
    dim = cfg.contrastive.dim if projector is not None else dim
    model = ClipModel(None if cached else encoder, make_head(t, dim) if with_head else None, projector,
                      frozen=t.encoder_mode in ("frozen", "cached"))
    return model, encoder, arch, source


def param_groups(model: ClipModel, cfg, weight_decay: float) -> List[Dict[str, Any]]:
    """What AdamW steps: the trainable parameters only (the adapters at temporal.lora_lr_scale times the lr, head
    and projector; the whole encoder with timm's layer decay under encoder_mode=full); norms, biases and the time
    embedding without weight decay."""
    groups: List[Dict[str, Any]] = []
    rest = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if cfg.encoder_mode == "full" and model.encoder is not None:
        groups += param_groups_layer_decay(model.encoder, weight_decay, model.encoder.no_weight_decay(),
                                           layer_decay=cfg.layer_decay)
        rest = {n: p for n, p in rest.items() if not n.startswith("encoder.")}
    adapters = [p for n, p in rest.items() if ".lora_" in n]
    rest = {n: p for n, p in rest.items() if ".lora_" not in n}
    decay = [p for n, p in rest.items() if p.ndim > 1 and not n.endswith(".time")]
    no_decay = [p for n, p in rest.items() if not (p.ndim > 1 and not n.endswith(".time"))]
    groups += [{"params": adapters, "weight_decay": weight_decay, "lr_scale": cfg.lora_lr_scale},
               {"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The weights a run changes (adapters, projector, head; every weight of a fully trained encoder): what its
    best.safetensors and stage1.safetensors hold."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str,
                         allow_missing: bool = False) -> List[str]:
    """Load a trainable state into `model`; a key the model lacks is an error naming `source`, and so is a key
    it has and the state lacks unless `allow_missing` (stage 2 from stage 1: the head is new). Returns the keys
    left as they were."""
    own = dict(model.state_dict())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"{source}: {len(unknown)} weights this model does not have (e.g. {unknown[:3]}): it was "
                       f"saved by another temporal.encoder_mode / head / projector")
    shapes = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(f"{source}: {k} is {tuple(state[k].shape)}, this model's is {tuple(own[k].shape)}")
    left = sorted(set(trainable_state(model)) - set(state))
    if left and not allow_missing:
        raise KeyError(f"{source} lacks {len(left)} trained weights of this model (e.g. {left[:3]})")
    model.load_state_dict(state, strict=False)
    return left


def encoder_identity(encoder: nn.Module, source: str, arch) -> Dict[str, Any]:
    """What made a feature: the encoder's source, architecture, input size and a SHA-256 of its weights."""
    h = hashlib.sha256()
    for name, v in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return {"source": source, "arch": dataclasses.asdict(arch), "img_size": int(encoder.patch_embed.img_size[0]),
            "weights_sha256": h.hexdigest()}
