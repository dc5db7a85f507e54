"""The fine-tuning encoder: a timm VisionTransformer (global average pool + LayerNorm + head) loaded from our
pretraining runs, their safetensors export, an official MAE checkpoint, or random init."""
import dataclasses
import json
import logging
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrain.mae import MAEArch, get_arch
from runtime.checkpoint import (CheckpointError, STATE_FILE, check_schema, find_checkpoint, REFERENCE_GLOBALS,
                                reference_parts, safe_torch_load, strip_prefix, summarize_keys,
                                trained_weights)

log = logging.getLogger(__name__)
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.")
# the model names of MAE's and the UniEmoX reference code's `args.model` -> this project's presets
REFERENCE_MODELS = {"vit_base_patch16": "vit_b16", "vit_large_patch16": "vit_l16", "vit_huge_patch14": "vit_h14"}


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
    a reference .pth written by MAE's `misc.save_model` (kind 'mae' for an encoder or MAE pretraining,
    'reference-classifier' for a fine-tuned models_vit classifier; architecture from its `args.model`, else
    `preset`)."""
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
        raw = safe_torch_load(path, allowed=REFERENCE_GLOBALS)
        if not (isinstance(raw, dict) and "schema_version" in raw):  # MAE / UniEmoX reference: {'model', 'args'}
            state, args = reference_parts(raw, path)
            kind = "reference-classifier" if "head.weight" in state else "mae"
            return state, reference_arch(args, preset, path), kind
    state_file = find_checkpoint(path) / STATE_FILE
    raw = safe_torch_load(state_file)
    check_schema(raw, state_file)
    arch = (raw.get("extra") or {}).get("arch") or raw.get("arch")  # (older checkpoints: at the top level)
    if arch:  # one of our fine-tuning checkpoints: timm names, its architecture stored in its TrainState
        return trained_weights(raw), MAEArch(**arch), "finetune"
    return trained_weights(raw), _arch_from_config(raw.get("config", {}).get("model", {})), "pretrain"


def reference_arch(args: Dict, preset: str, path: Path) -> MAEArch:
    """The architecture a reference checkpoint's `args` name (`model`, `input_size`), else `preset`."""
    name = str(args.get("model") or "")
    name = name[4:] if name.startswith("mae_") else name  # main_pretrain's models_mae names (..._dec512d8b)
    known = next((k for k in REFERENCE_MODELS if name == k or name.startswith(k + "_")), None)
    if name and known is None:
        raise CheckpointError(f"{path}: args.model {name!r} is not one of the reference's ViTs "
                              f"({', '.join(REFERENCE_MODELS)})")
    size = args.get("input_size")
    return get_arch(REFERENCE_MODELS[known] if known else preset, img_size=size if isinstance(size, int) else None)


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
    given = strip_prefix(state)
    state = to_timm_keys(given)
    ignored = sorted(k for k in given if not (k[4:] if k.startswith("mae.") else k).startswith(ENCODER_PREFIXES))
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
    log.info("encoder weights loaded from %s (%d tensors); new head: %s; ignored (not the encoder's): %s", source,
             len(state), head_keys, summarize_keys(ignored))


def load_classifier(model: VisionTransformer, state: Dict[str, torch.Tensor], source: str) -> List[str]:
    """A fine-tuned classifier's weights into build_vit's model, strictly, except for the `norm.*` LayerNorm that
    MAE's models_vit keeps but never uses when it pools (its forward applies fc_norm to the mean token). Returns
    the keys it ignored; a head that does not fit the dataset's classes or any other misfit is a CheckpointError
    naming the keys."""
    state = strip_prefix(state)
    own = model.state_dict()
    ignored = sorted(k for k in state if k.startswith("norm.") and k not in own)
    if "fc_norm.weight" not in state and ignored:
        raise CheckpointError(f"{source}: a classifier with no fc_norm pools the class token (models_vit with "
                              f"global_pool=False); only global-pool classifiers (the reference's default) load here")
    state = {k: v for k, v in state.items() if k not in ignored}
    head = state.get("head.weight")
    if head is not None and head.shape[0] != own["head.weight"].shape[0]:
        raise CheckpointError(f"{source}: its head has {head.shape[0]} outputs, the dataset has "
                              f"{own['head.weight'].shape[0]} classes: is it a classifier of this dataset?")
    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        raise CheckpointError(f"{source} does not fit this classifier ({model.embed_dim} wide, {len(model.blocks)} "
                              f"blocks): mismatched shapes {mismatched[:6]}, missing keys {missing[:6]}, unexpected "
                              f"keys {unexpected[:6]}")
    model.load_state_dict(state)
    log.info("classifier loaded from %s (%d tensors); ignored: %s; lacking: none", source, len(state),
             ", ".join(ignored) or "none")
    return ignored


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
