"""Launching on a real single-node Slurm started by the fixture: sbatch to completion, USR1 -> checkpoint ->
requeue -> resume, and submitit (Slurm and local executors)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from runtime.checkpoint import CheckpointStore, load_checkpoint

from conftest import REPO, clean_env
from pretrain_fixtures import make_pretrain_shards, pretrain_args

HERE = REPO / "tests" / "slurm"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for commands talking to a real slurmctld + slurmd on 127.0.0.1, stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd needs root (CI and `make test` run as root)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("Slurm packages missing: `make debs` installs slurmctld slurmd slurm-client munge")
    base = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", str(HERE / "cluster_up.sh"), str(base)], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    env = clean_env(SLURM_CONF=str(base / "slurm.conf"), PYTHON=sys.executable)
    yield env
    subprocess.run(["bash", str(HERE / "cluster_down.sh"), str(base)], timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp("slurm_data"))


def job_state(env, job_id):
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")
    return state, out


def wait_for(env, job_id, states, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, detail = job_state(env, job_id)
        if state in states:
            return state
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and state not in states:
            raise AssertionError(f"job {job_id} ended {state}:\n{detail}")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job_state(env, job_id)}")


def sbatch(env, log, *args, cpus=2):
    cmd = ["sbatch", "--parsable", f"--output={log}", "--export=ALL,NPROC_PER_NODE=2", f"--cpus-per-task={cpus}",
           "--gpus-per-node=0", "slurm/pretrain.sh", "configs/pretrain/tiny.yaml", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def test_sbatch_runs_to_completion(slurm, shards, tmp_path):
    out = tmp_path / "run"
    job = sbatch(slurm, tmp_path / "job.log", *pretrain_args(shards, out)[3:])
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 20 and result["world_size"] == 2 and result["ranks_in_sync"]
    assert f"job {job} (restart 0): 1 node(s) x 2 processes" in (tmp_path / "job.log").read_text()


def test_sbatch_requeue_resumes(slurm, shards, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    job = sbatch(slurm, log, *pretrain_args(shards, out, "debug.step_sleep_s=0.4")[3:])
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline:
        latest = store.latest()
        if latest is not None and load_checkpoint(latest)["step"] >= 5:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no checkpoint: {log.read_text() if log.exists() else ''}")
    # what Slurm does ahead of a time limit (--signal=B:USR1@180): USR1 to the batch script
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for(slurm, job, {"PENDING"}, timeout=120)
    stopped = json.loads((out / "result.json").read_text())
    assert stopped["stopped_by_signal"] == "SIGTERM" and stopped["final_step"] < 20
    assert load_checkpoint(out)["step"] == stopped["final_step"]
    # a requeued job waits ~2 minutes before it is eligible again, so that slurmd has cleaned up the old
    # instance (its credential is revoked); as the admin we let it start as soon as the node is idle
    deadline = time.time() + 60
    while time.time() < deadline:
        node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=slurm, capture_output=True, text=True).stdout.strip()
        if node == "idle":
            break
        time.sleep(0.5)
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from_step"] == stopped["final_step"] and result["final_step"] == 20
    assert result["ranks_in_sync"]
    text = log.read_text()
    assert "USR1: asking the trainers to checkpoint" in text and f"job {job} (restart 1)" in text
    assert json.loads((out / "meta.json").read_text())["restart_count"] == "1"


@pytest.mark.parametrize("local", [False, True])
def test_submitit(slurm, shards, tmp_path, local):
    out = tmp_path / "run"
    cmd = [sys.executable, "slurm/submit.py", "--tasks-per-node", "2", "--cpus-per-task", "1", "--gpus-per-node", "0",
           "--timeout-min", "10",
           "--folder", str(tmp_path / "submitit"), "--wait", *(["--local"] if local else []), "--",
           *pretrain_args(shards, out, "train.epochs=1")[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert ("local" if local else "slurm") in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 10 and result["world_size"] == 2 and result["ranks_in_sync"]


@pytest.mark.parametrize("cpus", [8, 12])
def test_a_job_gets_the_cpus_it_asked_for_and_the_loader_workers_follow(slurm, shards, tmp_path, cpus):
    """The script's one task per node gets every CPU of the allocation (srun no longer inherits sbatch's
    --cpus-per-task); with 2 ranks per node, data.num_workers=auto gives each rank its half less two."""
    out = tmp_path / "run"
    log = tmp_path / "job.log"
    job = sbatch(slurm, log, *pretrain_args(shards, out, "train.epochs=1", "data.num_workers=auto")[3:],
                 cpus=cpus)
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    assert f"per node: {cpus} CPUs" in log.read_text()
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["num_workers"] == cpus // 2 - 2
    assert json.loads((out / "result.json").read_text())["final_step"] == 10


def test_sbatch_finetune(slurm, tmp_path):
    from data_tools.folder import shard_folder
    from data_tools.registry import REGISTRY
    from data_tools.samples import ImageOptions
    from image_data import make_class_tree
    make_class_tree(tmp_path / "src", REGISTRY["Emotion6"].classes, per_class=12, size=36)
    shard_folder("Emotion6", str(tmp_path / "src"), str(tmp_path / "shards"), shard_size=100, min_shards=1,
                 options=ImageOptions(detector="none"))
    out = tmp_path / "ft"
    cmd = ["sbatch", "--parsable", f"--output={tmp_path / 'job.log'}", "--export=ALL,NPROC_PER_NODE=2",
           "--gpus-per-node=0", "slurm/finetune.sh", "--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6",
           "--data", str(tmp_path / "shards"), "--from-scratch", f"run.output_dir={out}", "train.epochs=2",
           "data.batch_size=8", "data.num_workers=0"]
    job = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True, check=True).stdout.strip()
    assert wait_for(slurm, job, {"COMPLETED"}) == "COMPLETED"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["dataset"] == "Emotion6" and len(metrics["history"]) == 2
