"""Real JPEGs for the data benchmarks: crops of scikit-learn's two bundled photos, in class folders."""
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def make_images(root: Path, n: int, classes: int = 4) -> None:
    """n photo crops of 256-400 px (scikit-learn's two bundled photos), JPEG quality 90, in class folders."""
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % 2]
        side = int(rng.integers(256, 400))
        y, x = int(rng.integers(0, photo.shape[0] - side + 1)), int(rng.integers(0, photo.shape[1] - side + 1))
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + side, x:x + side]).save(folder / f"{i:05d}.jpg", quality=90)


def make_web_photos(root: Path, n: int, classes: int = 4) -> None:
    """n web-size photos: crops of 400-640 x 300-427 px (landscape and portrait, never upscaled) of scikit-learn's
    two bundled 640x427 photos, JPEG quality 90, in class folders."""
    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % 2]
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 428))
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        crop = Image.fromarray(photo[y:y + h, x:x + w])
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (crop.transpose(Image.ROTATE_90) if i % 4 == 3 else crop).save(folder / f"{i:05d}.jpg", quality=90)


def make_shards(root: Path, n: int, shard_size: int = 16, min_shards: int = 8) -> str:
    """n photo crops as train shards (generic dataset 'bench', no person boxes); returns their brace pattern."""
    from data_tools.folder import shard_folder
    from data_tools.samples import ImageOptions
    make_images(root / "folder", n)
    shard_folder("bench", str(root / "folder"), str(root / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=shard_size, min_shards=min_shards, options=ImageOptions(max_side=64, detector="none"))
    count = len(list((root / "shards" / "train").glob("*.tar")))
    return str(root / "shards" / "train" / f"{{00000..{count - 1:05d}}}.tar")
