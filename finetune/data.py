"""Fine-tuning data: resolve a benchmark's shards (or shard an image folder into the run), transforms, loaders."""
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader

from data_tools.folder import shard_folder
from data_tools.reader import SharedEpoch, make_loader
from data_tools.registry import (MULTI_LABEL, REGISTRY, REGRESSION, SINGLE_LABEL, TASKS, Task, UnknownDatasetError,
                                 get_dataset)
from data_tools.samples import ImageOptions
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
from runtime import distributed

log = logging.getLogger(__name__)
REGRESSION_TARGETS = ["valence", "arousal"]


@dataclass
class DatasetInfo:
    name: str
    task: Task
    classes: List[str]          # class names, or the regression targets
    root: Path
    sizes: Dict[str, int]       # samples per split
    continuous: List[str] = field(default_factory=list)  # values predicted beside the classes (EMOTIC's V/A/D)
    continuous_range: Tuple[float, float] = (0.0, 1.0)    # their scale

    @property
    def num_outputs(self) -> int:
        return len(self.classes) + len(self.continuous)

    def shards(self, split: str) -> List[str]:
        return sorted(str(p) for p in (self.root / split).glob("*.tar"))


def resolve_dataset(dataset: str, root: Optional[str], run_dir: Path, task: Optional[Task] = None) -> DatasetInfo:
    """Shards made by data_tools (a directory with info.json), or an image folder of a registered benchmark that
    rank 0 shards into the run directory (reruns reuse it)."""
    if root is None:
        raise ValueError("data.root is required: shards made by data_tools (with info.json) or an image folder")
    root_path = Path(root)
    if not root_path.exists():
        raise FileNotFoundError(f"data.root does not exist: {root_path}")
    if not (root_path / "info.json").is_file():
        spec = get_dataset(dataset)  # an unknown name is an error listing the registry
        root_path = run_dir / "data"
        if distributed.is_main():
            log.info("sharding the %s folder %s into %s", spec.name, root, root_path)
            shard_folder(spec.name, root, str(root_path), options=ImageOptions(detector="none"))
        distributed.barrier()
    info = json.loads((root_path / "info.json").read_text())
    registered = {k.lower(): k for k in REGISTRY}
    if info["dataset"].lower() != dataset.lower():  # results would be filed under a name that is not the data's
        if dataset.lower() not in registered:
            raise UnknownDatasetError(f"unknown dataset {dataset!r}; registered: {', '.join(REGISTRY)}; the shards "
                                      f"in {root_path} hold {info['dataset']!r} (pass --dataset {info['dataset']})")
        raise ValueError(f"--dataset {dataset!r} does not match the shards in {root_path}, which hold "
                         f"{info['dataset']!r} (pass --dataset {info['dataset']}, or the shards of {dataset})")
    if dataset.lower() in registered:
        expected = [c.lower() for c in REGISTRY[registered[dataset.lower()]].classes]
        if [c.lower() for c in info["classes"]] != expected:
            raise ValueError(f"{root_path}: classes {info['classes']} do not match the {dataset} registry "
                             f"({REGISTRY[registered[dataset.lower()]].classes})")
    task = task or info.get("task", SINGLE_LABEL)
    if task not in TASKS:
        raise ValueError(f"{root_path / 'info.json'}: task {task!r} cannot be fine-tuned on (expected one of {TASKS})")
    classes = REGRESSION_TARGETS if task == REGRESSION else list(info["classes"])
    sizes = {s: v["samples"] for s, v in info["splits"].items()}
    for split in ("train", "val", "test"):
        if not sizes.get(split):
            raise ValueError(f"{root_path}: split {split!r} is missing or empty (splits: {sizes})")
    continuous = list(info.get("continuous", [])) if task == MULTI_LABEL else []
    return DatasetInfo(info["dataset"], task, classes, root_path, sizes, continuous,
                       tuple(info.get("continuous_range", (0.0, 1.0))))


def _posterize_compat(img, bits_to_keep, **_):
    """timm's posterize with Pillow >= 12: keeping 0 bits is refused now; it used to give a black image."""
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """Make timm's RandAugment posterize work with Pillow >= 12 (a process-wide change to timm's op table: the
    entry points that train with RandAugment call it once, before building transforms)."""
    from timm.data import auto_augment
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize_compat


def make_transforms(img_size: int, aug) -> tuple:
    """timm's RandAugment/erasing training transform and the resize + centre-crop evaluation transform
    (RandAugment with Pillow >= 12 needs patch_timm_posterize() first)."""
    train = create_transform(img_size, is_training=True, scale=tuple(aug.crop_scale), hflip=aug.hflip,
                             color_jitter=aug.color_jitter,
                             auto_augment=aug.auto_augment, re_prob=aug.re_prob,
                             re_mode="pixel", re_count=1, interpolation="bicubic", mean=IMAGENET_MEAN,
                             std=IMAGENET_STD)
    evaluation = create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=aug.crop_pct,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return train, evaluation


class LabelledTransform:
    """Decoded sample -> {'image', 'target', 'key'}; the target's form follows the task, with the `continuous`
    values (record fields) after a multi-label target (picklable for workers)."""

    def __init__(self, transform, task: Task, num_classes: int, continuous: Sequence[str] = ()):
        self.transform, self.task, self.num_classes = transform, task, num_classes
        self.continuous = list(continuous)

    def values(self, meta: Dict[str, Any], names: Sequence[str]) -> List[float]:
        values = [meta.get(k) for k in names]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"{list(names)} are {values}, expected finite numbers")
        return [float(v) for v in values]

    def label(self, meta: Dict[str, Any]) -> int:
        label = meta.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.num_classes:
            raise ValueError(f"label {label!r} is not a class index in [0, {self.num_classes})")
        return label

    def target(self, meta: Dict[str, Any]):
        """The record's target, checked: a record of the wrong form raises (the reader counts and drops it)."""
        if self.task == SINGLE_LABEL:
            return self.label(meta)
        if self.task == MULTI_LABEL:
            labels = meta.get("labels")
            if labels is None:
                hot = torch.nn.functional.one_hot(torch.tensor(self.label(meta)), self.num_classes).float()
            elif not isinstance(labels, list) or len(labels) != self.num_classes \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels):
                raise ValueError(f"labels {labels!r} is not {self.num_classes} numbers")
            else:
                hot = torch.tensor(labels, dtype=torch.float32)
            return torch.cat([hot, torch.tensor(self.values(meta, self.continuous))]) if self.continuous else hot
        return torch.tensor(self.values(meta, REGRESSION_TARGETS))

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        return {"image": self.transform(sample["image"]), "target": self.target(sample["meta"]),
                "key": sample["__key__"]}


def train_loader(info: DatasetInfo, transform, data_cfg, *, batches: int, seed: int, epoch: SharedEpoch,
                 **reading: Any) -> DataLoader:
    """The run's one training loader (persistent workers; each pass at the position `epoch` holds); `reading`:
    make_loader's image_format / sidecar_dir."""
    return make_loader(info.shards("train"), batch_size=data_cfg.batch_size, transform=transform,
                       num_workers=data_cfg.num_workers, seed=seed, epoch=epoch, rank=distributed.get_rank(),
                       world_size=distributed.get_world_size(), resampled=True, batches_per_epoch=batches,
                       shuffle_buffer=data_cfg.shuffle_buffer, drop_last=True, persistent=True, **reading)


def eval_loader(info: DatasetInfo, split: str, transform, data_cfg, batch_size: Optional[int] = None,
                **reading: Any) -> Optional[DataLoader]:
    """Each sample of the split once, spread over the ranks (rank 0 alone when there are fewer shards than
    ranks); None on a rank with nothing to read."""
    shards = info.shards(split)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if len(shards) < world:
        rank, world = (0, 1) if rank == 0 else (None, None)
        if rank is None:
            return None
    workers = min(data_cfg.num_workers, len(shards) // world)
    return make_loader(shards, batch_size=batch_size or data_cfg.batch_size, transform=transform,
                       num_workers=workers, rank=rank, world_size=world, resampled=False, drop_last=False,
                       shuffle_buffer=0, **reading)
