"""A small EMOTIC tree in the layout the dataset is distributed in: Annotations/Annotations.mat (MATLAB structs
train/val/test: filename, folder, image_size{n_col,n_row}, original_database, person[body_bbox,
annotations_categories, (combined_categories,) annotations_continuous, (combined_continuous,) gender, age]) and
images under emotic/<folder>/<filename>; plus the CSV conversion of the same annotations."""
import csv
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

from data_tools.registry import EMOTIC_CATEGORIES

FOLDERS = ("mscoco/images", "framesdb/images", "emodb_small/images", "ade20k/images")


def _struct(**fields) -> np.ndarray:
    """A 1x1 MATLAB struct."""
    arr = np.empty((1, 1), dtype=[(k, "O") for k in fields])
    for k, v in fields.items():
        arr[0, 0][k] = v
    return arr


def _struct_array(rows: List[Dict]) -> np.ndarray:
    arr = np.empty((1, len(rows)), dtype=[(k, "O") for k in rows[0]])
    for i, row in enumerate(rows):
        for k, v in row.items():
            arr[0, i][k] = v
    return arr


def _cell(strings) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cell[0, i] = s
    return cell


def _vad(v, a, d) -> np.ndarray:
    return _struct(valence=float(v), arousal=float(a), dominance=float(d))


def make_emotic(root: Path, images: Dict[str, int] = None, seed: int = 0) -> Dict[str, List[Dict]]:
    """Write the tree; return the persons per split as written (folder, filename, box in pixels, categories,
    continuous) so a test can check every sample against its annotation."""
    images = images or {"train": 10, "val": 4, "test": 6}
    rng = random.Random(seed)
    truth: Dict[str, List[Dict]] = {}
    mat = {}
    for split, n in images.items():
        entries, truth[split] = [], []
        for i in range(n):
            folder = FOLDERS[i % len(FOLDERS)]
            filename = f"{split}_{i:04d}.jpg"
            w, h = rng.choice([(64, 48), (48, 64), (80, 60)])
            path = root / "emotic" / folder / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((h, w, 3), rng.randrange(40, 200), np.uint8)
            persons = []
            for j in range(1 + i % 2):  # some images have two annotated persons
                x1, y1 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
                x2, y2 = rng.randrange(x1 + 8, w + 1), rng.randrange(y1 + 8, h + 1)
                if j == 0 and i == 1:
                    x1, y2 = -1, h + 1  # boxes in the real file reach past the image by a pixel
                pixels[max(y1, 0):y2, max(x1, 0):x2] = 255 - 60 * j
                cats = sorted(rng.sample(EMOTIC_CATEGORIES, rng.randint(1, 4)))
                vad = [rng.randint(1, 10) for _ in range(3)]
                box = np.array([x1, y1, x2, y2], dtype=float)
                if split == "train":
                    persons.append({"body_bbox": box, "annotations_categories": _struct(categories=_cell(cats)),
                                    "annotations_continuous": _vad(*vad), "gender": "Female", "age": "Adult"})
                else:  # several annotators, and their combination (what evaluation uses)
                    other = sorted(rng.sample(EMOTIC_CATEGORIES, 2))
                    persons.append({"body_bbox": box,
                                    "annotations_categories": _struct_array([{"categories": _cell(cats)},
                                                                             {"categories": _cell(other)}]),
                                    "combined_categories": _cell(cats),
                                    "annotations_continuous": _struct_array([
                                        {"valence": 1.0, "arousal": 1.0, "dominance": 1.0}] * 2),
                                    "combined_continuous": _vad(*vad), "gender": "Male", "age": "Kid"})
                truth[split].append({"folder": folder, "filename": filename, "box": [x1, y1, x2, y2],
                                     "categories": cats, "continuous": vad, "size": (w, h)})
            Image.fromarray(pixels).save(path, quality=95)
            entries.append({"filename": filename, "folder": folder, "image_size": _struct(n_col=w, n_row=h),
                            "original_database": _struct(name=folder.split("/")[0]),
                            "person": _struct_array(persons)})
        mat[split] = _struct_array(entries)
    from scipy.io import savemat
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    savemat(str(root / "Annotations" / "Annotations.mat"), mat)
    return truth


def write_csv_conversion(folder: Path, truth: Dict[str, List[Dict]]) -> None:
    """The same annotations as the CSV conversion writes them (list cells as Python literals)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, persons in truth.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Index", "Folder", "Filename", "Image Size", "BBox", "Categorical_Labels",
                             "Continuous_Labels", "Gender", "Age"])
            for i, p in enumerate(persons):
                writer.writerow([i, p["folder"], p["filename"], str(list(p["size"])), str(p["box"]),
                                 str(p["categories"]), str(p["continuous"]), "Female", "Adult"])
