"""Config sections of the pretraining job: model, teacher, loss weights (the engine adds data and run sections)."""
from dataclasses import dataclass
from typing import Literal, Optional

from runtime.config import must_exist


@dataclass
class ModelConfig:
    preset: str = "vit_l16"                 # tiny, vit_b16, vit_l16, vit_h14 (pretrain/mae.py PRESETS)
    img_size: Optional[int] = None          # each of these overrides the preset's value
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    mask_ratio: float = 0.75                # MAE's default; the reference code used 0.9
    norm_pix_loss: bool = False
    projection: Literal["decoder_embed", "linear"] = "decoder_embed"
    fusion: str = "sum_ln_elu"
    fusion_heads: int = 3
    mae_checkpoint: Optional[str] = must_exist(None)   # official mae_pretrain_* / mae_visualize_* file


@dataclass
class TeacherConfig:
    checkpoint: str                         # required: a local open_clip / OpenAI weights file, or "random"
    arch: str = "ViT-B-16"                  # open_clip model name, or a model-config .json file
    cached: bool = False                    # read clip_image / clip_text from the shards' teacher cache


@dataclass
class LossConfig:
    mae: float = 1.0                        # L3, masked-patch reconstruction
    paired: float = 1.0                     # L2, student vs CLIP image embedding
    relational: float = 1.0                 # L1, similarity profile over the batch's texts
