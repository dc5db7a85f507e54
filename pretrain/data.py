"""Pretraining batches from shards: scene view, person-crop view, text tokens or cached teacher embeddings."""
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import transforms

from data_tools.reader import SharedEpoch, expand_urls, make_loader
from pretrain.teacher import IMAGENET_MEAN, IMAGENET_STD


def crop_box(image: Image.Image, box: Optional[Sequence[float]]) -> Image.Image:
    """The person crop: the stored box (fractions of width/height) of this very image, or the whole image."""
    if not box:
        return image
    w, h = image.size
    x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image
    return image.crop((x0, y0, x1, y1))


def train_view(img_size: int, scale: Tuple[float, float]) -> transforms.Compose:
    """RandomResizedCrop (bicubic) + horizontal flip, ImageNet mean/std — MAE's pretraining augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class PretrainTransform:
    """Decoded sample -> {'image', 'person'?, 'text' | 'clip_image' + 'clip_text'}; module-level and picklable so
    loader workers can run it. Both views are augmented independently."""

    def __init__(self, img_size: int, scale: Tuple[float, float], person: bool,
                 tokenizer: Optional[Callable[[List[str]], torch.Tensor]], cached: bool, keep_key: bool = False):
        self.view = train_view(img_size, scale)
        self.person, self.tokenizer, self.cached, self.keep_key = person, tokenizer, cached, keep_key

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        image, meta = sample["image"], sample["meta"]
        out: Dict[str, Any] = {"image": self.view(image)}
        if self.person:
            out["person"] = self.view(crop_box(image, meta.get("person_box")))
        if self.cached:
            out["clip_image"] = torch.from_numpy(sample["sidecar"]["clip_image"]).float()
            out["clip_text"] = torch.from_numpy(sample["sidecar"]["clip_text"]).float()
        elif self.tokenizer is not None:
            out["text"] = self.tokenizer([meta.get("text") or ""])[0]
        if self.keep_key:
            out["key"] = sample["__key__"]
        return out


def count_samples(patterns: Sequence[str]) -> int:
    """Samples in the shards, from the sizes.json written beside them by data_tools."""
    total = 0
    for url in expand_urls(list(patterns)):
        sizes_file = Path(url).parent / "sizes.json"
        if not sizes_file.is_file():
            raise ValueError(f"{sizes_file} not found: set data.samples_per_epoch (shards not made by data_tools?)")
        sizes = json.loads(sizes_file.read_text())
        if Path(url).name not in sizes:
            raise ValueError(f"{sizes_file} does not list {Path(url).name}: set data.samples_per_epoch")
        total += sizes[Path(url).name]
    return total


def check_shards(patterns: Sequence[str]) -> List[List[str]]:
    """Each source's shard files; a missing or empty shard list is an error naming the pattern."""
    sources = []
    for pattern in patterns:
        urls = expand_urls(pattern)
        missing = [u for u in urls if not Path(u).is_file()]
        if not urls or missing:
            raise FileNotFoundError(f"data.train: {pattern!r} — {len(missing)} of {len(urls)} shards missing"
                                    + (f", e.g. {missing[0]}" if missing else ""))
        empty = [u for u in urls if Path(u).stat().st_size == 0]
        if empty:
            raise ValueError(f"data.train: empty shard file(s), e.g. {empty[0]}")
        sources.append(urls)
    return sources


def build_loader(data, transform: PretrainTransform, *, batches: int, seed: int, epoch: SharedEpoch, rank: int,
                 world_size: int, segment: int = 0):
    sources = check_shards(data.train)
    return make_loader(sources if len(sources) > 1 else sources[0], batch_size=data.batch_size, transform=transform,
                       num_workers=data.num_workers, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       resampled=data.resampled, batches_per_epoch=batches if data.resampled else None,
                       weights=data.weights, shuffle_buffer=data.shuffle_buffer, drop_last=True,
                       sidecar_dir=data.teacher_cache, segment=segment)
