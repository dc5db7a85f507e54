"""Ray Tune sweeps on a local Ray (127.0.0.1): 4 trials over 2 datasets from a pretraining checkpoint named by a
path relative to the caller's directory, a failing trial retried then reported, results.md / results.csv / the plot
written; a sweep whose every trial fails exits 1 naming the reason; an unknown parameter or a value out of range is
refused before Ray starts."""
import csv
import json

import pytest
import yaml

from data_tools.folder import shard_folder
from data_tools.registry import REGISTRY
from data_tools.samples import ImageOptions
from finetune.sweep import main as sweep_main

from conftest import REPO
from image_data import make_class_tree
from pretrain_fixtures import pretraining_checkpoint


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data")
    roots = {}
    for name, n in (("Emotion6", 20), ("HECO", 12)):
        make_class_tree(root / name, REGISTRY[name].classes, per_class=n, size=36)
        shard_folder(name, str(root / name), str(root / f"{name}_shards"), shard_size=100, min_shards=1,
                     options=ImageOptions(detector="none"))
        roots[name] = str(root / f"{name}_shards")
    return roots


def sweep_config(tmp_path, roots, space, encoder="encoder.from_scratch=true"):
    cfg = {"output_dir": str(tmp_path / "sweep"), "datasets": roots,
           "base_config": str(REPO / "configs/finetune/tiny.yaml"),
           "base_overrides": [encoder, "train.epochs=3", "data.num_workers=0", "aug.auto_augment=null",
                              "debug.crash_rank=0"],
           "search_space": space, "num_samples": 1,
           "scheduler": {"name": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
           "resources_per_trial": {"cpu": 1}, "max_failures": 1}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_two_datasets_with_a_failing_trial(two_datasets, tmp_path, monkeypatch, capfd):
    # the encoder is a relative path, read from the caller's directory (Ray runs each trial in a directory of its
    # own); debug.crash_step=1 makes a trial raise: it is retried once, then reported as failed
    pretraining_checkpoint(tmp_path / "runs" / "pre")
    monkeypatch.chdir(tmp_path)
    path = sweep_config(tmp_path, two_datasets, {"debug.crash_step": {"grid": [None, 1]}},
                        encoder="encoder.checkpoint=runs/pre")
    assert sweep_main(["--config", str(path), "--num-cpus", "2"]) == 0
    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"Emotion6", "HECO"}
    by_status = {(r["dataset"], r["debug.crash_step"]): r["status"] for r in rows}
    assert by_status == {("Emotion6", ""): "completed", ("Emotion6", "1"): "failed",
                         ("HECO", ""): "completed", ("HECO", "1"): "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("debug.crash_step: rank 0 crashes at step 1" in r["error"] for r in failed), failed
    trial_meta = [json.loads(p.read_text()) for p in (out / "trials").glob("*/*/meta.json")]
    assert trial_meta and all(m["encoder_source"] == "pretrain" for m in trial_meta)
    # Ray's report of each failed try is one line, not its remote traceback
    err = capfd.readouterr().err
    assert "Trial task failed" in err and err.count("Traceback (most recent call last)") == 0
    ok = [r for r in rows if r["status"] == "completed"]
    assert all(int(r["epochs"]) == 3 and 0 <= float(r["test"]) <= 1 for r in ok)
    md = (out / "results.md").read_text()
    assert "| Emotion6 | top1 |" in md and "| HECO | top1 |" in md and md.count("failed") == 2
    assert (out / "val_curves.png").stat().st_size > 1000
    # the best trial's test number is the one its run wrote
    best = next(r for r in ok if r["dataset"] == "HECO")
    trial_metrics = list((out / "trials" / "HECO").glob("*/metrics.json"))
    assert len(trial_metrics) == 1
    assert float(best["test"]) == pytest.approx(json.loads(trial_metrics[0].read_text())["test"]["top1"])


def test_a_sweep_whose_every_trial_fails_exits_1_with_the_reason(two_datasets, tmp_path, capfd):
    path = sweep_config(tmp_path, two_datasets, {"debug.crash_step": {"grid": [1]}})
    assert sweep_main(["--config", str(path), "--num-cpus", "2", "--datasets", "HECO"]) == 1
    err = capfd.readouterr().err
    assert "every trial failed; the first (HECO" in err and "debug.crash_step: rank 0 crashes at step 1" in err


def test_unknown_parameter_is_refused(two_datasets, tmp_path, capsys, monkeypatch):
    path = sweep_config(tmp_path, two_datasets, {"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    assert sweep_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "parameter 'optim.learning_rate' value 0.0001 does not fit the fine-tuning config" in err
    assert "unknown key 'optim.learning_rate'" in err
    # every listed value is checked, not only the first
    path = sweep_config(tmp_path, two_datasets, {"data.batch_size": {"grid": [8, 0]}})
    assert sweep_main(["--config", str(path)]) == 2
    assert "key 'data.batch_size' = 0 is out of range (expected value >= 1)" in capsys.readouterr().err
    # a relative encoder path is read from the caller's directory, and must exist there
    monkeypatch.chdir(tmp_path)
    path = sweep_config(tmp_path, two_datasets, {}, encoder="encoder.checkpoint=runs/vit_l16")
    assert sweep_main(["--config", str(path)]) == 2
    assert f"encoder.checkpoint={tmp_path}/runs/vit_l16 does not exist" in capsys.readouterr().err


def test_a_temporal_sweep_runs_the_clip_job(tmp_path, capsys):
    """`job: temporal`: each trial is a temporal valence/arousal run; its test CCC is the one its run wrote."""
    from frame_data import clip_shards
    roots = {"toyva": str(clip_shards(tmp_path / "clips"))}
    cfg = {"output_dir": str(tmp_path / "sweep"), "datasets": roots, "job": "temporal",
           "base_config": str(REPO / "configs/temporal/tiny.yaml"),
           "base_overrides": ["encoder.from_scratch=true", "train.epochs=2", "temporal.shuffle_control=false"],
           "search_space": {"temporal.head": {"grid": ["per_frame", "transformer"]}}, "num_samples": 1,
           "scheduler": {"name": "fifo"}, "resources_per_trial": {"cpu": 1}, "max_failures": 0}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert sweep_main(["--config", str(path), "--num-cpus", "2"]) == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert sorted(r["temporal.head"] for r in rows) == ["per_frame", "transformer"]
    assert all(r["status"] == "completed" and int(r["epochs"]) == 2 for r in rows)
    for r in rows:
        (trial,) = [json.loads(p.read_text()) for p in (tmp_path / "sweep" / "trials" / "toyva").glob("*/metrics.json")
                    if json.loads(p.read_text())["head"] == r["temporal.head"]]
        assert float(r["test"]) == pytest.approx(trial["test"]["ccc"])
    assert "| toyva | ccc |" in (tmp_path / "sweep" / "results.md").read_text()
    # a key the temporal job does not have is refused before Ray starts
    cfg["search_space"] = {"aug.mixup": {"grid": [0.1]}}
    path.write_text(yaml.safe_dump(cfg))
    assert sweep_main(["--config", str(path)]) == 2
    assert "parameter 'aug.mixup' value 0.1 does not fit the temporal config" in capsys.readouterr().err
