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
