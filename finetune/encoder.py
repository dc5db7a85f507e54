"""The fine-tuning encoder: a timm VisionTransformer (global average pool + LayerNorm + head) loaded from our
pretraining runs, their safetensors export, an official MAE checkpoint, or random init."""
import dataclasses
import json
import logging
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrain.mae import MAEArch, get_arch
from runtime.checkpoint import (CheckpointError, STATE_FILE, check_schema, find_checkpoint, safe_torch_load,
                                trained_weights)

log = logging.getLogger(__name__)
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.")


def build_vit(arch: MAEArch, num_classes: int, img_size: Optional[int] = None, drop_path: float = 0.0
              ) -> VisionTransformer:
    """timm's ViT with MAE's fine-tuning layout: mean of the patch tokens -> fc_norm -> head."""
    return VisionTransformer(img_size=img_size or arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
                             embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                             mlp_ratio=arch.mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                             global_pool="avg", num_classes=num_classes, drop_path_rate=drop_path)


def _arch_from_config(model_cfg: Dict) -> MAEArch:
    fields = {f.name for f in dataclasses.fields(MAEArch)}
    return get_arch(model_cfg.get("preset", "vit_b16"), **{k: v for k, v in model_cfg.items() if k in fields})


def arch_from_metadata(meta: Dict[str, str], path: Path) -> MAEArch:
    """The architecture a safetensors file of ours declares (`arch` as JSON, pretrain.mae.arch_metadata; files
    written by earlier versions carry `arch.*` keys, still read); a clear error when the declaration cannot be
    read."""
    types = {f.name: f.type for f in dataclasses.fields(MAEArch)}
    try:
        if "arch" in meta:
            return MAEArch(**json.loads(meta["arch"]))
        return MAEArch(**{k[5:]: (float if types[k[5:]] in (float, "float") else int)(v)
                          for k, v in meta.items() if k.startswith("arch.") and k[5:] in types})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata does not describe an architecture ({type(e).__name__}: {e}); "
                              f"expected the fields {sorted(types)}") from None


def check_arch_fits(state: Dict[str, torch.Tensor], arch: MAEArch, path: Path) -> None:
    """Width, patch size and depth read from the tensors must be what the metadata declares."""
    names = {k[4:] if k.startswith("mae.") else k: v for k, v in state.items()}
    proj = names.get("patch_embed.proj.weight")
    blocks = {int(k.split(".")[1]) for k in names if k.startswith("blocks.")}
    found = {"embed_dim": proj.shape[0] if proj is not None else None,
             "patch_size": proj.shape[-1] if proj is not None else None,
             "in_chans": proj.shape[1] if proj is not None else None,
             "depth": max(blocks) + 1 if blocks else None}
    wrong = {k: (getattr(arch, k), v) for k, v in found.items() if v is not None and getattr(arch, k) != v}
    if proj is None or wrong:
        raise CheckpointError(f"{path}: its metadata does not match its tensors: "
                              + (", ".join(f"{k} declared {a}, tensors say {b}" for k, (a, b) in wrong.items())
                                 or "no patch_embed.proj.weight")
                              + "; the file is inconsistent, export it again")


def read_encoder_source(source: str, preset: str) -> Tuple[Dict[str, torch.Tensor], MAEArch, str]:
    """(state dict, architecture, kind) from a safetensors export, one of our checkpoints or run directories, or
    an official MAE .pth (whose architecture is `preset`)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"encoder checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") in ("uniemox-encoder", "uniemox-classifier", "uniemox-pretrain"):
            arch = arch_from_metadata(meta, path)  # our exports carry their architecture: check it holds
            check_arch_fits(state, arch, path)
            return state, arch, "pretrain-safetensors" if meta["format"] == "uniemox-pretrain" else "export"
        return state, get_arch(preset), "safetensors"
    if path.is_file() and path.name != STATE_FILE:
        raw = safe_torch_load(path)
        if isinstance(raw, dict) and "schema_version" not in raw:
            return raw.get("model", raw), get_arch(preset), "mae"  # official MAE release: {'model': ...}
    state_file = find_checkpoint(path) / STATE_FILE
    raw = safe_torch_load(state_file)
    check_schema(raw, state_file)
    arch = (raw.get("extra") or {}).get("arch") or raw.get("arch")  # (older checkpoints: at the top level)
    if arch:  # one of our fine-tuning checkpoints: timm names, its architecture stored in its TrainState
        return trained_weights(raw), MAEArch(**arch), "finetune"
    return trained_weights(raw), _arch_from_config(raw.get("config", {}).get("model", {})), "pretrain"


def to_timm_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our pretrainer's (mae.*) or MAE's names -> the timm encoder's; decoder, projection, fusion dropped."""
    out = {}
    for key, value in state.items():
        key = key[4:] if key.startswith("mae.") else key
        if key.startswith(ENCODER_PREFIXES):
            out[key] = value
    return out


def load_encoder(model: VisionTransformer, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load encoder weights (position embeddings resampled to the model's grid); the missing keys must be exactly
    the new head's, and every shape must match — otherwise a CheckpointError lists the offending keys."""
    state = to_timm_keys(state)
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape \
            and state["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    head_keys = sorted(k for k in own if k.startswith(("fc_norm.", "head.")))  # no head.* when num_classes=0
    if mismatched or unexpected or missing != head_keys:
        raise CheckpointError(
            f"{source} does not fit this encoder ({model.embed_dim} wide, {len(model.blocks)} blocks): "
            f"mismatched shapes {mismatched[:6]}{' ...' if len(mismatched) > 6 else ''}, unexpected keys "
            f"{unexpected[:6]}, missing keys {[k for k in missing if k not in head_keys][:6]} (expected only the "
            f"head's {head_keys}); is encoder.preset the checkpoint's architecture?")
    model.load_state_dict(state, strict=False)
    log.info("encoder weights loaded from %s (%d tensors); new head: %s", source, len(state), head_keys)


def create_encoder(cfg, num_outputs: int) -> Tuple[VisionTransformer, MAEArch, str]:
    """The model the config asks for: (model, architecture, where its weights came from)."""
    cfg.validate()  # exactly one of encoder.checkpoint and encoder.from_scratch
    if cfg.from_scratch:
        arch = get_arch(cfg.preset)
        return build_vit(arch, num_outputs, cfg.img_size, cfg.drop_path), arch, "scratch"
    state, arch, kind = read_encoder_source(cfg.checkpoint, cfg.preset)
    model = build_vit(arch, num_outputs, cfg.img_size, cfg.drop_path)
    if kind == "finetune":
        raise CheckpointError(f"{cfg.checkpoint} is a fine-tuning checkpoint; resume it with run.resume, or give a "
                              f"pretraining checkpoint as encoder.checkpoint")
    load_encoder(model, state, cfg.checkpoint)
    return model, arch, kind
