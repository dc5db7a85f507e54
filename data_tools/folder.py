"""`shard-folder`: a benchmark's class-folder tree (or any ImageFolder tree) -> split shards, split lists, info."""
import logging
import random
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from data_tools.images import read_file
from data_tools.registry import DatasetSpec, generic_spec, get_dataset
from data_tools.samples import ImageOptions, SampleBuilder
from data_tools.splits import SPLITS, DatasetLayoutError, discover, write_split_lists
from data_tools.writer import Part, plan_shards, write_splits

log = logging.getLogger(__name__)


class FolderSample:
    """Picklable shard job body: read one file of the tree and build its sample."""

    def __init__(self, src: Path, builder: SampleBuilder):
        self.src = Path(src)
        self.builder = builder

    def __call__(self, item: Dict[str, Any]):
        data = read_file(self.src / item["source"])
        return self.builder.build(data, split=item["split"], source=item["source"], label=item["label"])


def shard_folder(name: str, src: str, out: str, *, seed: int = 0, shard_size: int = 1000, min_shards: int = 8,
                 workers: int = 1, split_files: Optional[str] = None, generic: bool = False,
                 ratios: Tuple[float, float, float] = (0.8, 0.1, 0.1),
                 options: Optional[ImageOptions] = None, part: Optional[Part] = None) -> Optional[Dict[str, Any]]:
    """Shard a dataset folder into out/<split>/NNNNN.tar; returns (and writes) out/info.json, or None from a
    `part` that finished before others (data_tools.writer.write_splits)."""
    src_path, out_path = Path(src), Path(out)
    options = options or ImageOptions()
    if generic:
        if not src_path.is_dir():
            raise FileNotFoundError(f"dataset source is not a directory: {src_path}")
        classes = tuple(sorted(p.name for p in src_path.iterdir() if p.is_dir() and p.name not in SPLITS
                               and p.name != "splits" and not p.name.startswith(".")))
        if not classes and (src_path / "train").is_dir():
            classes = tuple(sorted(p.name for p in (src_path / "train").iterdir() if p.is_dir()))
        if not classes:
            raise ValueError(f"--generic: {src_path} has no class sub-folders (expected SRC/<class>/*.jpg, or "
                             f"SRC/train/<class>/*.jpg with val/ and test/ beside it)")
        spec: DatasetSpec = generic_spec(name, classes, ratios)
    else:
        spec = get_dataset(name)
        if spec.name == "EMOTIC":
            raise DatasetLayoutError("EMOTIC is not a class-folder tree: shard it with `python -m data_tools "
                                     "shard-emotic SRC --out DIR` (its annotations, one sample per person)")
    builder = SampleBuilder(spec.name, spec.classes, options)  # checks the detector spec before any work
    splits = discover(src_path, spec, seed, Path(split_files) if split_files else None)
    write_split_lists(out_path, splits, spec)
    maker = FolderSample(src_path, builder)
    plans = {}
    for split, items in splits.items():
        records = [{"source": rel, "label": label, "split": split} for rel, label, _ in items]
        # mix the classes across shards (a sorted list would give one-class shards, and one-class batches to any
        # reader whose shuffle buffer is smaller than a shard); seeded, so keys are reproducible
        random.Random(f"{seed}/{split}/shards").shuffle(records)
        plans[split] = plan_shards(out_path / split, split, records, shard_size, min_shards, options)
    info = {"dataset": spec.name, "task": spec.task, "classes": list(spec.classes), "split_rule": spec.split_rule,
            "seed": seed, "source": str(src_path.resolve()),
            "image": {"max_side": options.max_side, "quality": options.quality, "max_pixels": options.max_pixels},
            "detector": options.detector}
    info = write_splits(out_path, plans, maker, info, workers, spec.name, part=part)
    for split, totals in (info or {}).get("splits", {}).items():
        log.info("%s/%s: %d samples in %d shards, %d failed", spec.name, split, totals["samples"], totals["shards"],
                 totals["failed"])
    return info
