"""Small real-image shards and command lines shared by the pretraining tests."""
from pathlib import Path

from data_tools.folder import shard_folder
from data_tools.samples import ImageOptions

from image_data import make_class_tree


def make_pretrain_shards(root: Path, per_class: int = 40, shards: int = 8) -> str:
    """160 photo crops of 40 px in 8 shards (with sizes.json); returns the brace pattern of the train split."""
    make_class_tree(root / "src", ["amusement", "awe", "fear", "sadness"], per_class=per_class, size=40)
    shard_folder("toy", str(root / "src"), str(root / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=per_class * 4 // shards, min_shards=shards, options=ImageOptions(detector="none"))
    return str(root / "shards" / "train" / f"{{00000..{shards - 1:05d}}}.tar")


def pretrain_args(pattern: str, out: Path, *extra: str) -> list:
    """tiny config, batch 8 per rank -> 10 steps per epoch with 2 ranks, 2 epochs."""
    return ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml", f"data.train=[{pattern}]",
            f"run.output_dir={out}", "data.batch_size=8", "train.epochs=2", "run.ckpt_every=5", "run.log_every=5",
            "train.image_every=10", "optim.blr=1e-3", *extra]
