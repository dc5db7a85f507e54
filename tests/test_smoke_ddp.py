"""The runtime end to end: 2-rank torchrun DDP on CPU (gloo), SIGKILL mid-run, resume from `latest`."""
import json
import subprocess
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runtime.checkpoint import CheckpointStore, load_checkpoint

from conftest import REPO, clean_env, kill_tree, run_torchrun, torchrun_cmd

ARGS = ["--config", "configs/smoke.yaml"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-rank run of the smoke config (40 steps, checkpoint every 10, keep 2)."""
    out = tmp_path_factory.mktemp("reference")
    run_torchrun(2, "runtime.smoke", *ARGS, f"run.output_dir={out}")
    return out


def test_two_ranks_train_to_identical_weights(reference_run):
    result = json.loads((reference_run / "smoke_result.json").read_text())
    assert result["world_size"] == 2 and result["final_step"] == 40
    assert result["ranks_in_sync"] and len(set(result["param_checksums"])) == 1
    losses = [w["train/loss"] for w in result["windows"]]
    assert losses[-1] < 0.5 * losses[0], losses
    summary = result["history"]["train/loss"]  # result files keep the whole history's summary
    assert summary == pytest.approx({"count": 8, "first": losses[0], "last": losses[-1], "min": min(losses),
                                     "max": max(losses), "mean": sum(losses) / 8})
    store = CheckpointStore(reference_run / "checkpoints")
    assert [s for s, _ in store.checkpoints()] == [30, 40]  # keep_last: 2
    state = load_checkpoint(reference_run)
    assert state["step"] == 40 and state["samples_seen"] == 40 * 16 * 2 and len(state["rng"]) == 2
    config = yaml.safe_load((reference_run / "config.yaml").read_text())
    assert config["optim"]["lr"] == pytest.approx(0.2 * 16 * 2 / 256)  # blr * effective batch / 256
    assert state["config"] == config
    meta = json.loads((reference_run / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["launcher"] == "torchrun"


def test_tensorboard_events(reference_run):
    acc = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(5, 41, 5))
    result = json.loads((reference_run / "smoke_result.json").read_text())
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([w["train/loss"] for w in result["windows"]])
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[1] == pytest.approx(0.025)  # step 10 = end of the 1-epoch warmup: the peak lr
    assert lrs[-1] < lrs[1]


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "killed"
    cmd = torchrun_cmd(2, "runtime.smoke", *ARGS, f"run.output_dir={out}", "debug.step_sleep_s=0.15")
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = CheckpointStore(out / "checkpoints")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            latest = store.latest()
            if latest is not None and load_checkpoint(latest)["step"] >= 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
    finally:
        kill_tree(proc.pid)
        proc.wait(timeout=30)

    # whatever the moment of the kill, every committed checkpoint is whole and `latest` names one of them
    killed_at = load_checkpoint(out)["step"]
    assert 20 <= killed_at < 40
    for step, path in store.checkpoints():
        assert load_checkpoint(path)["step"] == step

    run_torchrun(2, "runtime.smoke", *ARGS, f"run.output_dir={out}")
    result = json.loads((out / "smoke_result.json").read_text())
    assert result["resumed_from_step"] == killed_at and result["final_step"] == 40 and result["ranks_in_sync"]
    resumed, reference = load_checkpoint(out), load_checkpoint(reference_run)
    assert resumed["step"] == reference["step"] == 40
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    # the EMA of the weights (ema_decay in configs/smoke.yaml), a registered part: saved, restored, bit-identical
    ema, reference_ema = resumed["states"]["ema"], reference["states"]["ema"]
    assert ema.keys() == reference_ema.keys() and all(torch.equal(ema[k], reference_ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], resumed["model"][k]) for k in ema)
    # the summary of the whole history came through the checkpoint's TrainState: the same as the reference's
    whole = json.loads((reference_run / "smoke_result.json").read_text())["history"]
    for stat in ("count", "first", "last", "min", "max", "mean"):
        assert result["history"]["train/loss"][stat] == pytest.approx(whole["train/loss"][stat], rel=1e-5), stat
    assert not any(p.name.startswith(".partial-") for p in (out / "checkpoints").iterdir())
