"""IDX (MNIST format) reading and export to a class-folder tree, on hand-built files and Debian's Fashion-MNIST."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.idx import idx_to_folder, read_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_roundtrip_and_export(tmp_path):
    images = np.arange(5 * 4 * 3).reshape(5, 4, 3) % 256
    labels = np.array([1, 0, 1, 1, 0])
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "y.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    counts = idx_to_folder(tmp_path / "x.gz", tmp_path / "y.gz", tmp_path / "out", ["zero", "one"], per_class=2)
    assert counts == {"zero": 2, "one": 2}
    assert sorted(p.name for p in (tmp_path / "out" / "one").iterdir()) == ["00000.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "one" / "00002.png")), images[2])
    rest = idx_to_folder(tmp_path / "x.gz", tmp_path / "y.gz", tmp_path / "rest", ["zero", "one"], skip_per_class=1)
    assert rest == {"zero": 1, "one": 2}  # disjoint from the first image of each class
    assert sorted(p.name for p in (tmp_path / "rest" / "one").iterdir()) == ["00002.png", "00003.png"]


def test_bad_idx_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "x.gz", np.zeros((3, 2, 2)))
    raw = gzip.open(tmp_path / "x.gz").read()
    (tmp_path / "cut").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match=r"header says \(3, 2, 2\) but holds 9 values"):
        read_idx(tmp_path / "cut")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian():
    x = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    y = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
