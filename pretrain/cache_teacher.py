"""`python -m pretrain.cache_teacher`: the teacher's image and text embeddings of every sample, as sidecar shards.

    python -m pretrain.cache_teacher --shards 'shards/web/{00000..00999}.tar' --teacher-arch ViT-B-16 \
        --teacher-checkpoint /models/clip_vit_b16.bin --out shards/web_teacher
    python -m pretrain.cache_teacher --shards ... --teacher-config configs/pretrain/demo.yaml --out ...

For each shard NNNNN.tar it writes out/NNNNN.tar holding `{key}.clip_image.npy` and `{key}.clip_text.npy`
(L2-normalised, float16 by default) and then out/NNNNN_stats.json, the completion marker: a rerun skips finished
shards. The image embedding is of a fixed centre view (shorter side resized to the teacher's input, centre crop);
pretraining with `teacher.cached=true` uses it in place of the teacher's view of each augmented crop.
"""
import argparse
import io
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from tqdm import tqdm

from data_tools.images import to_rgb
from data_tools.reader import expand_urls
from data_tools.tars import read_tar
from data_tools.writer import atomic_tar
from pretrain.teacher import IMAGENET_MEAN, IMAGENET_STD, add_teacher_args, make_teacher, teacher_config_from_args
from runtime.atomic import atomic_write_json
from runtime.logs import setup_logging

log = logging.getLogger("pretrain.cache_teacher")


def center_view(size: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def iter_samples(path: str) -> Iterator[Tuple[str, bytes, dict]]:
    """(key, jpeg bytes, record) of each complete sample of a shard, in order."""
    members, error = read_tar(path)
    if error:
        raise ValueError(f"{path}: unreadable shard ({error})")
    for key, files in members.items():
        if "jpg" in files and "json" in files:
            yield key, files["jpg"], json.loads(files["json"])


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def cache_shard(teacher: nn.Module, shard: str, out_dir: Path, batch_size: int, dtype: str,
                device: torch.device) -> Dict[str, object]:
    view = center_view(teacher.image_size)
    samples = list(iter_samples(shard))
    out_tar = out_dir / Path(shard).name
    with atomic_tar(out_tar) as writer:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            images = torch.stack([view(to_rgb(Image.open(io.BytesIO(jpg)))) for _, jpg, _ in chunk]).to(device)
            tokens = teacher.tokenize([record.get("text") or "" for _, _, record in chunk]).to(device)
            image_emb = teacher.encode_image(images).cpu().numpy().astype(dtype)
            text_emb = teacher.encode_text(tokens).cpu().numpy().astype(dtype)
            for (key, _, _), v, t in zip(chunk, image_emb, text_emb):
                writer.write({"__key__": key, "clip_image.npy": _npy(v), "clip_text.npy": _npy(t)})
    stats = {"shard": Path(shard).name, "source": str(shard), "samples": len(samples), "teacher": teacher.arch,
             "checkpoint": teacher.checkpoint, "dim": teacher.embed_dim, "dtype": dtype,
             "view": f"center {teacher.image_size}", "teacher_identity": getattr(teacher, "identity", None)}
    atomic_write_json(out_dir / f"{Path(shard).stem}_stats.json", stats)
    return stats


def cache_teacher(shards: Sequence[str], teacher: nn.Module, out: str, batch_size: int = 64,
                  dtype: str = "float16", device: Optional[str] = None) -> List[Dict[str, object]]:
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("shard file names must be unique: the cache is keyed by file name")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher.to(dev)
    done = []
    for url in tqdm(urls, desc="teacher cache", unit="shard"):
        stats_file = out_dir / f"{Path(url).stem}_stats.json"
        if stats_file.is_file() and (out_dir / Path(url).name).is_file():
            done.append(json.loads(stats_file.read_text()))
            continue
        done.append(cache_shard(teacher, url, out_dir, batch_size, dtype, dev))
    return done


def check_teacher_cache(cache_dir: str, teacher_cfg) -> None:
    """A cache made by another teacher than the run's `teacher.*` would feed wrong targets silently (two teachers of
    one width fit the same slots): an error naming both. Caches that recorded no identity are let through."""
    from pretrain.teacher import teacher_identity
    stats_files = sorted(Path(cache_dir).glob("*_stats.json"))
    if not stats_files:
        raise FileNotFoundError(f"data.teacher_cache={cache_dir}: no *_stats.json (not made by pretrain.cache_teacher, "
                                f"or not finished)")
    recorded = json.loads(stats_files[0].read_text()).get("teacher_identity")
    expected = teacher_identity(teacher_cfg)
    if recorded is not None and recorded != expected:
        raise ValueError(f"data.teacher_cache={cache_dir} was made by the teacher {recorded}, but this run's teacher.* "
                         f"is {expected}: rebuild the cache with this teacher (python -m pretrain.cache_teacher), or "
                         f"set teacher.* to the cache's")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True, help="shard files or brace patterns")
    add_teacher_args(parser, "local weights file ('random': open_clip plumbing tests; 'packaged': classifier)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    setup_logging()
    teacher = make_teacher(teacher_config_from_args(args))
    stats = cache_teacher(args.shards, teacher, args.out, args.batch_size, args.dtype, args.device)
    log.info("teacher cache: %d shards, %d samples -> %s", len(stats), sum(s["samples"] for s in stats), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
