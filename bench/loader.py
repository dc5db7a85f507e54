"""Loader throughput: our WebDataset reader vs torchvision ImageFolder on the same JPEGs (224 px train transform).

    python bench/loader.py [--images 1024] [--workers 0 1 2] [--out bench/results/loader.json]

Both read identical JPEG files (the shards hold the folder's bytes unchanged: max side 0, no detector) through the
same transform (RandomResizedCrop 224, flip, ToTensor, Normalize); runs alternate A/B and the median of `--repeats`
full passes is reported, after one warm-up pass each.
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.photos import make_images  # noqa: E402
from data_tools.folder import shard_folder  # noqa: E402
from data_tools.reader import make_loader  # noqa: E402
from data_tools.samples import ImageOptions  # noqa: E402
from pretrain.teacher import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402

TRANSFORM = transforms.Compose([
    transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


def wds_transform(sample):
    return {"image": TRANSFORM(sample["image"]), "label": sample["meta"]["label"]}


def one_pass(loader) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch["image"]
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        make_images(folder, args.images)
        shard_folder("bench", str(folder), str(shards), generic=True, ratios=(1.0, 0.0, 0.0), shard_size=64,
                     min_shards=8, options=ImageOptions(max_side=0, detector="none", quality=90))
        rows = []
        for workers in args.workers:
            folder_loader = DataLoader(datasets.ImageFolder(str(folder), TRANSFORM), batch_size=args.batch_size,
                                       shuffle=True, num_workers=workers)
            wds_loader = make_loader(sorted(str(p) for p in (shards / "train").glob("*.tar")),
                                     batch_size=args.batch_size, transform=wds_transform, num_workers=workers,
                                     resampled=False, drop_last=False, shuffle_buffer=256)
            one_pass(folder_loader), one_pass(wds_loader)  # warm-up: page cache, worker start-up code paths
            a, b = [], []
            for _ in range(args.repeats):
                a.append(one_pass(folder_loader))
                b.append(one_pass(wds_loader))
            row = {"workers": workers, "imagefolder_img_per_s": statistics.median(a),
                   "webdataset_img_per_s": statistics.median(b)}
            row["ratio"] = row["webdataset_img_per_s"] / row["imagefolder_img_per_s"]
            rows.append(row)
            print(f"workers {workers}: ImageFolder {row['imagefolder_img_per_s']:.0f} img/s, "
                  f"WebDataset {row['webdataset_img_per_s']:.0f} img/s, ratio {row['ratio']:.2f}")
    result = {"bench": "loader", "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
              "transform": "RandomResizedCrop(224, bicubic) + flip + ToTensor + Normalize",
              "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "processor": platform.processor()},
              "rows": rows, "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print("loader: WebDataset/ImageFolder ratio " + ", ".join(f"{r['workers']}w {r['ratio']:.2f}" for r in rows)
          + f" -> {args.out}")


if __name__ == "__main__":
    main()
