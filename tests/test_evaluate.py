"""Evaluate only: --eval of a fine-tuning run reproduces its recorded test figures, each sample scored once across
ranks, the error analysis and embeddings written and read back from TensorBoard."""
import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.config import FinetuneConfig
from finetune.data import patch_timm_posterize
from finetune.engine import Finetuning
from finetune.main import main as finetune_main
from runtime.config import load_config
from runtime.distributed import resolve_env

from conftest import REPO, run_torchrun
from image_data import emotion6_shards


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Emotion6-shaped shards (3 test shards, so two ranks share them) and a tiny fine-tuned run."""
    root = tmp_path_factory.mktemp("eval")
    emotion6_shards(root, per_class=14, shard_size=6, min_shards=3)
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml",
                      ["data.dataset=Emotion6", f"data.root={root / 'shards'}", f"run.output_dir={root / 'ft'}",
                       "encoder.from_scratch=true", "train.epochs=2", "data.num_workers=0", "data.batch_size=8"])
    patch_timm_posterize()
    Finetuning(cfg, resolve_env()).run()
    return root


def eval_args(root, out, checkpoint=None, dataset="Emotion6", *extra):
    return ["--eval", "--checkpoint", str(checkpoint or root / "ft"), "--dataset", dataset, "--data",
            str(root / "shards"), f"run.output_dir={out}", "data.num_workers=0", "data.batch_size=8",
            "encoder.preset=tiny", *extra]


def by_key(path):
    p = np.load(path)
    order = np.argsort(p["keys"])
    return p["keys"][order], p["outputs"][order], p["targets"][order]


def test_eval_reproduces_the_runs_recorded_test_figures(finetuned, tmp_path):
    out = tmp_path / "ev"
    assert finetune_main(eval_args(finetuned, out)) == 0
    recorded = json.loads((finetuned / "ft" / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert got["test"] == recorded["test"]  # top-1, top-3, macro-F1, per-class accuracy, confusion: all of them
    assert got["val"] == recorded["val"]
    assert set(recorded) - {"mode", "checkpoint"} <= set(got)  # fine-tuning's shape
    keys, outputs, targets = by_key(out / "predictions_test.npz")
    keys0, outputs0, targets0 = by_key(finetuned / "ft" / "predictions_test.npz")
    assert (keys == keys0).all() and (targets == targets0).all()
    assert np.abs(outputs - outputs0).max() == 0.0
    features = np.load(out / "predictions_test.npz")["features"]
    assert features.shape == (len(keys), 64)  # the tiny encoder's pooled width
    for name in ("confusion_test.csv", "confusion_test.png", "embeddings_pca.png"):
        assert (out / name).stat().st_size > 0
    wrong = int((outputs.argmax(1) != targets).sum())
    assert (out / "misclassified_test.png").is_file() == (wrong > 0)
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert "test/confusion" in events.Tags()["images"]
    assert events.Scalars("test/top1")[0].value == pytest.approx(recorded["test"]["top1"])
    projector = (out / "tb" / "projector_config.pbtxt").read_text()
    assert "test_embeddings" in projector and "sprite" in projector
    meta_tsv = next((out / "tb").rglob("metadata.tsv")).read_text().splitlines()
    assert meta_tsv[0].split("\t") == ["label", "predicted", "key"] and len(meta_tsv) == len(keys) + 1


def test_eval_on_two_ranks_scores_every_sample_once(finetuned, tmp_path):
    out = tmp_path / "ev2"
    run_torchrun(2, "finetune/main.py", *eval_args(finetuned, out))
    info = json.loads((finetuned / "shards" / "info.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert got["world_size"] == 2
    for split in ("val", "test"):
        keys = np.load(out / f"predictions_{split}.npz")["keys"]
        assert len(keys) == len(set(keys)) == info["splits"][split]["samples"] == got[split]["n"]
    recorded = json.loads((finetuned / "ft" / "metrics.json").read_text())
    assert got["test"]["confusion"] == recorded["test"]["confusion"]


def test_eval_refuses_a_classifier_of_another_dataset_and_a_training_runs_directory(finetuned, tmp_path, capsys):
    from data_tools.folder import shard_folder
    from data_tools.samples import ImageOptions
    from image_data import make_class_tree
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=6, size=32)
    shard_folder("two", str(tmp_path / "src"), str(tmp_path / "two"), generic=True, ratios=(0.5, 0.25, 0.25),
                 min_shards=1, options=ImageOptions(detector="none"))
    args = eval_args(finetuned, tmp_path / "ev", None, "two")
    args[args.index("--data") + 1] = str(tmp_path / "two")
    assert finetune_main(args) == 3  # bad input
    assert "is it a classifier of two?" in capsys.readouterr().err
    assert finetune_main(eval_args(finetuned, finetuned / "ft")) == 3  # would overwrite the run's own results
    assert "train.mode" in capsys.readouterr().err
    assert finetune_main(eval_args(finetuned, finetuned / "ft", None, "Emotion6", "run.resume=none")) == 3
    assert "holds the results of a finetune run" in capsys.readouterr().err
    assert json.loads((finetuned / "ft" / "metrics.json").read_text()).get("mode") is None
