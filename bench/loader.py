"""Loader throughput: our WebDataset reader vs torchvision ImageFolder on the same source JPEGs, 224 px train views.

    python bench/loader.py [--images 1024] [--workers 0 1 2] [--out bench/results/loader.json]

The sources are web-size photos (400-640 x 300-427 px, JPEG quality 90). Four loaders, run in alternation (A B C D
A B C D ...), the median of `--repeats` full passes each after one warm-up pass:
- `imagefolder`: ImageFolder with torchvision's default loader + RandomResizedCrop(224, scale 0.2-1, bicubic), flip,
  ToTensor, Normalize (float32 batches).
- `webdataset_same_transform`: our reader on shards holding the folder's bytes unchanged (max side 0), decoded in
  full, the same transform: the reader alone.
- `ours`: what pretraining reads: shards written with data_tools' default max side (512), images opened lazily and
  decoded once at JPEG draft scale where the crop allows (data_tools.crops), uint8 batches out of the loader (the
  trainer normalises them once per batch on its device, a GPU's work: not timed here).
- `ours_normalized_on_cpu`: the same, plus that normalisation on this CPU in the consuming process (what a CPU-only
  trainer pays).
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.photos import make_web_photos  # noqa: E402
from data_tools.crops import DraftResizedCrops  # noqa: E402
from data_tools.folder import shard_folder  # noqa: E402
from data_tools.reader import make_loader  # noqa: E402
from data_tools.samples import ImageOptions  # noqa: E402
from pretrain.data import normalize_views  # noqa: E402
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402

TRANSFORM = transforms.Compose([
    transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.RandomHorizontalFlip(),
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


def wds_transform(sample):
    return {"image": TRANSFORM(sample["image"]), "label": sample["meta"]["label"]}


CROPS = DraftResizedCrops((0.2, 1.0))


def ours_transform(sample):
    return {"image": CROPS(sample["image"], [(None, 224)])[0], "label": sample["meta"]["label"]}


def one_pass(loader, normalize: bool = False) -> float:
    start, count = time.perf_counter(), 0
    for batch in loader:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch["image"]
        if normalize:
            images = normalize_views({"image": images})["image"]
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
        folder, same, ours = Path(tmp) / "folder", Path(tmp) / "same", Path(tmp) / "ours"
        make_web_photos(folder, args.images)
        for out, max_side in ((same, 0), (ours, ImageOptions().max_side)):
            shard_folder("bench", str(folder), str(out), generic=True, ratios=(1.0, 0.0, 0.0), shard_size=64,
                         min_shards=8, options=ImageOptions(max_side=max_side, detector="none", quality=90))
        rows = []
        for workers in args.workers:
            def reader(shards, transform, image_format):
                return make_loader(sorted(str(p) for p in (shards / "train").glob("*.tar")),
                                   batch_size=args.batch_size, transform=transform, num_workers=workers,
                                   resampled=False, drop_last=False, shuffle_buffer=256, image_format=image_format)
            passes = {
                "imagefolder": partial(one_pass, DataLoader(datasets.ImageFolder(str(folder), TRANSFORM),
                                                            batch_size=args.batch_size, shuffle=True,
                                                            num_workers=workers)),
                "webdataset_same_transform": partial(one_pass, reader(same, wds_transform, "pil")),
                "ours": partial(one_pass, reader(ours, ours_transform, "lazy")),
                "ours_normalized_on_cpu": partial(one_pass, reader(ours, ours_transform, "lazy"), normalize=True),
            }
            for run in passes.values():
                run()  # warm-up: page cache, worker start-up code paths
            speeds = {name: [] for name in passes}
            for _ in range(args.repeats):
                for name, run in passes.items():
                    speeds[name].append(run())
            row = {"workers": workers, **{f"{name}_img_per_s": statistics.median(v) for name, v in speeds.items()}}
            row["ours_over_imagefolder"] = row["ours_img_per_s"] / row["imagefolder_img_per_s"]
            row["ours_normalized_on_cpu_over_imagefolder"] = (row["ours_normalized_on_cpu_img_per_s"]
                                                              / row["imagefolder_img_per_s"])
            row["same_transform_over_imagefolder"] = (row["webdataset_same_transform_img_per_s"]
                                                      / row["imagefolder_img_per_s"])
            rows.append(row)
            print(f"workers {workers}: " + ", ".join(f"{name} {statistics.median(v):.0f} img/s"
                                                     for name, v in speeds.items())
                  + f"; ours/ImageFolder {row['ours_over_imagefolder']:.2f} (normalised on the CPU "
                  f"{row['ours_normalized_on_cpu_over_imagefolder']:.2f}), same transform/ImageFolder "
                  f"{row['same_transform_over_imagefolder']:.2f}", flush=True)
    result = {"bench": "loader", "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
              "transform": "RandomResizedCrop(224, scale 0.2-1, bicubic) + flip; float32 normalised batches",
              "sources": "web-size photos, 400-640 x 300-427 px", "ours_max_side": ImageOptions().max_side,
              "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "processor": platform.processor()},
              "rows": rows, "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print("loader: ours/ImageFolder " + ", ".join(f"{r['workers']}w {r['ours_over_imagefolder']:.2f}" for r in rows)
          + f" -> {args.out}")


if __name__ == "__main__":
    main()
