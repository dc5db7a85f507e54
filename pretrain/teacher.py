"""The frozen CLIP teacher (open_clip): local weights only, always in eval mode, fed with CLIP's own mean/std."""
import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(ValueError):
    """A teacher that cannot be built from local files."""


def resolve_arch(arch: str) -> str:
    """An open_clip model name, or a model-config JSON file (registered under its file name)."""
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise TeacherError(f"teacher.arch={arch!r} loads from the hub or a model directory; give an open_clip "
                           f"model name (e.g. ViT-B-16) or a model-config .json file, and teacher.checkpoint=FILE")
    if arch.endswith(".json"):
        path = Path(arch)
        if not path.is_file():
            raise TeacherError(f"teacher model config not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise TeacherError(f"unknown open_clip model {arch!r} (see open_clip.list_models(), or pass a .json config)")
    return arch


def check_checkpoint(arch: str, checkpoint: str) -> None:
    if checkpoint == "random" or Path(checkpoint).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
    if checkpoint in tags or checkpoint.startswith("hf-hub:") or not Path(checkpoint).suffix:
        raise TeacherError(
            f"teacher.checkpoint={checkpoint!r} names a hub download; this system never downloads weights. "
            f"Fetch them once on a machine with internet, e.g. open_clip.create_model({arch!r}, "
            f"pretrained={checkpoint!r}) and copy the cached open_clip_pytorch_model.bin (or OpenAI .pt), then "
            f"pass teacher.checkpoint=/path/to/that/file")
    raise TeacherError(f"teacher checkpoint not found: {checkpoint}")


class CLIPTeacher(nn.Module):
    """open_clip model with frozen weights; `train()` cannot take it out of eval mode.

    `encode_image` takes images normalised with ImageNet mean/std (what the student sees), converts them to
    CLIP's own normalisation and input size, and returns L2-normalised fp32 embeddings; so does `encode_text`.
    """

    def __init__(self, arch: str, checkpoint: str):
        super().__init__()
        name = resolve_arch(arch)
        check_checkpoint(name, checkpoint)
        if checkpoint == "random":
            log.warning("!!! CLIP teacher %s has RANDOM weights (teacher.checkpoint=random): fine for tests and "
                        "smoke runs, meaningless for real pretraining !!!", name)
        self.model = open_clip.create_model(name, pretrained=None if checkpoint == "random" else checkpoint,
                                            pretrained_image=False, pretrained_text=False)
        self.model.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.arch, self.checkpoint = name, checkpoint
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.register_buffer("clip_mean", torch.tensor(self.model.visual.image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("clip_std", torch.tensor(self.model.visual.image_std).view(1, 3, 1, 1), False)
        self.register_buffer("in_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("in_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self.eval()

    def train(self, mode: bool = True) -> "CLIPTeacher":
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.model.visual.output_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids truncated to the text tower's context length (long object lists must not crash)."""
        return self.tokenizer(list(texts))

    def to_clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> CLIP-normalised images at the teacher's input size."""
        pixels = images.float() * self.in_std + self.in_mean
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        return (pixels - self.clip_mean) / self.clip_std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(self.to_clip_input(images)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
