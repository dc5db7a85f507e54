"""Masked autoencoder ViT (He et al. 2022) on timm blocks, with the official release's parameter names."""
import logging
import json
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from runtime.checkpoint import (CheckpointError, load_model_state, load_reference_checkpoint,
                                summarize_keys)
from runtime.flops import patch_embed_flops, transformer_flops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MAEArch:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0


PRESETS: Dict[str, MAEArch] = {
    "tiny": MAEArch(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=2),
    # 49 tokens at 28 px (Fashion-MNIST's own size); 4 heads of 16 beat 2 of 32 by 1-2 points (docs/demo.md)
    "tiny_p4": MAEArch(img_size=28, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                       decoder_depth=1, decoder_num_heads=2),
    "vit_b16": MAEArch(embed_dim=768, depth=12, num_heads=12),
    "vit_l16": MAEArch(embed_dim=1024, depth=24, num_heads=16),
    "vit_h14": MAEArch(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def arch_metadata(arch: MAEArch) -> Dict[str, str]:
    """How every safetensors file the project writes declares its architecture: one JSON field `arch`."""
    return {"arch": json.dumps(asdict(arch))}


def get_arch(preset: str, **overrides) -> MAEArch:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (1 + grid², dim) with a zero row for the CLS token."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w varies fastest, as np.meshgrid(w, h)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1)  # MAE: first half from grid[0] (= w)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


class MaskedAutoencoderViT(nn.Module):
    """Encoder on the visible patches + CLS; decoder with mask tokens predicts the pixels of every patch."""

    def __init__(self, arch: MAEArch, norm_pix_loss: bool = False):
        super().__init__()
        self.arch = arch
        self.norm_pix_loss = norm_pix_loss
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # other input sides are accepted (the person branch may run at its own resolution): see position_embedding
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, arch.in_chans, arch.embed_dim,
                                      strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, arch.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(arch.embed_dim, arch.num_heads, arch.mlp_ratio, qkv_bias=True,
                                           norm_layer=norm_layer) for _ in range(arch.depth)])
        self.norm = norm_layer(arch.embed_dim)
        self.decoder_embed = nn.Linear(arch.embed_dim, arch.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, arch.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, arch.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(arch.decoder_embed_dim, arch.decoder_num_heads, arch.mlp_ratio,
                                                   qkv_bias=True, norm_layer=norm_layer)
                                             for _ in range(arch.decoder_depth)])
        self.decoder_norm = norm_layer(arch.decoder_embed_dim)
        self.decoder_pred = nn.Linear(arch.decoder_embed_dim, arch.patch_size ** 2 * arch.in_chans, bias=True)
        self._resampled: Dict[int, Tuple[tuple, torch.Tensor]] = {}  # side -> (table version, resampled table)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear, not a Conv2d
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patch pixels in (row, col, channel) order as MAE."""
        p, c = self.arch.patch_size, self.arch.in_chans
        n, _, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.arch.patch_size, self.arch.in_chans
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep int(L * (1 - mask_ratio)) patches per sample, the ones with the smallest noise.

        Returns the kept tokens, the mask (N, L; 1 = masked) and the indices that restore the original order.
        """
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def position_embedding(self, side: int) -> torch.Tensor:
        """The encoder's position table for a square input of `side` pixels: the table itself at the model's size,
        otherwise resampled from it (bicubic, as timm does for a new input size), so both sizes share one table.
        The table is fixed (sin-cos, no gradient): a resampled one is made once and kept until the table changes
        (a load, a move to another device or dtype)."""
        if side == self.arch.img_size:
            return self.pos_embed
        if side % self.arch.patch_size:
            raise ValueError(f"input side {side} is not a multiple of the patch size {self.arch.patch_size}")
        table = self.pos_embed
        version = (table.data_ptr(), table._version, table.device, table.dtype)
        kept = self._resampled.get(side)
        if kept is None or kept[0] != version or table.requires_grad:
            grid = side // self.arch.patch_size
            kept = self._resampled[side] = (version, resample_abs_pos_embed(table, [grid, grid], num_prefix_tokens=1))
        return kept[1]

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos_embed = self.position_embedding(imgs.shape[-1])
        x = self.patch_embed(imgs) + pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, visible, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - visible, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # back to image order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop the CLS slot (the reference code kept only it: x[:, :1])

    def reconstruction_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only (fp32)."""
        target = self.patchify(imgs).float()
        pred = pred.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.reconstruction_loss(imgs, pred, mask), pred, mask


def mae_forward_flops(arch: MAEArch, mask_ratio: float) -> int:
    """Analytic matmul FLOPs of one MAE forward (the rule of runtime.flops): the patch embedding of every patch, the
    encoder on the kept patches + CLS, the decoder's input projection, its blocks on every patch + CLS and the
    pixel prediction of each of those tokens."""
    patches = (arch.img_size // arch.patch_size) ** 2
    kept = int(patches * (1 - mask_ratio)) + 1
    pixels = arch.patch_size ** 2 * arch.in_chans
    return (patch_embed_flops(arch.img_size, arch.patch_size, arch.embed_dim, arch.in_chans)
            + transformer_flops(kept, arch.embed_dim, arch.depth, arch.mlp_ratio)
            + 2 * kept * arch.embed_dim * arch.decoder_embed_dim
            + transformer_flops(patches + 1, arch.decoder_embed_dim, arch.decoder_depth, arch.mlp_ratio)
            + 2 * (patches + 1) * arch.decoder_embed_dim * pixels)


DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")


def decoder_keys(model: nn.Module) -> List[str]:
    return [k for k in model.state_dict() if k.startswith(DECODER_PREFIXES)]


def load_mae_checkpoint(model: nn.Module, source: Union[str, Path, Dict[str, torch.Tensor]]) -> str:
    """Load an official MAE checkpoint (key 'model'): encoder only (mae_pretrain_*) or encoder + decoder
    (mae_visualize_*), strictly for the parts it contains. Returns 'encoder' or 'encoder+decoder'."""
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise CheckpointError(f"MAE checkpoint not found: {source}")
        state = load_reference_checkpoint(source)[0]  # MAE's {'model', 'optimizer', 'epoch', 'scaler', 'args'}
    else:
        state = source.get("model", source)
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
    allowed = [] if has_decoder else decoder_keys(model)
    load_model_state(model, state, strict=True, allowed_missing=allowed)
    parts = "encoder+decoder" if has_decoder else "encoder"
    log.info("loaded MAE %s weights (%d tensors); lacking (initialised fresh): %s; ignored: none", parts, len(state),
             summarize_keys(allowed))
    return parts
