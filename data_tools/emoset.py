"""`shard-emoset`: the EmoSet-118K layout (split JSON lists, per-image annotation JSON) -> shards with attribute text."""
import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

from data_tools.images import read_file
from data_tools.registry import MIKELS8, SINGLE_LABEL
from data_tools.samples import ImageOptions, SampleBuilder
from data_tools.splits import SPLITS, DatasetLayoutError
from data_tools.writer import Part, plan_shards, write_splits

log = logging.getLogger(__name__)
ATTRIBUTES = ("scene", "object", "brightness", "colorfulness", "facial_expression", "human_action")


def _entries(src: Path, split: str) -> List[Dict[str, Any]]:
    """EmoSet's <split>.json: a list of [emotion, image path, annotation path] (dict entries accepted too)."""
    path = src / f"{split}.json"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise DatasetLayoutError(f"{path}: expected a list of [emotion, image, annotation] entries")
    out = []
    for n, entry in enumerate(raw):
        if isinstance(entry, (list, tuple)) and len(entry) >= 2:
            emotion, image = entry[0], entry[1]
            annotation = entry[2] if len(entry) > 2 else None
        elif isinstance(entry, dict) and "image" in entry:
            emotion, image, annotation = entry.get("emotion"), entry["image"], entry.get("annotation")
        else:
            raise DatasetLayoutError(f"{path}: entry {n} is {entry!r}, expected [emotion, image, annotation]")
        out.append({"emotion": emotion, "source": image, "annotation": annotation, "split": split})
    return out


class EmoSetSample:
    """Picklable shard job body: read an image and its annotation, describe it, build the sample."""

    def __init__(self, src: Path, builder: SampleBuilder):
        self.src = Path(src)
        self.builder = builder

    def __call__(self, item: Dict[str, Any]):
        attributes: Dict[str, Any] = {}
        if item["annotation"]:
            ann_path = self.src / item["annotation"]
            try:
                ann = json.loads(ann_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DatasetLayoutError(f"{ann_path}: unreadable annotation ({e})") from None
            attributes = {k: ann[k] for k in ATTRIBUTES if ann.get(k) not in (None, "", [])}
        emotion = item["emotion"]
        label = self.builder.classes.index(emotion) if emotion in self.builder.classes else None
        if label is None:
            raise DatasetLayoutError(f"{item['source']}: emotion {emotion!r} is not one of {self.builder.classes}")
        data = read_file(self.src / item["source"])
        return self.builder.build(data, split=item["split"], source=item["source"], label=label,
                                  attributes=attributes)


def shard_emoset(src: str, out: str, *, seed: int = 0, shard_size: int = 1000, min_shards: int = 8, workers: int = 1,
                 options: Optional[ImageOptions] = None, name: str = "EmoSet",
                 part: Optional[Part] = None) -> Optional[Dict[str, Any]]:
    src_path, out_path = Path(src), Path(out)
    options = options or ImageOptions()
    splits = [s for s in SPLITS if (src_path / f"{s}.json").is_file()]
    if not splits:
        raise DatasetLayoutError(f"{src_path}: no train.json/val.json/test.json (EmoSet layout expected)")
    classes = list(MIKELS8)
    info_file = src_path / "info.json"
    if info_file.is_file():
        label2idx = json.loads(info_file.read_text()).get("label2idx")
        if label2idx:
            classes = [name for name, _ in sorted(label2idx.items(), key=lambda kv: kv[1])]
    builder = SampleBuilder(name, classes, options)
    maker = EmoSetSample(src_path, builder)
    plans = {}
    for split in splits:
        entries = _entries(src_path, split)
        random.Random(f"{seed}/{split}/shards").shuffle(entries)  # classes mixed across shards (see folder.py)
        plans[split] = plan_shards(out_path / split, split, entries, shard_size, min_shards, options)
    info = {"dataset": name, "task": SINGLE_LABEL, "classes": classes, "source": str(src_path.resolve()),
            "attributes": list(ATTRIBUTES),
            "image": {"max_side": options.max_side, "quality": options.quality, "max_pixels": options.max_pixels},
            "detector": options.detector}
    return write_splits(out_path, plans, maker, info, workers, name, part=part)
