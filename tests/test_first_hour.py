"""What a new user meets in the first hour, at the command line: the exit code and the message of each tool for an
unquoted brace pattern, Ctrl-C, --help, a reused run directory, out-of-range values, empty or re-optioned shard
sources, a linear probe's outputs, one-line errors and the smaller points (numbered as in the issue that found them)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from data_tools.__main__ import main as data_tools_main
from finetune.export import main as export_main
from finetune.main import main as finetune_main
from finetune.predict import main as predict_main
from pretrain.main import main as pretrain_main
from runtime.guard import StopRequest

from conftest import REPO, clean_env, torchrun_cmd
from image_data import E6, bad_files, emotion6_shards, make_class_tree
from pretrain_fixtures import make_pretrain_shards, pretraining_checkpoint

TINY = str(REPO / "configs/pretrain/tiny.yaml")
FT_TINY = str(REPO / "configs/finetune/tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    return {"root": root, "pattern": make_pretrain_shards(root / "pre", per_class=8, shards=4),
            "e6": emotion6_shards(root / "e6", per_class=12, shard_size=100, min_shards=1),
            "encoder": pretraining_checkpoint(root / "encoder")}


def pretrain_cli(pattern, out, *extra):
    """The tiny pretraining command line; `extra` overrides replace the defaults of the same key."""
    keys = {"data.train": f"[{pattern}]", "run.output_dir": str(out), "data.batch_size": "4", "data.num_workers": "0",
            "train.epochs": "1", "run.log_every": "2"}
    keys.update(o.split("=", 1) for o in extra)
    return ["--config", TINY, *(f"{k}={v}" for k, v in keys.items())]


def finetune_cli(data, out, *extra):
    return ["--config", FT_TINY, "--dataset", "Emotion6", "--data", str(data["e6"]), f"run.output_dir={out}",
            "train.epochs=1", "data.num_workers=0", "data.batch_size=8", *extra]


def one_line(err: str) -> bool:
    return "Traceback" not in err


# 1
def test_01_an_unquoted_brace_pattern_is_refused_naming_both_values(data, tmp_path, capfd):
    words = [f"data.train=[{data['pattern'].split('{')[0]}0000{i}.tar]" for i in range(2)]  # what bash makes of it
    assert pretrain_main(["--config", TINY, *words, f"run.output_dir={tmp_path / 'a'}"]) == 2
    err = capfd.readouterr().err
    assert "key 'data.train' is given more than once" in err and "00000.tar" in err and "00001.tar" in err
    assert "quote it" in err and not (tmp_path / "a").exists()
    # a directory where shards are expected: answered with its brace form, which then works as data.train
    shard_dir = data["pattern"].rsplit("/", 1)[0]
    assert pretrain_main(pretrain_cli(shard_dir, tmp_path / "b")) == 3
    err = capfd.readouterr().err
    assert f"data.train='[{shard_dir}/{{00000..00003}}.tar]'" in err and one_line(err)
    # the examples in the configs' headers quote their patterns
    for name in ("tiny.yaml", "demo.yaml"):
        examples = [line for line in (REPO / "configs/pretrain" / name).read_text().splitlines()
                    if line.startswith("#") and "data.train=" in line]
        assert examples and all("'data.train=[" in line for line in examples), examples


# 3
def wait_for(proc, text: str, lines: list) -> None:
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError("".join(lines[-30:]))


def test_03_ctrl_c_checkpoints_then_exits_130_and_a_second_stops_at_once(data, tmp_path):
    args = [*pretrain_cli(data["pattern"], tmp_path / "run", "train.epochs=100", "run.ckpt_every=1000",
                          "run.log_every=5", "debug.step_sleep_s=0.2")]
    # torchrun in a terminal: Ctrl-C reaches the launcher and every rank (and the launcher passes it on again)
    proc = subprocess.Popen(torchrun_cmd(2, "pretrain/main.py", *args), cwd=REPO, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    wait_for(proc, "step 5 ", lines)
    os.killpg(proc.pid, signal.SIGINT)
    text = "".join(lines) + proc.communicate(timeout=120)[0]
    assert "press Ctrl-C again to stop at once" in text
    assert re.search(r"pretraining stopped by SIGINT at step (\d+) after saving a checkpoint", text)
    step = int(re.search(r"stopped by SIGINT at step (\d+)", text).group(1))
    assert step % 5 == 0 and (tmp_path / "run" / "checkpoints" / f"step_{step:09d}").is_dir()
    assert "pretraining failed" not in text and "KeyboardInterrupt" not in text
    # one process, two presses: the second stops at once, 130, one line, no new checkpoint
    args = pretrain_cli(data["pattern"], tmp_path / "run", "train.epochs=100", "run.ckpt_every=1000",
                        "run.log_every=20", "debug.step_sleep_s=0.5")
    proc = subprocess.Popen([sys.executable, "pretrain/main.py", *args], cwd=REPO,
                            env=clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    wait_for(proc, "training steps", lines)
    time.sleep(1.5)  # past the run's first step (a sync point)
    proc.send_signal(signal.SIGINT)
    time.sleep(StopRequest.SIGINT_ECHO_S + 0.5)
    proc.send_signal(signal.SIGINT)
    text = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted by a second Ctrl-C: stopped without a checkpoint" in text and one_line(text)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [f"step_{step:09d}"]


def test_03_ctrl_c_once_in_one_process_exits_130_after_its_checkpoint(data, tmp_path):
    args = pretrain_cli(data["pattern"], tmp_path / "run", "train.epochs=100", "run.ckpt_every=1000",
                        "run.log_every=3", "debug.step_sleep_s=0.2")
    proc = subprocess.Popen([sys.executable, "pretrain/main.py", *args], cwd=REPO, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    wait_for(proc, "step 3 ", lines)
    proc.send_signal(signal.SIGINT)
    text = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and one_line(text), text[-3000:]
    step = int(re.search(r"stopped by SIGINT at step (\d+)", text).group(1))
    assert (tmp_path / "run" / "checkpoints" / f"step_{step:09d}").is_dir()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["stopped_by_signal"] == "SIGINT"


# 4
@pytest.mark.parametrize("main", [pretrain_main, finetune_main,
                                  pytest.param("adapt", id="adapt_teacher")])
def test_04_help_exits_0_lists_config_overrides_and_defaults(main, capsys):
    if main == "adapt":
        from finetune.adapt_teacher import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "key=value" in out and "run.output_dir" in out and "required" in out
    assert re.search(r"run\.log_every\s+10\n", out)
    assert main(["--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_04_help_as_a_script_and_a_usage_error_print_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "finetune.main", "--help"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--dataset DATASET     the same as data.dataset=..." in proc.stdout
    assert re.search(r"encoder\.preset\s+'vit_b16'\n", proc.stdout) and one_line(proc.stderr)
    proc = subprocess.run([sys.executable, "pretrain/main.py", "--bogus"], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and one_line(proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "data_tools", "shard-folder", "--help"], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "(default: hog+face)" in proc.stdout


# 6
def test_06_a_run_directory_that_holds_another_run_is_refused_before_anything_is_written(data, tmp_path, capfd):
    run = tmp_path / "ft"
    assert finetune_main(finetune_cli(data, run, "--from-scratch")) == 0
    saved = {name: (run / name).read_bytes() for name in ("config.yaml", "meta.json", "metrics.json")}
    capfd.readouterr()
    # the same run again: it says it is complete
    assert finetune_main(finetune_cli(data, run, "--from-scratch")) == 0
    assert "fine-tuning in %s is already complete" % run in capfd.readouterr().err
    assert json.loads((run / "meta.json").read_text())["encoder_source"] == "scratch"
    # from a pretraining checkpoint into the from-scratch run's directory: refused, nothing rewritten
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "meta.json", "metrics.json")}
    assert finetune_main(finetune_cli(data, run, "--checkpoint", str(data["encoder"]))) == 3
    err = capfd.readouterr().err
    assert f"{run} holds another run" in err and "(encoder.from_scratch): True there, False now" in err
    assert "--checkpoint (encoder.checkpoint): None there" in err and one_line(err)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert yaml.safe_load(saved["config.yaml"])["encoder"]["from_scratch"] is True
    # a linear probe into the fine-tuning run's directory: refused the same way
    assert finetune_main(finetune_cli(data, run, "--from-scratch", "--linear-probe")) == 3
    assert "--linear-probe (train.mode): 'finetune' there, 'linear_probe' now" in capfd.readouterr().err
    assert {name: (run / name).read_bytes() for name in before} == before
    # pretraining with another model into a finished run's directory: refused the same way
    pre = tmp_path / "pre"
    assert pretrain_main(pretrain_cli(data["pattern"], pre)) == 0
    before = {name: (pre / name).read_bytes() for name in ("config.yaml", "meta.json", "result.json")}
    assert pretrain_main(pretrain_cli(data["pattern"], pre, "model.depth=3")) == 3
    err = capfd.readouterr().err
    assert "model.depth: None there, 3 now" in err and one_line(err)
    assert {name: (pre / name).read_bytes() for name in before} == before


# 9
@pytest.mark.parametrize("override,expected", [
    ("model.mask_ratio=1.5", "key 'model.mask_ratio' = 1.5 is out of range (expected 0 < value < 1)"),
    ("model.mask_ratio=1.0", "key 'model.mask_ratio' = 1.0 is out of range"),
    ("model.mask_ratio=0.0", "key 'model.mask_ratio' = 0.0 is out of range"),
    ("model.fusion=attention", "model.fusion='attention' is not a fusion; choose one of sum_ln_elu, "),
    ("data.batch_size=0", "key 'data.batch_size' = 0 is out of range (expected value >= 1)"),
    ("optim.betas=[0.9,1.5]", "key 'optim.betas' = 1.5 is out of range (expected 0 <= value < 1)"),
])
def test_09_values_out_of_range_are_config_errors(data, tmp_path, capfd, override, expected):
    assert pretrain_main(pretrain_cli(data["pattern"], tmp_path / "r", override)) == 2
    err = capfd.readouterr().err
    assert expected in err and not (tmp_path / "r").exists()


def test_09_every_fusion_that_exists_is_a_valid_model_fusion(tmp_path):
    from pretrain.config import PretrainConfig
    from pretrain.fusion import FUSIONS
    from runtime.config import load_config
    for name in FUSIONS:  # the registry is the one list of names
        cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [
            "data.train=[x.tar]", f"run.output_dir={tmp_path}", f"model.fusion={name}"])
        assert cfg.model.fusion == name


def test_09_and_10_shard_folder_refuses_bad_ratios_and_a_folder_without_classes(tmp_path, capsys):
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=3, size=24)
    args = ["shard-folder", "toy", str(tmp_path / "src"), "--generic", "--out", str(tmp_path / "out"),
            "--detector", "none"]
    assert data_tools_main([*args, "--ratios", "0.8", "0.3", "0.1"]) == 2
    assert "--ratios 0.8 0.3 0.1: expected three non-negative fractions (train val test) that sum to 1, got a sum " \
           "of 1.2" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / "flat" / name).write_bytes((tmp_path / "src" / "a" / "a_000.jpg").read_bytes())
    assert data_tools_main(["shard-folder", "toy", str(tmp_path / "flat"), "--generic", "--out",
                            str(tmp_path / "out2"), "--detector", "none"]) == 2
    assert f"--generic: {tmp_path / 'flat'} has no class sub-folders" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# 8 and 12
def test_08_and_12_resharding_with_other_image_options_rewrites_and_says_so(tmp_path, capfd):
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=6, size=48)
    args = ["shard-folder", "toy", str(tmp_path / "src"), "--generic", "--out", str(tmp_path / "out"),
            "--detector", "none", "--min-shards", "2", "--workers", "1"]
    assert data_tools_main(args) == 0
    err = capfd.readouterr().err
    assert "person detector none" in err
    assert re.search(r"toy/train: shard 2 of 2 written \(\d+ samples, 0 failed so far\), [\d.]+ items/s, about", err)
    first = json.loads((tmp_path / "out/train/00000_stats.json").read_text())
    assert data_tools_main(args) == 0
    assert "2 of 2 shards already complete, skipped" in capfd.readouterr().err
    assert data_tools_main([*args, "--max-side", "32"]) == 0
    assert "shard(s) were written with other image options (max_side 512 -> 32): rewriting them" in \
        capfd.readouterr().err
    again = json.loads((tmp_path / "out/train/00000_stats.json").read_text())
    assert again["options"]["max_side"] == 32 and again["plan"] != first["plan"]
    import tarfile
    with tarfile.open(tmp_path / "out/train/00000.tar") as tar:
        record = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert max(record["width"], record["height"]) == 32
    assert json.loads((tmp_path / "out/info.json").read_text())["image"]["max_side"] == 32


# 11
def test_11_a_linear_probe_keeps_its_head_and_tensorboard(data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "probe"
    assert finetune_main(finetune_cli(data, run, "--linear-probe", "--checkpoint", str(data["encoder"]),
                                      "train.probe_epochs=5")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tb")).Reload()
    assert events.Scalars("val/top1")[0].value == pytest.approx(metrics["val"]["top1"])
    assert events.Scalars("test/top1")[0].value == pytest.approx(metrics["test"]["top1"])
    assert len([t for t in events.Tags()["scalars"] if t.startswith("probe/val_top1_lr_")]) == 5
    images = tmp_path / "images"
    make_class_tree(images, E6[:2], per_class=2, size=40)
    capsys.readouterr()
    assert predict_main(["--checkpoint", str(run), str(images), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" and set(r["probabilities"]) == set(E6) for r in rows)
    assert export_main([str(run), "--out", str(tmp_path / "probe.safetensors")]) == 0
    from finetune.predict import Predictor
    import torch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(Predictor(str(run)).model(x), Predictor(str(tmp_path / "probe.safetensors")).model(x))
        assert Predictor(str(run)).model.head.weight.abs().sum() > 0


# 14
def test_14_expected_errors_are_one_line_and_name_flags_as_typed(data, tmp_path, capfd):
    assert pretrain_main(pretrain_cli(data["pattern"], tmp_path / "a", f"teacher.checkpoint={tmp_path}/no.pt")) == 3
    err = capfd.readouterr().err
    assert f"TeacherError: teacher checkpoint not found: {tmp_path}/no.pt" in err and one_line(err)
    assert export_main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capfd.readouterr().err
    assert err.strip() == f"error: encoder checkpoint not found: {tmp_path / 'nope'}"
    assert finetune_main(["--config", FT_TINY, "--dataset", "Emotion6", "--data", str(tmp_path / "nope"),
                          f"run.output_dir={tmp_path / 'b'}", "--from-scratch"]) == 3
    err = capfd.readouterr().err
    assert f"--data (data.root) does not exist: {tmp_path / 'nope'}" in err and one_line(err)
    # plain reading with fewer shards than readers: one line, before the model is built, in the keys one types
    assert pretrain_main(pretrain_cli(data["pattern"], tmp_path / "c", "data.resampled=false",
                                      "data.num_workers=8")) == 3
    err = capfd.readouterr().err
    assert "data.train: 4 shard(s) cannot feed 8 loader worker(s) x 1 rank(s) when data.resampled=false" in err
    assert "set data.resampled=true" in err and one_line(err) and "training steps" not in err


# 15
def test_15_verify_names_where_skipped_inputs_are_listed(tmp_path, capsys):
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=3, size=32)
    for name, payload in bad_files().items():
        (tmp_path / "src" / "a" / name).write_bytes(payload)
    assert data_tools_main(["shard-folder", "toy", str(tmp_path / "src"), "--generic", "--out",
                            str(tmp_path / "out"), "--detector", "none", "--ratios", "1", "0", "0"]) == 0
    capsys.readouterr()
    assert data_tools_main(["verify", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "no problems found in the shards" in out
    match = re.search(r"(\d+) input\(s\) were skipped when the shards were written \((.*)\); each is listed with "
                      r"its reason \(status \"failed\"\) in (.*)$", out, re.M)
    broken = {"truncated.jpg", "empty.jpg", "page.jpg"}  # (huge.png is below the pixel limit: a good sample)
    assert match and int(match.group(1)) == len(broken), out
    assert match.group(2) == "decode_error 1, empty 1, not_an_image 1"
    listed = [json.loads(line) for path in match.group(3).split(", ") for line in open(path)]
    failed = [r for r in listed if r["status"] == "failed"]
    assert {r["source"].split("/")[-1] for r in failed} == broken
    assert all(r["error"].count(r["reason"]) == 1 for r in failed)  # no reason said twice


def test_15_smaller_points():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert {"shards/", "cache/", "runs/"} <= set(ignored)
    data_md = (REPO / "docs/data.md").read_text()
    assert "annotation/" in data_md and '"emotion"' in data_md and "seconds per photo" in data_md
    from data_tools.text import describe
    assert describe("ankle_boot") == "The overall emotion conveyed is ankle boot."


def test_15_idx_to_folder_keeps_a_subset_of_labels(tmp_path, capsys):
    import gzip
    import struct

    import numpy as np
    x = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 6, 4, 4) + x.tobytes())
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 6) + y.tobytes())
    args = ["idx-to-folder", str(tmp_path / "x.gz"), str(tmp_path / "y.gz"), "--out", str(tmp_path / "out")]
    assert data_tools_main([*args, "--labels", "0", "2", "--classes", "zero", "two"]) == 0
    assert json.loads(capsys.readouterr().out) == {"zero": 2, "two": 2}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["two", "zero"]
    assert data_tools_main([*args, "--classes", "zero", "one"]) == 2
    assert "--classes: 2 name(s) for 3 labels" in capsys.readouterr().err
