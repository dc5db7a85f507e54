"""`idx-to-folder`: MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST) -> a class-folder tree of PNG images."""
import gzip
import struct
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle_boot")


def read_idx(path: str) -> np.ndarray:
    """An IDX array (gzip or plain): magic 0x0000 <type 0x08> <ndim>, big-endian dims, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values (truncated?)")
    return body.reshape(dims)


def class_names(n_labels: int, classes: Optional[Sequence[str]], keep: Optional[Sequence[int]]) -> Dict[int, str]:
    """label -> folder name for the labels kept: `classes` names every label by index, or only the `keep` ones."""
    keep = list(keep) if keep else list(range(n_labels))
    bad = [k for k in keep if not 0 <= k < n_labels]
    if bad:
        raise ValueError(f"--labels {bad[0]}: the labels run from 0 to {n_labels - 1}")
    if not classes:
        return {k: str(k) for k in keep}
    if len(classes) == n_labels:
        return {k: classes[k] for k in keep}
    if len(classes) == len(keep):
        return dict(zip(keep, classes))
    raise ValueError(f"--classes: {len(classes)} name(s) for {n_labels} labels; give one name per label, or pick "
                     f"labels with --labels (e.g. --labels 0 1 --classes {' '.join(classes[:2])}) and name those")


def idx_to_folder(images: str, labels: str, out: str, classes: Optional[Sequence[str]] = None,
                  per_class: int = 0, skip_per_class: int = 0, keep: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Write out/<class>/<index>.png for `per_class` images of each class (0: all), after skipping the first
    `skip_per_class` of each (so one file gives disjoint val and test folders); `keep`: only these labels."""
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    n_labels = int(y.max()) + 1
    by_label = class_names(n_labels, classes or (FASHION_MNIST_CLASSES if n_labels == 10 else None), keep)
    names = list(by_label.values())
    counts = {name: 0 for name in names}
    seen = {name: 0 for name in names}
    for index, (img, label) in enumerate(zip(x, y)):
        if int(label) not in by_label:
            continue
        name = by_label[int(label)]
        seen[name] += 1
        if seen[name] <= skip_per_class or (per_class and counts[name] >= per_class):
            continue
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{index:05d}.png")
        counts[name] += 1
    return counts
