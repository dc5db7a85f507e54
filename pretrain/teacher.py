"""The frozen teacher: open_clip from local weights (CLIP's own mean/std, always in eval mode), or the offline
classifier + sentence-encoder backend; `make_teacher` builds either from the config's teacher section."""
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.teacher_error import TeacherError

log = logging.getLogger(__name__)


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


def open_clip_flops(arch: str) -> Dict[str, int]:
    """Analytic matmul FLOPs (runtime.flops' rule) of one image and one text through an open_clip ViT model, from
    its model config alone: the image tower at its input size with the visual projection of the pooled token, the
    text tower over its whole context with the projection of the end-of-text token."""
    from runtime.flops import transformer_flops, vit_flops
    config = open_clip.get_model_config(resolve_arch(arch))
    vision, text, dim = config["vision_cfg"], config["text_cfg"], int(config["embed_dim"])
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    image = vit_flops(size, vision["patch_size"], vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0),
                      out_dim=dim)
    text_flops = transformer_flops(text.get("context_length", 77), text["width"], text["layers"],
                                   text.get("mlp_ratio", 4.0)) + 2 * text["width"] * dim
    return {"image": image, "text": text_flops}


@dataclass(frozen=True)
class TeacherBackend:
    """One way to build a frozen teacher from a TeacherConfig. Every teacher it builds offers embed_dim,
    image_size, tokenize / tokenizer, encode_image (ImageNet-normalised images in), encode_text, logit_scale."""
    default_arch: str
    build: Callable[[Any], nn.Module]                # TeacherConfig -> the teacher (weights loaded)
    embed_dim: Callable[[Any], int]                  # TeacherConfig -> its embedding width, no weights loaded
    identity: Callable[[Any], Dict[str, Any]] = lambda cfg: {}  # keys beyond backend/arch/checkpoint


def _open_clip_dim(cfg) -> int:
    return int(open_clip.get_model_config(resolve_arch(teacher_arch(cfg)))["embed_dim"])


def _classifier(cfg) -> nn.Module:
    from pretrain.classifier_teacher import ClassifierTextTeacher
    return ClassifierTextTeacher(teacher_arch(cfg), cfg.checkpoint, cfg.text_encoder, cfg.image_size,
                                 cfg.temperature, cfg.checkpoint_sha256)


def _classifier_dim(cfg) -> int:
    from pretrain.classifier_teacher import text_embed_dim
    return text_embed_dim(cfg.text_encoder)


# teacher.backend -> how to build it (the registry the config, the pretrainer, the cache and zero-shot read)
TEACHER_BACKENDS: Dict[str, TeacherBackend] = {
    "open_clip": TeacherBackend("ViT-B-16", lambda cfg: CLIPTeacher(teacher_arch(cfg), cfg.checkpoint),
                                _open_clip_dim),
    "classifier": TeacherBackend("mobilenet_v2", _classifier, _classifier_dim,
                                 lambda cfg: {"text_encoder": _canonical(cfg.text_encoder),
                                              "image_size": cfg.image_size, "temperature": cfg.temperature}),
}


def teacher_backend(cfg) -> TeacherBackend:
    if cfg.backend not in TEACHER_BACKENDS:
        raise TeacherError(f"unknown teacher.backend {cfg.backend!r}; choose one of {', '.join(TEACHER_BACKENDS)}")
    return TEACHER_BACKENDS[cfg.backend]


def teacher_arch(cfg) -> str:
    """teacher.arch, or the backend's default model."""
    return cfg.arch or teacher_backend(cfg).default_arch


def _canonical(value: str) -> str:
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def teacher_identity(cfg) -> Dict[str, Any]:
    """What makes a teacher's embeddings what they are, from its config alone (paths made absolute): recorded in a
    teacher cache, and compared with the run's teacher when the cache is used."""
    return {"backend": cfg.backend, "arch": _canonical(teacher_arch(cfg)), "checkpoint": _canonical(cfg.checkpoint),
            **teacher_backend(cfg).identity(cfg)}


def make_teacher(cfg) -> nn.Module:
    """The frozen teacher a TeacherConfig describes, with its identity attached."""
    teacher = teacher_backend(cfg).build(cfg)
    teacher.identity = teacher_identity(cfg)
    return teacher


def teacher_embed_dim(cfg) -> int:
    """The teacher's embedding width from its config alone (no weights loaded)."""
    return teacher_backend(cfg).embed_dim(cfg)
