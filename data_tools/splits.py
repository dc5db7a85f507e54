"""Finding a dataset's images and splits: existing split folders or files honoured, else seeded splits per rule."""
import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from data_tools.registry import DatasetSpec

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")

# one image: (path relative to the source root, class index, group for the split rule)
Item = Tuple[str, int, str]


class DatasetLayoutError(ValueError):
    """A source tree, split file or annotation that does not match the dataset's registry entry."""
    reason = "bad_annotation"  # when it concerns one sample, it is counted under this reason


def _images_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path, spec: DatasetSpec) -> List[Tuple[Path, int]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for folder in folders:
        index = spec.class_index(folder.name)
        if index is None:
            raise DatasetLayoutError(f"{folder}: class folder '{folder.name}' is not a class of {spec.name} "
                                     f"(expected one of: {', '.join(spec.classes)})")
        out.append((folder, index))
    missing = set(range(len(spec.classes))) - {i for _, i in out}
    if missing:
        log.warning("%s: no folder for classes %s", root, ", ".join(spec.classes[i] for i in sorted(missing)))
    return out


def scan_classes(root: Path, src: Path, spec: DatasetSpec) -> List[Item]:
    """Images under root/<class>/..., with paths relative to src; the group is (class, first sub-folder)."""
    items = []
    for folder, index in _class_folders(root, spec):
        for path in _images_under(folder):
            rel = path.relative_to(folder)
            group = f"{spec.classes[index]}/{rel.parts[0] if len(rel.parts) > 1 else ''}"
            items.append((str(path.relative_to(src)), index, group))
    return items


def round_half_up(x: float) -> int:
    """0.5 -> 1 (Python's round() would give 0: banker's rounding)."""
    return int(x + 0.5)


def seeded_split(items: Iterable[Item], ratios: Tuple[float, float, float], seed: int,
                 by_group: bool = False) -> Dict[str, List[Item]]:
    """Shuffle each class (or group) with a seed of its own, then cut test, val and train by the ratios."""
    buckets: Dict[str, List[Item]] = defaultdict(list)
    for item in items:
        buckets[item[2] if by_group else str(item[1])].append(item)
    out: Dict[str, List[Item]] = {s: [] for s in SPLITS}
    _, val_ratio, test_ratio = ratios
    for name in sorted(buckets):
        members = sorted(buckets[name])
        random.Random(f"{seed}/{name}").shuffle(members)
        n_test = round_half_up(len(members) * test_ratio)
        n_val = round_half_up(len(members) * val_ratio) if ratios[0] > 0 else len(members) - n_test
        out["test"] += members[:n_test]
        out["val"] += members[n_test:n_test + n_val]
        out["train"] += members[n_test + n_val:]
    return {s: sorted(v) for s, v in out.items()}


def read_split_files(split_dir: Path, src: Path, spec: DatasetSpec) -> Dict[str, List[Item]]:
    """train.txt/val.txt/test.txt: one image per line, 'relative/path [label]'; the label is a class name or
    index, else the path's class folder names the class."""
    out: Dict[str, List[Item]] = {}
    for split in SPLITS:
        path = split_dir / f"{split}.txt"
        if not path.is_file():
            continue
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()  # tabs allow spaces in paths
            rel = parts[0]
            label = parts[1].strip() if len(parts) > 1 else Path(rel).parts[-2] if len(Path(rel).parts) > 1 else None
            index = _label_index(label, spec)
            if index is None:
                raise DatasetLayoutError(f"{path}:{n}: cannot tell the class of {rel!r} (label {label!r}); "
                                         f"expected one of: {', '.join(spec.classes)}")
            items.append((rel, index, spec.classes[index]))
        out[split] = items
    if "train" not in out or not ({"val", "test"} & set(out)):
        raise DatasetLayoutError(f"{split_dir}: split files need train.txt and val.txt and/or test.txt")
    return out


def _label_index(label: Optional[str], spec: DatasetSpec) -> Optional[int]:
    if label is None:
        return None
    if label.isdigit() and int(label) < len(spec.classes):
        return int(label)
    return spec.class_index(label)


def discover(src: Path, spec: DatasetSpec, seed: int, split_files: Optional[Path] = None) -> Dict[str, List[Item]]:
    """The dataset's splits: given split files, else existing split folders, else the registry's seeded rule."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetLayoutError(f"dataset source is not a directory: {src}")
    split_files = split_files or (src / "splits" if (src / "splits" / "train.txt").is_file() else None)
    if split_files is not None:
        return read_split_files(Path(split_files), src, spec)
    if spec.split_rule == "files":
        raise DatasetLayoutError(f"{spec.name} uses the authors' split files: pass --split-files DIR holding "
                                 f"train.txt, val.txt and test.txt (or put them in {src / 'splits'})")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if spec.split_rule == "official_test_split":
        if not {"train", "test"} <= set(present):
            raise DatasetLayoutError(f"{src}: {spec.name} needs its official train/ and test/ folders")
        official_test = seeded_split(scan_classes(src / "test", src, spec), spec.ratios, seed)
        return {"train": scan_classes(src / "train", src, spec), "val": official_test["val"],
                "test": official_test["test"]}
    if "train" in present and len(present) >= 2:
        return {s: scan_classes(src / s, src, spec) for s in present}
    return seeded_split(scan_classes(src, src, spec), spec.ratios, seed, by_group=spec.split_rule == "per_group")


def write_split_lists(out_dir: Path, splits: Dict[str, List[Item]], spec: DatasetSpec) -> None:
    """splits/<split>.txt: 'relative/path<TAB>class' per image, so a split can be reproduced and audited."""
    from runtime.atomic import atomic_write_text
    for split, items in splits.items():
        atomic_write_text(Path(out_dir) / "splits" / f"{split}.txt",
                          "".join(f"{rel}\t{spec.classes[index]}\n" for rel, index, _ in items))
