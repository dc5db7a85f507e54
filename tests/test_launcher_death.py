"""A trainer whose launcher dies exits at once: torchrun's agent SIGKILLed mid-run (DDP, ZeRO-2, fine-tuning) leaves
no trainer or loader-worker process behind, and a rerun resumes from `latest`."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, clean_env, run_torchrun, torchrun_cmd
from pretrain_fixtures import make_pretrain_shards, pretrain_args
from runtime.checkpoint import CheckpointStore, load_checkpoint
from runtime.launcher_watch import exit_with_launcher

GONE_WITHIN_S = 15


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp("orphans"))


def alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_agent_mid_run(cmd, out, min_step, log):
    """Start torchrun, wait for a checkpoint at >= min_step with loader workers up, SIGKILL the agent alone; returns
    (the trainer and worker pids it had, seconds until none is left)."""
    with open(log, "w") as sink:
        agent = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=sink, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + 180
    try:
        while time.time() < deadline and agent.poll() is None:
            latest = store.latest()
            if latest is not None and load_checkpoint(latest)["step"] >= min_step:
                procs = psutil.Process(agent.pid).children(recursive=True)
                if len(procs) >= 4:  # 2 ranks and at least one loader worker each
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no checkpoint at step >= {min_step}:\n{open(log).read()[-3000:]}")
        pids = [p.pid for p in procs]
        os.kill(agent.pid, signal.SIGKILL)  # what an OOM killer or a dead terminal does to the agent alone
        agent.wait()
        start = time.time()
        while alive(pids) and time.time() - start < 60:
            time.sleep(0.1)
        gone_after = time.time() - start
    finally:
        for pid in alive([p.pid for p in psutil.Process().children(recursive=True)]):
            os.kill(pid, signal.SIGKILL)  # never leave a failed test's processes behind
    return pids, gone_after


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_pretraining_ranks_and_workers_exit_when_torchrun_dies(shards, tmp_path, strategy):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    extra = ["data.num_workers=1"] + ([] if strategy == "ddp" else [
        "train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"])
    # 40 steps of >= 1 s: left alone, the orphans would need > 30 s more to finish
    cmd = torchrun_cmd(2, *pretrain_args(shards, out, "train.epochs=4", "debug.step_sleep_s=1.0", *extra))
    pids, gone_after = kill_agent_mid_run(cmd, out, 5, log)
    print(f"{strategy}: {len(pids)} trainer and loader processes gone {gone_after:.1f} s after the agent's death")
    assert not alive(pids) and gone_after < GONE_WITHIN_S, (gone_after, alive(pids))
    assert not (out / "result.json").exists()  # they exited, they did not just finish the run
    text = log.read_text()
    assert "is gone: exiting now, without a checkpoint" in text, text[-3000:]
    store = CheckpointStore(out / "checkpoints")
    last = load_checkpoint(store.latest())["step"]
    assert all(load_checkpoint(path)["step"] == step for step, path in store.checkpoints())  # all whole
    run_torchrun(2, *pretrain_args(shards, out, "train.epochs=4", *extra))
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from_step"] == last < 40 and result["final_step"] == 40 and result["ranks_in_sync"]


def test_finetuning_ranks_exit_when_torchrun_dies(tmp_path):
    from image_data import emotion6_shards
    root = emotion6_shards(tmp_path / "e6", per_class=40, shard_size=30, min_shards=2)
    out, log = tmp_path / "ft", tmp_path / "torchrun.log"
    cmd = torchrun_cmd(2, "finetune/main.py", "--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6",
                       "--data", str(root), f"run.output_dir={out}", "data.batch_size=16", "--from-scratch",
                       "train.epochs=20", "run.ckpt_every=3", "data.num_workers=1", "debug.step_sleep_s=1.0")
    pids, gone_after = kill_agent_mid_run(cmd, out, 3, log)
    print(f"finetune: {len(pids)} processes gone {gone_after:.1f} s after the agent's death")
    assert not alive(pids) and gone_after < GONE_WITHIN_S, (gone_after, alive(pids))
    assert not (out / "metrics.json").exists()
    assert "is gone: exiting now, without a checkpoint" in log.read_text()


def test_the_watch_is_off_for_a_plain_process_and_by_choice(monkeypatch):
    assert exit_with_launcher("single") is False  # `nohup python pretrain/main.py &` may outlive its shell
    monkeypatch.setenv("UNIEMOX_EXIT_WITH_LAUNCHER", "0")
    assert exit_with_launcher("torchrun") is False


def test_a_watched_process_exits_when_its_parent_dies(tmp_path):
    """A parent that starts a watched child and is SIGKILLed: the child, otherwise endless, is gone within a
    second or so, its last log line flushed."""
    child_log = tmp_path / "child.log"
    code = (f"import logging, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', '''\n"
            f"import logging, time\n"
            f"logging.basicConfig(filename={str(child_log)!r}, level=logging.INFO)\n"
            f"from runtime.launcher_watch import exit_with_launcher\n"
            f"assert exit_with_launcher('torchrun')\n"
            f"logging.info('started')\n"
            f"while True: time.sleep(1)\n'''], start_new_session=True)\n"
            f"print(child.pid, flush=True)\n"
            f"time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    deadline = time.time() + 30
    while time.time() < deadline and "started" not in (child_log.read_text() if child_log.exists() else ""):
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    start = time.time()
    while alive([child]) and time.time() - start < 10:
        time.sleep(0.05)
    assert not alive([child]), "the child outlived its parent"
    assert time.time() - start < 3
    assert "is gone: exiting now" in child_log.read_text()
