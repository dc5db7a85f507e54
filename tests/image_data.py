"""Small real-image datasets for tests: crops of scikit-learn's bundled photos, tinted by class, plus bad files."""
import io
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from data_tools.folder import shard_folder
from data_tools.idx import FASHION_MNIST_CLASSES, idx_to_folder
from data_tools.registry import REGISTRY
from data_tools.samples import ImageOptions

E6 = list(REGISTRY["Emotion6"].classes)
PHOTOS = [np.asarray(img) for img in load_sample_images().images]  # china.jpg, flower.jpg (427x640)


def photo_crop(index: int, size: int = 64, tint: int = -1, n_tints: int = 8) -> Image.Image:
    """A deterministic crop of a real photo; `tint` shifts its colour so classes are learnable."""
    rng = np.random.default_rng(index)
    photo = PHOTOS[index % len(PHOTOS)]
    side = int(rng.integers(120, 400))
    y, x = int(rng.integers(0, photo.shape[0] - side + 1)), int(rng.integers(0, photo.shape[1] - side + 1))
    img = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
    if tint >= 0:
        arr = np.asarray(img).astype(np.float32)
        hue = np.array([np.cos(2 * np.pi * tint / n_tints), np.cos(2 * np.pi * (tint / n_tints + 1 / 3)),
                        np.cos(2 * np.pi * (tint / n_tints + 2 / 3))])
        arr = 0.5 * arr + 0.5 * 127.5 * (1 + hue)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_class_tree(root: Path, classes: Sequence[str], per_class: int, size: int = 64,
                    offset: int = 0) -> Dict[str, int]:
    """root/<class>/<class>_<n>.jpg; returns the number of images per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            img = photo_crop(offset + c * 1000 + n, size, tint=c, n_tints=len(classes))
            (root / name / f"{name}_{n:03d}.jpg").write_bytes(jpeg_bytes(img))
    return {name: per_class for name in classes}


def toy_train_shards(root: Path) -> Path:
    """A generic 'toy' train split: 3 classes x 20 photo crops of 24 px in 10 shards of 6 (with sizes.json)."""
    make_class_tree(root / "src", ["a", "b", "c"], per_class=20, size=24)
    shard_folder("toy", str(root / "src"), str(root / "out"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=6, min_shards=8, options=ImageOptions(detector="none"))
    return root / "out" / "train"


def emotion6_shards(root: Path, per_class: int, shard_size: int, min_shards: int) -> Path:
    """Emotion6-shaped shards (40 px photo crops tinted by class, so the classes are learnable) in root/shards."""
    make_class_tree(root / "src", E6, per_class=per_class, size=40)
    shard_folder("Emotion6", str(root / "src"), str(root / "shards"), shard_size=shard_size, min_shards=min_shards,
                 options=ImageOptions(detector="none"))
    return root / "shards"


def bad_files() -> Dict[str, bytes]:
    """name -> bytes of inputs every reader must survive (and the reason each is expected to fail with)."""
    good = jpeg_bytes(photo_crop(7, 64))
    big = Image.new("L", (3000, 3000), 0)
    big_buf = io.BytesIO()
    big.save(big_buf, format="PNG")
    return {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "page.jpg": b"<!DOCTYPE html><html><body>404 not found</body></html>",
        "huge.png": big_buf.getvalue(),
    }


def alpha_png() -> bytes:
    """A PNG whose left half is fully transparent: it must become white, the right half stays red."""
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, 20:, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    photo_crop(3, 48).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make test installs it)


def fashion_shards(root: Path) -> Path:
    """600 train / 200 val / 400 test Fashion-MNIST images as shards (train from the training file, val and test
    disjoint from the test file)."""
    train = [FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz"]
    test = [FMNIST / "t10k-images-idx3-ubyte.gz", FMNIST / "t10k-labels-idx1-ubyte.gz"]
    for split, files, n, skip in (("train", train, 60, 0), ("val", test, 20, 0), ("test", test, 40, 20)):
        idx_to_folder(*files, str(root / "src" / split), FASHION_MNIST_CLASSES, per_class=n, skip_per_class=skip)
    shard_folder("fashion", str(root / "src"), str(root / "shards"), generic=True, shard_size=100, min_shards=4,
                 options=ImageOptions(detector="none"))
    return root / "shards"
