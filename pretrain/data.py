"""Pretraining batches from shards: scene view, person-crop view, text tokens or cached teacher embeddings."""
import functools
import glob
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from data_tools.crops import DraftResizedCrops, person_region
from data_tools.reader import SharedEpoch, expand_urls, make_loader
from data_tools.remote import URL_TIMEOUT_S, is_remote, read_sizes, shard_name
from data_tools.shard_errors import ShardError, check_enough_shards
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD


class PretrainTransform:
    """Decoded sample -> {'image', 'person'?, 'text' | 'clip_image' + 'clip_text'}; module-level and picklable so
    loader workers can run it. The two views (RandomResizedCrop + flip, MAE's pretraining augmentation) are drawn
    independently from one decode of the image (at JPEG draft scale when both allow it) and leave as uint8:
    `normalize_views` makes them ImageNet-normalised floats once per batch, on the device."""

    def __init__(self, img_size: int, scale: Tuple[float, float], person: bool,
                 tokenizer: Optional[Callable[[List[str]], torch.Tensor]], cached: bool, keep_key: bool = False,
                 person_img_size: Optional[int] = None):
        self.crops = DraftResizedCrops(scale)
        self.img_size, self.person_img_size = img_size, person_img_size or img_size
        self.person, self.tokenizer, self.cached, self.keep_key = person, tokenizer, cached, keep_key

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        image, meta = sample["image"], sample["meta"]
        views = [(None, self.img_size)]
        if self.person:
            views.append((person_region(image.size, meta.get("person_box")), self.person_img_size))
        out: Dict[str, Any] = dict(zip(("image", "person"), self.crops(image, views)))
        if self.cached:
            out["clip_image"] = torch.from_numpy(sample["sidecar"]["clip_image"]).float()
            out["clip_text"] = torch.from_numpy(sample["sidecar"]["clip_text"]).float()
        elif self.tokenizer is not None:
            text = meta.get("text") or ""
            if not isinstance(text, str):
                raise ValueError(f"text is {type(text).__name__}, expected a string")
            out["text"] = self.tokenizer([text])[0]
        if self.keep_key:
            out["key"] = sample["__key__"]
        return out


VIEWS = ("image", "person")


@functools.lru_cache(maxsize=None)
def _pixel_mean_std(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std in 0-255 pixel units on `device`, made once (a per-batch copy to a GPU would sync)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_pixels(pixels: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) on their device -> ImageNet-normalised floats (fp32, or dtype)."""
    mean, std = _pixel_mean_std(pixels.device)
    return ((pixels.float() - mean) / std).to(dtype or torch.float32)


def normalize_views(batch: Dict[str, Any], dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """The uint8 views of a batch (already on its device) -> ImageNet-normalised floats (fp32, or dtype)."""
    out = dict(batch)
    for key in VIEWS:
        if key in out and out[key].dtype == torch.uint8:
            out[key] = normalize_pixels(out[key], dtype)
    return out


def count_samples(patterns: Sequence[str], timeout_s: float = URL_TIMEOUT_S) -> int:
    """Samples in the shards, from the sizes.json written beside them by data_tools (local or http(s))."""
    total, cache = 0, {}
    for url in expand_urls(list(patterns)):
        sizes = read_sizes(url, timeout_s, cache)
        if shard_name(url) not in sizes:
            raise ShardError(f"the sizes.json beside {url} does not list {shard_name(url)}: set data.samples_per_epoch")
        total += sizes[shard_name(url)]
    return total


def brace_form(pattern: str) -> str:
    """For a directory or a glob given as data.train: the brace pattern of the shards it holds, as a hint."""
    found = sorted(glob.glob(str(Path(pattern) / "*.tar")) if Path(pattern).is_dir() else glob.glob(pattern))
    numbers = [m.group(1) for m in (re.fullmatch(r"(\d+)\.tar", Path(p).name) for p in found) if m]
    if not found:
        return ""
    one_dir = len({str(Path(p).parent) for p in found}) == 1
    if len(numbers) == len(found) and len({len(n) for n in numbers}) == 1 and one_dir:
        return f"[{Path(found[0]).parent}/{{{numbers[0]}..{numbers[-1]}}}.tar]"
    return "[" + ", ".join(found[:3]) + (", ..." if len(found) > 3 else "") + "]"


def check_shards(patterns: Sequence[str], resampled: bool = True, workers: int = 0,
                 world_size: int = 1) -> List[List[str]]:
    """Each source's shards; a missing or empty local shard, a directory or glob where shard files are expected,
    or too few shards for plain reading is an error naming the pattern, before anything is built (remote shards
    are checked as they are read: an unreadable one is counted and skipped)."""
    sources = []
    for pattern in patterns:
        urls = expand_urls(pattern)
        local = [u for u in urls if not is_remote(u)]
        missing = [u for u in local if not Path(u).is_file()]
        if not urls or missing:
            hint = brace_form(pattern) if not is_remote(pattern) else ""
            if hint:  # a directory or a glob: name the brace form of what it holds
                kind = "a directory" if Path(pattern).is_dir() else "a glob"
                raise ShardError(f"data.train: {pattern!r} is {kind}; data.train takes shard files or brace "
                                 f"patterns: data.train='{hint}'")
            raise ShardError(f"data.train: {pattern!r} — {len(missing)} of {len(urls)} shards missing"
                             + (f", e.g. {missing[0]}" if missing else ""))
        empty = [u for u in local if Path(u).stat().st_size == 0]
        if empty:
            raise ShardError(f"data.train: empty shard file(s), e.g. {empty[0]}")
        sources.append(urls)
    if not resampled:
        check_enough_shards(sum(len(s) for s in sources), workers, world_size)
    return sources


def build_loader(data, transform: PretrainTransform, sources: List[List[str]], *, batches: int, seed: int,
                 epoch: SharedEpoch, rank: int, world_size: int, teacher_cache: Optional[str] = None):
    """The run's one loader over `sources` (check_shards' result): persistent workers, each pass at the position
    `epoch` holds; with `teacher_cache`, each sample brings its teacher outputs from there."""
    return make_loader(sources if len(sources) > 1 else sources[0], batch_size=data.batch_size, transform=transform,
                       num_workers=data.num_workers, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                       resampled=data.resampled, batches_per_epoch=batches if data.resampled else None,
                       weights=data.weights, shuffle_buffer=data.shuffle_buffer, drop_last=True, image_format="lazy",
                       sidecar_dir=teacher_cache, url_timeout_s=data.url_timeout_s, persistent=True)
