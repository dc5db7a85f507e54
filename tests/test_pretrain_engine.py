"""The pretraining job under torchrun on CPU: DDP and DeepSpeed ZeRO-1/2, kill -9 and SIGTERM resume, NaN policy,
crashing ranks, bad data, TensorBoard read back."""
import json
import re
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runtime.checkpoint import CheckpointStore, load_checkpoint

from conftest import REPO, clean_env, kill_tree, run_torchrun, torchrun_cmd
from pretrain_fixtures import make_pretrain_shards, pretrain_args


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp("pretrain_data"))


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun(2, *pretrain_args(shards, out))
    return out


def result(out):
    return json.loads((out / "result.json").read_text())


def test_ddp_two_ranks_identical_weights(ddp_run):
    r = result(ddp_run)
    assert r["final_step"] == r["total_steps"] == 20 and r["world_size"] == 2 and r["strategy"] == "ddp"
    assert r["ranks_in_sync"] and len(set(r["param_checksums"])) == 1
    state = load_checkpoint(ddp_run)
    assert state["step"] == 20 and state["samples_seen"] == 20 * 8 * 2
    assert state["data"] == {"seed": 0, "epoch": 2, "step_in_epoch": 0}
    # the exported weights equal the final checkpoint's, and say what architecture they are
    with safe_open(str(ddp_run / "weights.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["arch"])["embed_dim"] == 64 and f.metadata()["format"] == "uniemox-pretrain"
        for key in ("mae.blocks.0.attn.qkv.weight", "fusion.linear.weight", "mae.decoder_pred.bias"):
            assert torch.equal(f.get_tensor(key), state["model"][key])
    assert not any(k.startswith("teacher") for k in state["model"])


def test_a_run_resumed_at_an_epoch_boundary_ends_with_the_same_weights(shards, ddp_run, tmp_path):
    """Crash after step 10 (an epoch's end), rerun: the data, masks and augmentations drawn after the resume are the
    uninterrupted run's, so the final weights are bit-identical (the FLOP count's forward once drew masks from the
    global RNG at the first step of every start, and a resumed run drifted)."""
    out = tmp_path / "resumed"
    crashed = run_torchrun(2, *pretrain_args(shards, out, "debug.crash_step=11"), check=False)
    assert crashed.returncode != 0 and load_checkpoint(out)["step"] == 10
    run_torchrun(2, *pretrain_args(shards, out))
    assert result(out)["resumed_from_step"] == 10 and result(out)["final_step"] == 20
    from safetensors.torch import load_file
    a, b = load_file(str(ddp_run / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_scalars_and_reconstructions(ddp_run):
    acc = EventAccumulator(str(ddp_run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/loss_mae", "train/loss_paired", "train/loss_relational", "train/lr",
                "train/grad_norm", "train/samples_seen", "train/corrupt_samples", "perf/img_per_s",
                "perf/data_wait_share"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.value for e in acc.Scalars("train/samples_seen")] == [80, 160, 240, 320]
    total = [e.value for e in acc.Scalars("train/loss")]
    terms = [sum(vals) for vals in zip(*(
        [e.value for e in acc.Scalars(f"train/loss_{k}")] for k in ("mae", "paired", "relational")))]
    assert total == pytest.approx(terms, rel=1e-5)  # all weights 1: the total is the sum of the terms
    images = acc.Images("mae/reconstruction")
    assert [i.step for i in images] == [10, 20] and images[0].width == 3 * 33 + 1 and images[0].height > 8 * 32
    # the same windows, one JSON line each, in RUN/metrics.jsonl
    lines = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert [line["train/loss"] for line in lines] == pytest.approx(total, rel=1e-6)
    assert [line["train/samples_seen"] for line in lines] == [80, 160, 240, 320]
    # result.json: the whole history's summary, and the last window
    summary = json.loads((ddp_run / "result.json").read_text())
    assert summary["history"]["train/loss"] == pytest.approx(
        {"count": 4, "first": total[0], "last": total[-1], "min": min(total), "max": max(total),
         "mean": sum(total) / 4}, rel=1e-6)
    assert summary["last_window"]["step"] == 20 and summary["last_window"]["train/loss"] == pytest.approx(total[-1])


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero(shards, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    run_torchrun(2, *pretrain_args(shards, out, "train.strategy=deepspeed",
                                   f"train.deepspeed_config=configs/deepspeed/zero{stage}.json", "train.epochs=1"))
    r = result(out)
    assert r["final_step"] == 10 and r["strategy"] == "deepspeed" and r["ranks_in_sync"]
    state = load_checkpoint(out)
    assert state["strategy"] == "deepspeed" and state["zero_stage"] == stage and state["world_size"] == 2
    ds_dir = CheckpointStore(out / "checkpoints").latest() / "deepspeed"
    assert len(list(ds_dir.glob("*optim_states.pt"))) == 2  # one ZeRO shard per rank
    # the same run resumed on one rank is refused with advice
    proc = run_torchrun(1, *pretrain_args(shards, out, "train.strategy=deepspeed", "train.epochs=2",
                                          f"train.deepspeed_config=configs/deepspeed/zero{stage}.json"), check=False)
    assert proc.returncode != 0
    assert "holds DeepSpeed ZeRO shards for 2 ranks; this run has 1" in proc.stderr + proc.stdout
    if stage == 2:  # resumed on the same world size, it continues to the end
        run_torchrun(2, *pretrain_args(shards, out, "train.strategy=deepspeed", "train.epochs=2",
                                       "train.deepspeed_config=configs/deepspeed/zero2.json"))
        assert result(out)["resumed_from_step"] == 10 and result(out)["final_step"] == 20


def start_and_wait_for_checkpoint(shards, out, min_step, *extra):
    proc = subprocess.Popen(torchrun_cmd(2, *pretrain_args(shards, out, "debug.step_sleep_s=0.3", *extra)),
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        latest = store.latest()
        if latest is not None and load_checkpoint(latest)["step"] >= min_step:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no checkpoint at step >= {min_step}: {proc.stdout.read()[-3000:]}")


def test_kill9_then_resume(shards, tmp_path):
    out = tmp_path / "killed"
    proc = start_and_wait_for_checkpoint(shards, out, 5)
    kill_tree(proc.pid)
    killed_at = load_checkpoint(out)["step"]
    assert 5 <= killed_at < 20
    for step, path in CheckpointStore(out / "checkpoints").checkpoints():
        assert load_checkpoint(path)["step"] == step  # every committed checkpoint is whole
    run_torchrun(2, *pretrain_args(shards, out))
    r = result(out)
    assert r["resumed_from_step"] == killed_at and r["final_step"] == 20 and r["ranks_in_sync"]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = sorted({e.step for e in acc.Scalars("train/loss")})
    assert steps[-1] == 20 and {15, 20} <= set(steps)  # the curve goes on after the resume point


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_kill9_during_a_checkpoint_write_then_resume(shards, tmp_path, strategy):
    """Killed while step 10's checkpoint is half written: the committed ones all load, the partial one is removed
    at the next start, and the run resumes from step 5 to the end with ranks in sync."""
    out = tmp_path / "run"
    extra = ["debug.save_sleep_s=3"] + ([] if strategy == "ddp" else [
        "train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"])
    proc = subprocess.Popen(torchrun_cmd(2, *pretrain_args(shards, out, "debug.step_sleep_s=0.3", *extra)),
                            cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "checkpoints" / ".partial-step_000000010" / "state.pt"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not partial.is_file():
        time.sleep(0.02)
    kill_tree(proc.pid)
    assert partial.is_file(), "the run was not caught writing step 10's checkpoint"
    store = CheckpointStore(out / "checkpoints")
    assert [s for s, _ in store.checkpoints()] == [5] and load_checkpoint(store.latest())["step"] == 5
    done = run_torchrun(2, *pretrain_args(shards, out, *extra[1:]))
    assert "removing incomplete checkpoint" in done.stderr + done.stdout
    r = result(out)
    assert r["resumed_from_step"] == 5 and r["final_step"] == 20 and r["ranks_in_sync"]
    assert not any(p.name.startswith(".partial-") for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits(shards, tmp_path, sig):
    out = tmp_path / sig.name
    proc = start_and_wait_for_checkpoint(shards, out, 5)
    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:  # what Slurm does at preemption: every task gets the signal
        w.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    r = result(out)
    assert r["stopped_by_signal"] == sig.name and r["final_step"] < 20
    assert load_checkpoint(out)["step"] == r["final_step"]  # a checkpoint at the step it stopped
    run_torchrun(2, *pretrain_args(shards, out))
    assert result(out)["resumed_from_step"] == r["final_step"] and result(out)["final_step"] == 20


def test_nan_steps_are_skipped_then_the_run_stops(shards, tmp_path):
    out = tmp_path / "nan"
    run_torchrun(2, *pretrain_args(shards, out, "train.epochs=1", "debug.nan_steps=[3]", "debug.nan_rank=1"))
    r = result(out)
    assert r["final_step"] == 10 and r["skipped_steps"] == 1 and r["ranks_in_sync"]
    out2 = tmp_path / "nan_stop"
    proc = run_torchrun(2, *pretrain_args(shards, out2, "train.epochs=1", "debug.nan_steps=[7,8,9]",
                                          "train.max_nonfinite=3"), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "3 consecutive steps with a non-finite loss" in text
    assert "non-finite loss on rank(s) [0]" in text
    state = load_checkpoint(out2)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_crashing_rank_ends_the_job(shards, tmp_path):
    start = time.time()
    proc = run_torchrun(2, *pretrain_args(shards, tmp_path / "crash", "debug.crash_step=3", "debug.crash_rank=1",
                                          "run.dist_timeout_s=60"), check=False, timeout=200)
    assert proc.returncode != 0 and "debug.crash_step: rank 1 crashes at step 3" in proc.stdout + proc.stderr
    assert time.time() - start < 120


def test_bad_data_is_a_clear_error(shards, tmp_path):
    proc = run_torchrun(1, *pretrain_args(str(tmp_path / "none" / "{00000..00003}.tar"), tmp_path / "a"),
                        check=False)
    assert proc.returncode != 0 and "4 of 4 shards missing" in proc.stdout + proc.stderr
    (tmp_path / "empty.tar").write_bytes(b"")
    proc = run_torchrun(1, *pretrain_args(str(tmp_path / "empty.tar"), tmp_path / "b",
                                          "data.samples_per_epoch=16"), check=False)
    assert proc.returncode != 0 and "empty shard file" in proc.stdout + proc.stderr
    proc = run_torchrun(2, *pretrain_args(shards, tmp_path / "c", "data.resampled=false", "data.num_workers=8"),
                        check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "8 shard(s) cannot feed 8 loader worker(s) x 2 rank(s)" in text
    # one line, before the model is built, naming the key a user sets (torchrun then reports the rank's exit with a
    # traceback of its own: no frame of ours in it)
    assert "set data.resampled=true" in text and "training steps" not in text
    assert not re.search(r'File ".*/(pretrain|runtime|data_tools)/', text), text[-3000:]
