"""`shard-emotic`: EMOTIC (Annotations.mat as distributed, or its common CSV conversion) -> one sample per annotated
person: the 26-category multi-hot target, valence/arousal/dominance, and the annotated body box as person_box."""
import ast
import csv
import io
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from data_tools.images import ImageError, read_file
from data_tools.registry import EMOTIC_CATEGORIES, MULTI_LABEL
from data_tools.samples import ImageOptions, SampleBuilder
from data_tools.splits import SPLITS, DatasetLayoutError
from data_tools.text import join_list
from data_tools.writer import finalize_split, plan_shards, run_shard_tasks, write_info

log = logging.getLogger(__name__)
CONTINUOUS = ("valence", "arousal", "dominance")  # EMOTIC's scale: 1..10
MAT_NAMES = ("Annotations/Annotations.mat", "Annotations.mat", "annotations/Annotations.mat")
CSV_DIRS = ("emotic_pre", ".")  # where the CSV conversion (train.csv, val.csv, test.csv) is looked for


def _items(value: Any) -> List[Any]:
    """A MATLAB struct array or cell array read with squeeze_me: one element arrives bare, several as an array."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def _strings(value: Any) -> List[str]:
    return [str(v).strip() for v in _items(value) if str(v).strip()]


def _person(image: Any, person: Any, split: str, where: str) -> Dict[str, Any]:
    """One annotated person of Annotations.mat: train has one annotator (annotations_*), val and test the
    annotators' combination (combined_*)."""
    if split == "train":
        categories = [c for a in _items(person.annotations_categories) for c in _strings(a.categories)]
        cont = _items(person.annotations_continuous)[0]
    else:
        categories = _strings(person.combined_categories)
        cont = person.combined_continuous
    return {"folder": str(image.folder), "filename": str(image.filename),
            "box": [float(v) for v in np.asarray(person.body_bbox, dtype=float).ravel()],
            "categories": categories, "continuous": [float(getattr(cont, k)) for k in CONTINUOUS], "where": where}


def read_mat(path: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Annotations.mat: variables train, val, test; per image filename, folder, image_size, person[...]."""
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except (ValueError, TypeError, OSError) as e:
        raise DatasetLayoutError(f"{path}: not a readable MATLAB file ({e})") from None
    out = {}
    for split in SPLITS:
        if split not in mat:
            raise DatasetLayoutError(f"{path}: no variable {split!r} (EMOTIC's Annotations.mat has train, val, test)")
        rows = []
        for i, image in enumerate(_items(mat[split])):
            for j, person in enumerate(_items(getattr(image, "person", None))):
                where = f"{path}:{split}[{i}].person[{j}]"
                try:
                    rows.append(_person(image, person, split, where))
                except (AttributeError, IndexError, TypeError, ValueError) as e:  # this person fails, counted
                    rows.append({"folder": str(getattr(image, "folder", "?")),
                                 "filename": str(getattr(image, "filename", "?")), "where": where,
                                 "error": f"not in EMOTIC's layout ({type(e).__name__}: {e}); expected body_bbox and "
                                          f"annotations_*/combined_* fields"})
        out[split] = rows
    return out


def read_csv_split(path: Path, split: str) -> List[Dict[str, Any]]:
    """The CSV conversion (mat2py.py): Index, Folder, Filename, Image Size, BBox, Categorical_Labels,
    Continuous_Labels, Gender, Age; list cells as Python literals; val/test hold the combined labels."""
    rows = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            where = f"{path}:{n}"
            try:
                box = [float(v) for v in ast.literal_eval(row["BBox"])]
                categories = [str(c) for c in ast.literal_eval(row["Categorical_Labels"])]
                continuous = [float(v) for v in ast.literal_eval(row["Continuous_Labels"])]
                rows.append({"folder": row["Folder"], "filename": row["Filename"], "box": box,
                             "categories": categories, "continuous": continuous, "where": where})
            except (KeyError, ValueError, SyntaxError, TypeError) as e:
                raise DatasetLayoutError(f"{where}: not a row of EMOTIC's CSV conversion ({type(e).__name__}: {e}); "
                                         f"expected BBox, Categorical_Labels, Continuous_Labels as lists") from None
    return rows


def find_annotations(src: Path, annotations: Optional[str] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Annotations.mat (as distributed) or the train/val/test CSVs, under `src` or at `annotations`."""
    given = Path(annotations) if annotations else None
    if given is not None and given.is_file():
        return read_mat(given)
    mats = [src / m for m in MAT_NAMES if (src / m).is_file()]
    if given is None and mats:
        return read_mat(mats[0])
    for d in ([given] if given is not None else [src / c for c in CSV_DIRS]):
        if all((d / f"{s}.csv").is_file() for s in SPLITS):
            return {s: read_csv_split(d / f"{s}.csv", s) for s in SPLITS}
    raise DatasetLayoutError(f"{given or src}: no EMOTIC annotations (expected {' or '.join(MAT_NAMES)}, or "
                             f"train.csv/val.csv/test.csv in {' or '.join(CSV_DIRS)})")


def person_fractions(box: Sequence[float], width: int, height: int, where: str) -> List[float]:
    """body_bbox [x1, y1, x2, y2] in pixels (0-based, end exclusive; some boxes reach past the image by a pixel)
    -> fractions of the image, clamped to it."""
    if len(box) != 4:
        raise DatasetLayoutError(f"{where}: body_bbox {box} is not four numbers")
    x1, y1, x2, y2 = (min(max(v, 0.0), side) for v, side in zip(box, (width, height, width, height)))
    if x2 <= x1 or y2 <= y1:
        raise DatasetLayoutError(f"{where}: body_bbox {box} is empty inside the {width}x{height} image")
    return [x1 / width, y1 / height, x2 / width, y2 / height]


ORIENTATION = 0x0112  # the EXIF tag decode_image applies (ImageOps.exif_transpose)


def oriented_box(box: Sequence[float], orientation: int) -> List[float]:
    """A box in fractions of the stored pixels -> the same region in the image turned upright by its EXIF
    orientation (2-8: the flips and turns of ImageOps.exif_transpose)."""
    x0, y0, x1, y1 = box
    return {2: [1 - x1, y0, 1 - x0, y1], 3: [1 - x1, 1 - y1, 1 - x0, 1 - y0], 4: [x0, 1 - y1, x1, 1 - y0],
            5: [y0, x0, y1, x1], 6: [1 - y1, x0, 1 - y0, x1], 7: [1 - y1, 1 - x1, 1 - y0, 1 - x0],
            8: [y0, 1 - x1, y1, 1 - x0]}.get(orientation, [x0, y0, x1, y1])


class EmoticSample:
    """Picklable shard job body: one annotated person -> its image with the person's box and labels."""

    def __init__(self, image_root: Path, builder: SampleBuilder):
        self.image_root, self.builder = Path(image_root), builder

    def __call__(self, item: Dict[str, Any]):
        if "error" in item:
            raise DatasetLayoutError(f"{item['where']}: {item['error']}")
        unknown = [c for c in item["categories"] if c not in EMOTIC_CATEGORIES]
        if unknown:
            raise DatasetLayoutError(f"{item['where']}: categories {unknown} are not EMOTIC's 26")
        if not item["categories"]:
            raise DatasetLayoutError(f"{item['where']}: no category annotated")
        if len(item["continuous"]) != 3 or not all(np.isfinite(item["continuous"])):
            raise DatasetLayoutError(f"{item['where']}: valence/arousal/dominance {item['continuous']} are not "
                                     f"three numbers")
        source = f"{item['folder']}/{item['filename']}"
        data = read_file(self.image_root / source)
        try:
            raw = Image.open(io.BytesIO(data))
            (width, height), orientation = raw.size, raw.getexif().get(ORIENTATION, 1)
        except Exception as e:  # noqa: BLE001 - any decoder error is this image's failure
            raise ImageError("undecodable", f"{source}: {e}") from None
        # the box is in the stored pixels; the sample is the image upright (EXIF orientation applied)
        box = oriented_box(person_fractions(item["box"], width, height, item["where"]), orientation)
        labels = [1 if c in item["categories"] else 0 for c in EMOTIC_CATEGORIES]
        named = [c.lower() for c in EMOTIC_CATEGORIES if c in item["categories"]]
        return self.builder.build(data, split=item["split"], source=source, labels=labels, person_box=box,
                                  text=f"The emotions of the person are {join_list(named)}.",
                                  **dict(zip(CONTINUOUS, item["continuous"])))


def image_root(src: Path) -> Path:
    """Where `folder/filename` resolve: src/emotic/ (the layout the CSV conversion expects) or src/."""
    return src / "emotic" if (src / "emotic").is_dir() else src


def shard_emotic(src: str, out: str, *, annotations: Optional[str] = None, seed: int = 0, shard_size: int = 1000,
                 min_shards: int = 8, workers: int = 1, options: Optional[ImageOptions] = None,
                 name: str = "EMOTIC") -> Dict[str, Any]:
    """The official train/val/test split as given; the annotated body box is the person crop (no detector)."""
    src_path, out_path = Path(src), Path(out)
    given = options or ImageOptions()
    options = ImageOptions(given.max_side, given.quality, given.max_pixels, detector="none")  # the box is given
    splits = find_annotations(src_path, annotations)
    builder = SampleBuilder(name, EMOTIC_CATEGORIES, options)
    maker = EmoticSample(image_root(src_path), builder)
    summary = {}
    for split in SPLITS:
        entries = [{**e, "split": split} for e in splits[split]]
        random.Random(f"{seed}/{split}/shards").shuffle(entries)  # images mixed across shards (see folder.py)
        tasks = plan_shards(out_path / split, split, entries, shard_size, min_shards, options)
        summary[split] = finalize_split(out_path / split, run_shard_tasks(tasks, maker, workers, f"{name}/{split}"))
        log.info("%s/%s: %d persons", name, split, len(entries))
    info = {"dataset": name, "task": MULTI_LABEL, "classes": list(EMOTIC_CATEGORIES), "continuous": list(CONTINUOUS),
            "continuous_range": [1, 10], "splits": summary, "source": str(src_path.resolve()),
            "image": {"max_side": options.max_side, "quality": options.quality, "max_pixels": options.max_pixels},
            "detector": "annotation"}
    write_info(out_path, info)
    return info
