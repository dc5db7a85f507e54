"""Small real-image shards, a tiny pretraining checkpoint and command lines shared by the pretraining tests."""
from pathlib import Path

import torch

from data_tools.folder import shard_folder
from data_tools.samples import ImageOptions
from pretrain.config import LossConfig, ModelConfig, TeacherConfig
from pretrain.teacher import teacher_embed_dim
from pretrain.model import UniEmoXPretrainer
from runtime.checkpoint import CheckpointStore
from runtime.config import config_to_dict

from conftest import TINY_CLIP
from image_data import make_class_tree


def make_pretrain_shards(root: Path, per_class: int = 40, shards: int = 8) -> str:
    """160 photo crops of 40 px in 8 shards (with sizes.json); returns the brace pattern of the train split."""
    make_class_tree(root / "src", ["amusement", "awe", "fear", "sadness"], per_class=per_class, size=40)
    shard_folder("toy", str(root / "src"), str(root / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=per_class * 4 // shards, min_shards=shards, options=ImageOptions(detector="none"))
    return str(root / "shards" / "train" / f"{{00000..{shards - 1:05d}}}.tar")


def pretrain_args(pattern: str, out: Path, *extra: str) -> list:
    """tiny config, batch 8 per rank -> 10 steps per epoch with 2 ranks, 2 epochs; an `extra` override replaces the
    default of its key (a key given twice is an error on the command line)."""
    keys = {"data.train": f"[{pattern}]", "run.output_dir": str(out), "data.batch_size": "8", "train.epochs": "2",
            "run.ckpt_every": "5", "run.log_every": "5", "train.image_every": "10", "optim.blr": "1e-3"}
    keys.update(o.split("=", 1) for o in extra)
    return ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml", *(f"{k}={v}" for k, v in keys.items())]


def pretraining_checkpoint(run_dir: Path) -> Path:
    """A pretraining run directory with one checkpoint of the tiny preset (random weights, seed 0): an encoder
    source for fine-tuning tests."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(preset="tiny")
    pre = UniEmoXPretrainer(model_cfg, LossConfig(paired=0, relational=0),
                            teacher_embed_dim(TeacherConfig(checkpoint="random", arch=TINY_CLIP)))
    cfg = {"model": config_to_dict(model_cfg), "teacher": {"arch": TINY_CLIP, "checkpoint": "random"}}
    CheckpointStore(run_dir / "checkpoints").save(3, {"model": pre.state_dict(), "step": 3, "config": cfg})
    return run_dir
