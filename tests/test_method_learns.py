"""The method learns: on real labelled images (Fashion-MNIST), an encoder pretrained with MAE + distillation from
the real offline teacher (its embeddings cached in sidecar shards) gives a better linear probe than a random one."""
from pathlib import Path

import pytest

from runtime.distributed import resolve_env
from finetune.config import FinetuneConfig
from finetune.linear_probe import LinearProbe
from pretrain.cache_teacher import cache_teacher
from pretrain.config import PretrainConfig
from pretrain.engine import Pretraining
from pretrain.teacher import make_teacher
from runtime.config import load_config

from conftest import REPO
from image_data import FMNIST, fashion_shards

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed "
                                                            "(make test installs it)")


def linear_probe(shards: Path, out: Path, *encoder: str) -> float:
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/demo.yaml",
                      ["data.dataset=fashion", f"data.root={shards}", f"run.output_dir={out}", "data.num_workers=0",
                       "train.mode=linear_probe", *encoder])
    return LinearProbe(cfg, resolve_env()).run()["test"]["top1"]


def test_distilled_encoder_beats_a_random_one_in_a_linear_probe(tmp_path):
    shards = fashion_shards(tmp_path)
    train = str(shards / "train" / "{00000..00005}.tar")
    overrides = [f"data.train=[{train}]", f"run.output_dir={tmp_path / 'pre'}", "data.num_workers=1",
                 "train.epochs=10", "optim.warmup_epochs=1"]
    teacher = load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml", overrides).teacher
    cache_teacher([train], make_teacher(teacher), str(tmp_path / "cache"), dtype="float32")
    pretrain_cfg = load_config(PretrainConfig, REPO / "configs/pretrain/demo.yaml",
                               [*overrides, f"teacher.cache={tmp_path / 'cache'}"])
    result = Pretraining(pretrain_cfg, resolve_env()).run()
    assert result["final_step"] == 10 * (600 // 32)
    distilled = linear_probe(shards, tmp_path / "probe_distilled", f"encoder.checkpoint={tmp_path / 'pre'}")
    random_init = linear_probe(shards, tmp_path / "probe_random", "encoder.from_scratch=true")
    print(f"linear probe test top-1: distilled {distilled:.3f}, random encoder {random_init:.3f}")
    assert distilled >= random_init + 0.05, (distilled, random_init)


def test_demo_on_a_folder_writes_every_row(tmp_path):
    """`make demo DEMO_SRC=DIR`: every step runs on a user's train/val/test tree; results.json has one row per run
    and each row agrees with the run directory it came from (one epoch each: plumbing, not accuracy)."""
    import json
    import subprocess
    import sys

    from finetune.demo import RUNS
    from image_data import make_class_tree
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        make_class_tree(tmp_path / "src" / split, ["calm", "storm", "dusk"], per_class=n, size=40)
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "finetune.demo", "--src", str(tmp_path / "src"), "--out", str(out),
                           "--nproc", "1", "--pretrain-epochs", "1", "--finetune-epochs", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in result["runs"]] == list(RUNS) and result["seconds"] > 0
    for row in result["runs"]:
        metrics_file = next(p for p in (out / row["name"] / "metrics.json", out / row["name"] / "zeroshot.json")
                            if p.is_file())
        metrics = json.loads(metrics_file.read_text())
        assert row["test_top1"] == metrics["test"]["top1"] and row["val_top1"] == metrics["val"]["top1"]
        assert metrics["test"]["n"] == 12
    assert "| zeroshot_student |" in done.stdout
    again = subprocess.run([sys.executable, "-m", "finetune.demo", "--src", str(tmp_path / "nowhere"), "--out",
                            str(tmp_path / "demo2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "needs train/, val/ and test/ sub-folders" in again.stderr


def test_demo_budget_is_images_seen_whatever_the_folder_size(tmp_path):
    """The demo turns its image budgets into epochs over the training split's size (info.json), so a folder twice
    as large gets half the epochs; epochs given on the command line win."""
    import json

    from finetune.demo import Demo
    # the figures docs/demo.md states: 24 and 15 epochs of 5,000 images, 40 and 25 of 3,000
    for train_images, pretrain_epochs, finetune_epochs in ((3000, "40.0", "25"), (5000, "24.0", "15"),
                                                           (7000, "17.14", "11")):
        (tmp_path / "info.json").write_text(json.dumps({"splits": {"train": {"samples": train_images}}}))
        assert Demo(tmp_path, 2, 3, None, None).budgets(tmp_path) == (
            ["run.seed=3", f"train.epochs={pretrain_epochs}"], ["run.seed=3", f"train.epochs={finetune_epochs}"])
    assert Demo(tmp_path, 2, 0, 1.5, 2).budgets(tmp_path) == (["run.seed=0", "train.epochs=1.5"],
                                                              ["run.seed=0", "train.epochs=2"])
