"""The paper's table from runs over datasets and seeds: mean +- sd as numpy computes them, failed and missing runs
shown as such, markdown, JSON and a bar plot."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from finetune.report import main as report_main, paper_table


def fake_run(path, dataset, seed, top1=None, primary="top1"):
    """A run directory as fine-tuning leaves it: config.yaml always, metrics.json only when it finished."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"run": {"seed": seed, "output_dir": str(path)},
                                                      "data": {"dataset": dataset}}))
    if top1 is not None:
        (path / "metrics.json").write_text(json.dumps({
            "dataset": dataset, "primary_metric": primary, "encoder_source": "pretrain", "stopped": False,
            "val": {primary: top1}, "test": {primary: top1}}))
    return str(path)


def test_the_table_is_mean_and_sd_over_seeds_with_failures_and_gaps_shown(tmp_path):
    values = {("uniemox", "FI"): [0.61, 0.64, 0.66], ("uniemox", "EMOTIC"): [0.27, 0.29],
              ("scratch", "FI"): [0.52, 0.55]}
    runs = []
    for (method, dataset), vs in values.items():
        for seed, v in enumerate(vs):
            runs.append(fake_run(tmp_path / dataset / f"{method}_s{seed}", dataset, seed, v,
                                 "mAP" if dataset == "EMOTIC" else "top1"))
    runs.append(fake_run(tmp_path / "FI" / "scratch_s2", "FI", 2))  # crashed: no metrics.json
    table = paper_table(runs)
    assert table["methods"] == ["uniemox", "scratch"] and table["datasets"] == ["FI", "EMOTIC"]
    for (method, dataset), vs in values.items():
        cell = table["cells"][method][dataset]
        assert cell["mean"] == pytest.approx(np.mean(vs)) and cell["sd"] == pytest.approx(np.std(vs, ddof=1))
        assert cell["n"] == len(vs) and cell["seeds"] == list(range(len(vs)))
    assert table["cells"]["scratch"]["FI"]["failed"] == 1
    assert table["cells"]["scratch"]["EMOTIC"] == {"n": 0, "failed": 0, "seeds": [], "runs": [], "metric": None}
    md, js, png = tmp_path / "t.md", tmp_path / "t.json", tmp_path / "t.png"
    assert report_main(["--table", *runs, "--out", str(md), "--json", str(js), "--plot", str(png)]) == 0
    lines = md.read_text().splitlines()
    assert lines[0] == "| method | FI (top-1 %) | EMOTIC (mAP %) |"
    sd = np.std([0.61, 0.64, 0.66], ddof=1) * 100
    assert lines[2] == f"| uniemox | 63.7 ± {sd:.1f} (n=3) | 28.0 ± 1.4 (n=2) |"
    assert lines[3] == "| scratch | 53.5 ± 2.1 (n=2, 1 failed) | missing |"
    assert "scratch_s2: failed (" in md.read_text()
    assert json.loads(js.read_text())["cells"]["uniemox"]["FI"]["n"] == 3
    assert Image.open(png).size[0] > 100


def test_a_method_whose_every_run_failed_shows_no_number(tmp_path):
    runs = [fake_run(tmp_path / "a_s0", "FI", 0, 0.5), fake_run(tmp_path / "b_s0", "FI", 0),
            fake_run(tmp_path / "b_s1", "FI", 1)]
    out = tmp_path / "t.md"
    assert report_main(["--table", *runs, "--out", str(out)]) == 0
    assert "| b | failed (2) |" in out.read_text()
    named = paper_table([f"mine={runs[0]}", runs[0]])  # the same run twice counts once
    assert named["methods"] == ["mine"] and named["cells"]["mine"]["FI"]["n"] == 1
    assert named["cells"]["mine"]["FI"]["sd"] is None
    tune_style = fake_run(tmp_path / "blr=1e-3_s0", "fi", 0)  # a Ray Tune-style name; dataset typed in lower case
    mixed = paper_table([f"ours={tune_style}", f"ours={fake_run(tmp_path / 'ok_s1', 'FI', 1, 0.7)}"])
    assert mixed["datasets"] == ["FI"] and mixed["cells"]["ours"]["FI"]["failed"] == 1
