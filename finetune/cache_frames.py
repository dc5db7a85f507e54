"""`python -m finetune.cache_frames`: the encoder's per-frame features of every clip chunk, once, as sidecar shards
that the temporal job reads with temporal.encoder_mode=cached.

    python -m finetune.cache_frames --dataset afew --data shards/afew --checkpoint runs/pre --out cache/afew
    torchrun --nproc_per_node 8 -m finetune.cache_frames ...      # rank r of n takes shards r, r+n, ...

For each split and shard NNNNN.tar it writes OUT/<split>/NNNNN.tar holding `{key}.feats.npy` (frames x width, the
encoder's pooled features of the evaluation view, float16 by default) and then OUT/<split>/NNNNN_stats.json, the
completion marker, with the encoder's identity (source, architecture, input size, SHA-256 of its weights): a rerun
skips finished shards, and the temporal job refuses a cache made by another encoder.
"""
import argparse
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from PIL import Image

from data_tools.images import load_rgb
from data_tools.reader import FRAME_MEMBER
from data_tools.tars import read_tar
from data_tools.writer import atomic_tar
from finetune.config import EncoderConfig
from finetune.data import make_transforms
from finetune.encoder import create_encoder
from finetune.temporal_data import resolve_frames
from finetune.temporal_model import encoder_identity
from pretrain.cache_teacher import _npy, is_done
from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.cli import HelpFormatter, with_one_line_errors
from runtime.device import DeviceError, configure_cuda, resolve_device
from runtime.logs import setup_logging
from runtime.precision import autocast, resolve_precision

log = logging.getLogger("finetune.cache_frames")
SPLITS = ("train", "val", "test")


class FrameCacheError(ValueError):
    """A feature cache that is incomplete or was made by another encoder."""


def frame_view(img_size: int):
    """The evaluation view the temporal job shows each frame: the same transform as fine-tuning's evaluation."""
    from finetune.config import AugmentConfig
    return make_transforms(img_size, AugmentConfig())[1]


@torch.no_grad()
def cache_shard(encoder, view, shard: Path, out_dir: Path, identity: Dict[str, Any], device, precision: str,
                batch_size: int, dtype: str) -> Dict[str, Any]:
    """One shard's features (atomically), then its stats file, the completion marker."""
    members, error = read_tar(shard)
    if error:
        raise FrameCacheError(f"{shard}: unreadable shard ({error})")
    frames = 0
    with atomic_tar(out_dir / shard.name) as writer:
        for key, files in members.items():
            names = sorted((k for k in files if FRAME_MEMBER.fullmatch(k)), key=lambda k: int(k[1:-4]))
            if not names:
                continue
            pixels = torch.stack([view(load_rgb(Image.open(io.BytesIO(files[n])))) for n in names])
            feats = []
            for start in range(0, len(pixels), batch_size):
                with autocast(precision, device):
                    feats.append(encoder(pixels[start:start + batch_size].to(device)).float().cpu())
            writer.write({"__key__": key, "feats.npy": _npy(torch.cat(feats).numpy().astype(dtype))})
            frames += len(names)
    stats = {"shard": shard.name, "source": str(shard), "frames": frames, "dtype": dtype,
             "dim": int(encoder.num_features), "encoder": identity}
    atomic_write_json(out_dir / f"{shard.stem}_stats.json", stats)
    return stats


def cache_frames(dataset: str, root: str, encoder_cfg: EncoderConfig, out: str, batch_size: int = 64,
                 dtype: str = "float16", device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1,
                 precision: str = "auto") -> Dict[str, Any]:
    """This rank's share of every split's shards that are not finished yet; returns the encoder's identity."""
    info = resolve_frames(dataset, root)
    encoder, arch, source = create_encoder(encoder_cfg, 0)
    identity = encoder_identity(encoder, source, arch)
    device = device or torch.device("cpu")
    precision = resolve_precision(precision, device)
    configure_cuda(device)
    encoder.to(device).eval()
    view = frame_view(identity["img_size"])
    for split in SPLITS:
        out_dir = Path(out) / split
        out_dir.mkdir(parents=True, exist_ok=True)
        for shard in [Path(s) for s in info.shards(split)][rank::world_size]:
            if is_done(out_dir, str(shard)):
                check_identity(out_dir / f"{shard.stem}_stats.json", identity, out)
                continue
            stats = cache_shard(encoder, view, shard, out_dir, identity, device, precision, batch_size, dtype)
            log.info("%s/%s: %d frames", split, shard.name, stats["frames"])
    return identity


def check_identity(stats_file: Path, identity: Dict[str, Any], cache: str) -> None:
    recorded = json.loads(stats_file.read_text()).get("encoder")
    if recorded != identity:
        what = "; ".join(f"{k} {str((recorded or {}).get(k))[:16]} there, {str(identity[k])[:16]} here"
                         for k in identity if (recorded or {}).get(k) != identity[k])
        raise FrameCacheError(f"{cache} was made by another encoder ({stats_file.name}: {what}): make a new cache "
                              f"for this encoder with `python -m finetune.cache_frames ... --out NEW_DIR`")


def check_frame_cache(cache: str, info, identity: Dict[str, Any]) -> None:
    """Before a cached run trains: every shard of every split has finished features made by this encoder."""
    for split in SPLITS:
        shards = info.shards(split)
        missing = [Path(s).name for s in shards if not is_done(Path(cache) / split, s)]
        if missing:
            raise FrameCacheError(f"data.cache={cache} lacks features for {len(missing)} of {len(shards)} {split} "
                                  f"shards (e.g. {split}/{missing[0]}): run `python -m finetune.cache_frames "
                                  f"--dataset {info.name} --data {info.root} --checkpoint ... --out {cache}` (it "
                                  f"resumes, skipping finished shards)")
        for s in shards:
            check_identity(Path(cache) / split / f"{Path(s).stem}_stats.json", identity, cache)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True, help="the name shard-frames gave the shards")
    parser.add_argument("--data", required=True, help="the clip-chunk shards (with info.json)")
    parser.add_argument("--checkpoint", help="the encoder: a pretraining run, weights file or MAE .pth")
    parser.add_argument("--from-scratch", action="store_true", help="a randomly initialised encoder (tests)")
    parser.add_argument("--preset", default="vit_b16", help="architecture where the checkpoint does not say")
    parser.add_argument("--img-size", type=int, help="input size (default: the encoder's pretraining size)")
    parser.add_argument("--seed", type=int, default=0, help="seeds a --from-scratch encoder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64, help="frames per forward")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    args = parser.parse_args(argv)
    env = distributed.resolve_env()
    setup_logging(env.rank)

    def body() -> int:
        from runtime.seeding import seed_everything
        device = resolve_device(env, args.device, args.precision)
        seed_everything(args.seed)  # the same scratch weights as a temporal run with run.seed=SEED
        cfg = EncoderConfig(checkpoint=args.checkpoint, from_scratch=args.from_scratch, preset=args.preset,
                            img_size=args.img_size, drop_path=0.0)
        identity = cache_frames(args.dataset, args.data, cfg, args.out, args.batch_size, args.dtype, device,
                                env.rank, env.world_size, args.precision)
        log.info("frame features of %s by %s (%s) in %s", args.dataset, identity["source"],
                 identity["weights_sha256"][:12], args.out)
        return 0
    return with_one_line_errors(body, (DeviceError, FrameCacheError, FileNotFoundError, ValueError, KeyError))


if __name__ == "__main__":
    raise SystemExit(main())
