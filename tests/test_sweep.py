"""Ray Tune sweeps on a local Ray (127.0.0.1): 4 trials over 2 datasets, a failing trial retried then reported,
results.md / results.csv / the plot written; an unknown parameter is refused."""
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


def sweep_config(tmp_path, roots, space):
    cfg = {"output_dir": str(tmp_path / "sweep"), "datasets": roots,
           "base_config": str(REPO / "configs/finetune/tiny.yaml"),
           "base_overrides": ["encoder.from_scratch=true", "train.epochs=3", "data.num_workers=0",
                              "aug.auto_augment=null"],
           "search_space": space, "num_samples": 1,
           "scheduler": {"name": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
           "resources_per_trial": {"cpu": 1}, "max_failures": 1}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_two_datasets_with_a_failing_trial(two_datasets, tmp_path):
    # data.batch_size=0 makes a trial raise: it is retried once, then reported as failed
    path = sweep_config(tmp_path, two_datasets, {"data.batch_size": {"grid": [8, 0]}})
    assert sweep_main(["--config", str(path), "--num-cpus", "2"]) == 0
    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"Emotion6", "HECO"}
    by_status = {(r["dataset"], r["data.batch_size"]): r["status"] for r in rows}
    assert by_status == {("Emotion6", "8"): "completed", ("Emotion6", "0"): "failed",
                         ("HECO", "8"): "completed", ("HECO", "0"): "failed"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert all("ZeroDivisionError" in r["error"] or "division" in r["error"] for r in failed), failed
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


def test_unknown_parameter_is_refused(two_datasets, tmp_path, capsys):
    path = sweep_config(tmp_path, two_datasets, {"optim.learning_rate": {"loguniform": [1e-4, 1e-2]}})
    assert sweep_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "parameter 'optim.learning_rate' does not fit the fine-tuning config" in err
    assert "unknown key 'optim.learning_rate'" in err
