"""`python -m pretrain.cache_teacher`: the teacher's image and text embeddings of every sample, as sidecar shards.

    python -m pretrain.cache_teacher --shards 'shards/web/{00000..00999}.tar' --teacher-arch ViT-B-16 \
        --teacher-checkpoint path/to/clip_vit_b16.bin --out shards/web_teacher
    torchrun --nproc_per_node 8 -m pretrain.cache_teacher --shards ... --teacher-config configs/pretrain/vit_b16.yaml \
        --teacher-checkpoint path/to/clip_vit_b16.bin --out shards/web_teacher      # one GPU per rank
    python -m pretrain.cache_teacher --shards ... --teacher-config configs/pretrain/demo.yaml --out ...

For each shard NNNNN.tar it writes out/NNNNN.tar holding `{key}.clip_image.npy` and `{key}.clip_text.npy`
(L2-normalised, float16 by default) and then out/NNNNN_stats.json, the completion marker: a rerun skips finished
shards. Under torchrun (or srun) rank r of n takes shards r, r+n, ...; loader workers read and decode them (each
worker whole shards) while the teacher runs, on a GPU under bf16 autocast with copies in and out that do not wait
for it. The image embedding is of a fixed centre view (shorter side resized to the teacher's input, centre crop);
pretraining with `teacher.cache=OUT` uses it in place of the teacher's view of each augmented crop.
"""
import argparse
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms
from tqdm import tqdm

from data_tools.images import to_rgb
from data_tools.reader import expand_urls, leave_stop_signals_to_main
from data_tools.tars import read_tar
from data_tools.writer import atomic_tar
from pretrain.data import check_shards, normalize_pixels
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.teacher import make_teacher
from pretrain.teacher_cli import add_teacher_args, teacher_config_from_args
from pretrain.teacher_error import TeacherCacheError
from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.cli import HelpFormatter, with_one_line_errors
from runtime.device import DeviceError, configure_cuda, loader_workers, resolve_device
from runtime.logs import setup_logging
from runtime.precision import autocast, resolve_precision

log = logging.getLogger("pretrain.cache_teacher")


def center_crop(size: int) -> transforms.Compose:
    """The cached view as uint8 pixels: shorter side resized to `size` (bicubic), centre crop."""
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.PILToTensor()])


def center_view(size: int) -> transforms.Compose:
    """The same view as ImageNet-normalised floats (what the teacher's encode_image takes)."""
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


class ShardBatches(IterableDataset):
    """Decoded batches of whole shards, for a DataLoader: each loader worker takes shards worker, worker + W, ...
    and yields each shard's batches in order, the last one marked; a shard with no complete sample still yields
    one (empty) batch, so that it is finished too."""

    def __init__(self, shards: Sequence[str], image_size: int, batch_size: int):
        self.shards, self.image_size, self.batch_size = list(shards), image_size, batch_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        view = center_crop(self.image_size)
        for shard in self.shards[worker::workers]:
            samples = list(iter_samples(shard))
            starts = range(0, len(samples), self.batch_size) if samples else [0]
            for start in starts:
                chunk = samples[start:start + self.batch_size]
                pixels = [view(to_rgb(Image.open(io.BytesIO(jpg)))) for _, jpg, _ in chunk]
                yield {"shard": shard, "keys": [key for key, _, _ in chunk], "samples": len(samples),
                       "texts": [record.get("text") or "" for _, _, record in chunk],
                       "pixels": torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size,
                                                                               self.image_size, dtype=torch.uint8),
                       "last": start + self.batch_size >= len(samples)}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def shard_stats(teacher: nn.Module, shard: str, samples: int, dtype: str) -> Dict[str, object]:
    return {"shard": Path(shard).name, "source": str(shard), "samples": samples, "teacher": teacher.arch,
            "checkpoint": teacher.checkpoint, "dim": teacher.embed_dim, "dtype": dtype,
            "view": f"center {teacher.image_size}", "teacher_identity": getattr(teacher, "identity", None)}


def write_shard(out_dir: Path, shard: str, parts: List[Tuple[List[str], torch.Tensor, torch.Tensor]], samples: int,
                teacher: nn.Module, dtype: str) -> Dict[str, object]:
    """The shard's sidecar tar (atomically), then its stats file, the completion marker."""
    with atomic_tar(out_dir / Path(shard).name) as writer:
        for keys, image_emb, text_emb in parts:
            for key, v, t in zip(keys, image_emb.numpy().astype(dtype), text_emb.numpy().astype(dtype)):
                writer.write({"__key__": key, "clip_image.npy": _npy(v), "clip_text.npy": _npy(t)})
    stats = shard_stats(teacher, shard, samples, dtype)
    atomic_write_json(out_dir / f"{Path(shard).stem}_stats.json", stats)
    return stats


def is_done(out_dir: Path, shard: str) -> bool:
    return (out_dir / f"{Path(shard).stem}_stats.json").is_file() and (out_dir / Path(shard).name).is_file()


@torch.no_grad()
def cache_teacher(shards: Sequence[str], teacher: nn.Module, out: str, batch_size: int = 64,
                  dtype: str = "float16", device: Optional[str] = None, num_workers: int = 2, rank: int = 0,
                  world_size: int = 1, precision: str = "auto") -> List[Dict[str, object]]:
    """Embed rank `rank`'s share of the shards (every `world_size`-th) that are not finished yet; returns the stats
    of its shards, finished before or now."""
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("shard file names must be unique: the cache is keyed by file name")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = urls[rank::world_size]
    done = {u: json.loads((out_dir / f"{Path(u).stem}_stats.json").read_text()) for u in mine if is_done(out_dir, u)}
    todo = [u for u in mine if u not in done]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, dev)
    workers = min(num_workers, len(todo))
    loader = DataLoader(ShardBatches(todo, teacher.image_size, batch_size), batch_size=None, num_workers=workers,
                        pin_memory=dev.type == "cuda", worker_init_fn=leave_stop_signals_to_main if workers else None)
    batches = iter(loader) if todo else iter(())  # the workers fork before this process touches the GPU
    configure_cuda(dev)
    teacher.to(dev)
    parts: Dict[str, List[Tuple[List[str], torch.Tensor, torch.Tensor]]] = {}
    progress = tqdm(total=len(todo), desc=f"teacher cache (rank {rank})", unit="shard", disable=not todo)
    for batch in batches:
        shard = batch["shard"]
        if batch["keys"]:
            pixels = batch["pixels"].to(dev, non_blocking=True)
            tokens = teacher.tokenize(batch["texts"]).to(dev, non_blocking=True)
            with autocast(precision, dev):
                image_emb, text_emb = teacher.encode_image(normalize_pixels(pixels)), teacher.encode_text(tokens)
            # to the host without waiting for the device: read only when the shard is written
            parts.setdefault(shard, []).append((batch["keys"], image_emb.float().to("cpu", non_blocking=True),
                                                text_emb.float().to("cpu", non_blocking=True)))
        if batch["last"]:
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()
            done[shard] = write_shard(out_dir, shard, parts.pop(shard, []), batch["samples"], teacher, dtype)
            progress.update()
    progress.close()
    return [done[u] for u in mine]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shards", nargs="+", required=True, help="shard files or brace patterns")
    add_teacher_args(parser, "local weights file ('random': open_clip plumbing tests; 'packaged': classifier)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--workers", default="auto",
                        help="loader workers per rank that read and decode (auto: the rank's CPUs less two)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: this rank's GPU if there is one")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="auto: bf16 autocast on GPUs that have it, fp32 on CPU")
    args = parser.parse_args(argv)
    env = distributed.resolve_env()
    setup_logging(env.rank)

    def body() -> int:
        device = resolve_device(env, args.device, args.precision)
        check_shards(args.shards)
        teacher = make_teacher(teacher_config_from_args(args))
        start = time.perf_counter()
        stats = cache_teacher(args.shards, teacher, args.out, args.batch_size, args.dtype, str(device),
                              loader_workers(args.workers), env.rank, env.world_size, args.precision)
        samples = sum(s["samples"] for s in stats)
        log.info("teacher cache: rank %d of %d, %d shards, %d samples -> %s (%.1f img/s)", env.rank,
                 env.world_size, len(stats), samples, args.out, samples / max(time.perf_counter() - start, 1e-9))
        return 0
    return with_one_line_errors(body, (DeviceError,))

def check_teacher_cache(cache_dir: str, teacher_cfg, sources: Sequence[Sequence[str]],
                        patterns: Sequence[str] = ()) -> None:
    """Before a cached run builds anything: `teacher.cache` holds a finished sidecar for every shard of
    `sources` (check_shards' result), made by the run's teacher (two teachers of one width fit the same slots, so
    another teacher's cache would feed wrong targets silently). Errors name the key and the command that makes
    the cache. Caches that recorded no teacher identity are let through."""
    from pretrain.teacher import teacher_identity
    shards = [u for urls in sources for u in urls]
    teacher = [f"--teacher-{k} {v}" for k, v in (("backend", teacher_cfg.backend), ("arch", teacher_cfg.arch),
                                                 ("checkpoint", teacher_cfg.checkpoint)) if v]
    command = " ".join(["python -m pretrain.cache_teacher --shards", *(f"'{p}'" for p in patterns or shards),
                        *teacher, "--out", cache_dir])
    missing = [u for u in shards if not is_done(Path(cache_dir), u)]
    if missing:
        raise TeacherCacheError(f"teacher.cache={cache_dir} lacks the teacher's outputs for {len(missing)} of "
                                f"{len(shards)} shards of data.train (e.g. {Path(missing[0]).name}): run `{command}` "
                                f"(it resumes, skipping finished shards)")
    stats_file = Path(cache_dir) / f"{Path(shards[0]).stem}_stats.json"
    recorded = json.loads(stats_file.read_text()).get("teacher_identity")
    expected = teacher_identity(teacher_cfg)
    if recorded is not None and recorded != expected:
        raise TeacherCacheError(f"teacher.cache={cache_dir} was made by the teacher {recorded}, but this run's "
                                f"teacher.* is {expected}: rebuild the cache with this teacher (`{command}` into a new "
                                f"directory), or set teacher.* to the cache's")

if __name__ == "__main__":
    raise SystemExit(main())
