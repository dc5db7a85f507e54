"""The UniEmoX pretrainer: MAE on the scene, scene + person CLS projected and fused, distilled from CLIP."""
import logging
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from pretrain.config import LossConfig, ModelConfig
from pretrain.fusion import make_fusion
from pretrain.losses import combine, loss_weights, needs_teacher
from pretrain.mae import DECODER_PREFIXES, MaskedAutoencoderViT, get_arch, load_mae_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor                      # weighted total (fp32)
    terms: Dict[str, torch.Tensor]          # each enabled term, unweighted
    pred: Optional[torch.Tensor] = None     # scene reconstruction (N, L, p*p*3) when the mae term is on
    mask: Optional[torch.Tensor] = None     # scene mask (N, L), 1 = masked


class UniEmoXPretrainer(nn.Module):
    """The student: MAE encoder/decoder, projection to the teacher's width, fusion. The teacher is data: the batch
    brings its embeddings (`clip_image`, `clip_text`), from the teacher cache or computed in the batch preparation,
    so the student knows only their width."""

    def __init__(self, model: ModelConfig, losses: LossConfig, embed_dim: int):
        super().__init__()
        self.weights = loss_weights(losses)
        self.mask_ratio = model.mask_ratio
        self.distill = needs_teacher(self.weights)
        arch = get_arch(model.preset, img_size=model.img_size, patch_size=model.patch_size,
                        embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                        decoder_embed_dim=model.decoder_embed_dim, decoder_depth=model.decoder_depth,
                        decoder_num_heads=model.decoder_num_heads)
        self.mae = MaskedAutoencoderViT(arch, norm_pix_loss=model.norm_pix_loss)
        self.person_img_size = model.person_img_size or arch.img_size
        if self.person_img_size % arch.patch_size:
            raise ValueError(f"model.person_img_size={self.person_img_size} is not a multiple of the patch size "
                             f"({arch.patch_size})")
        if model.mae_checkpoint:
            load_mae_checkpoint(self.mae, model.mae_checkpoint)
        dim = embed_dim
        self.projection = model.projection
        self.proj: Optional[nn.Module] = None
        if model.projection == "decoder_embed":
            if arch.decoder_embed_dim != dim:
                raise ValueError(f"model.projection=decoder_embed needs the decoder width ({arch.decoder_embed_dim}) "
                                 f"to equal the teacher's embedding width ({dim}); use model.projection=linear")
        else:
            self.proj = nn.Linear(arch.embed_dim, dim)
        self.fusion = make_fusion(model.fusion, dim, model.fusion_heads)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        """Parameters no enabled term reaches get requires_grad=False (DDP would otherwise wait for them)."""
        if self.weights["mae"] == 0:
            for name, p in self.mae.named_parameters():
                if name.startswith(DECODER_PREFIXES) and not (self.proj is None and name.startswith("decoder_embed.")):
                    p.requires_grad_(False)
        if not self.distill:
            for p in self.fusion.parameters():
                p.requires_grad_(False)
            if self.proj is not None:
                self.proj.requires_grad_(False)

    def project(self, cls: torch.Tensor) -> torch.Tensor:
        """Encoder CLS -> teacher width: the decoder's input embedding (reference; official MAE weights load
        unchanged) or a separate linear layer (model.projection=linear)."""
        return self.mae.decoder_embed(cls) if self.proj is None else self.proj(cls)

    def embed(self, scene_cls: torch.Tensor, person_cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The student's embedding (teacher width) from the encoder's scene and person CLS tokens: what training
        distils, and what zero-shot scores (there of unmasked images)."""
        scene = self.project(scene_cls)
        return self.fusion(scene, self.project(person_cls) if self.uses_person else None)

    @property
    def uses_person(self) -> bool:
        return self.distill and getattr(self.fusion, "uses_person", True)

    def forward(self, batch: Dict[str, torch.Tensor]) -> StepOutput:
        """batch: image (N,3,H,W, ImageNet-normalised), person (N,3,P,P; P = model.person_img_size), the
        teacher's clip_image / clip_text (N,E) when a distillation term is on; optional noise to reproduce the masking: (2N, L) for
        both branches at one size, else (N, L) for the scene and person_noise (N, Lp) for the person."""
        image = batch["image"]
        n = image.shape[0]
        if self.uses_person and tuple(batch["person"].shape[-2:]) != (self.person_img_size,) * 2:
            raise ValueError(f"the person crop is {tuple(batch['person'].shape[-2:])} px; model.person_img_size "
                             f"is {self.person_img_size}")
        if self.uses_person and self.person_img_size == self.mae.arch.img_size:
            x = torch.cat([image, batch["person"]])  # both branches at one size: one encoder pass
            latent, mask, ids_restore = self.mae.forward_encoder(x, self.mask_ratio, batch.get("noise"))
            person_cls = latent[n:, 0]
        else:
            latent, mask, ids_restore = self.mae.forward_encoder(image, self.mask_ratio, batch.get("noise"))
            person_cls = None
            if self.uses_person:  # its own, smaller pass: the person crop has fewer tokens
                person_cls = self.mae.forward_encoder(batch["person"], self.mask_ratio,
                                                      batch.get("person_noise"))[0][:, 0]
        outputs: Dict[str, torch.Tensor] = {}
        pred = None
        if self.weights["mae"] > 0:
            pred = self.mae.forward_decoder(latent[:n], ids_restore[:n])
            outputs["reconstruction"] = self.mae.reconstruction_loss(image, pred, mask[:n])
        if self.distill:
            outputs["student"] = self.embed(latent[:n, 0], person_cls)
            outputs["clip_image"], outputs["clip_text"] = batch["clip_image"], batch["clip_text"]
        total, terms = combine(outputs, self.weights)
        return StepOutput(total, terms, pred, mask[:n])
