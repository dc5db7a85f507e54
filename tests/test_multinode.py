"""Several nodes for real: a two-node Slurm in network namespaces (own address and host name per node), pretraining
across both nodes with 2 processes each (DDP and DeepSpeed ZeRO-2) by sbatch and by submitit."""
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, clean_env
from pretrain_fixtures import make_pretrain_shards

HERE = REPO / "tests" / "slurm"
NODES = 2


class Cluster:
    """Commands run as clients on a node of the cluster (its namespace, /etc/hosts view and SLURM_CONF)."""

    def __init__(self, base: Path):
        self.base = base
        self.env = clean_env(PYTHON=sys.executable)

    def run(self, *cmd, node: int = 1, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(HERE / "multinode_exec.sh"), str(self.base), str(node), *map(str, cmd)],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def job_state(self, job_id: str):
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN"), out

    def wait(self, job_id: str, states, timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state, detail = self.job_state(job_id)
            if state in states:
                return state
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                raise AssertionError(f"job {job_id} ended {state}:\n{detail}\n{self.logs()}")
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((self.base / "log").glob("*.log")))


def namespaces_permitted() -> bool:
    probe = f"uprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a multi-node cluster in network namespaces needs root (CI and `make test` run as root)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter")):
        pytest.skip("Slurm or iproute2 missing: `make debs` installs them")
    if not namespaces_permitted():
        pytest.skip("network namespaces are not permitted here (`ip netns add` failed)")
    base = tmp_path_factory.mktemp("multinode")
    down = ["bash", str(HERE / "multinode_down.sh"), str(base)]
    try:
        up = subprocess.run(["bash", str(HERE / "multinode_up.sh"), str(base), str(NODES), f"u{os.getpid() % 100000}n"],
                            capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        yield Cluster(base)
    finally:  # also on a failed start, an assertion or Ctrl-C
        subprocess.run(down, timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """160 samples in 8 shards of 20: with 2 nodes x 2 ranks x 1 worker each rank reads exactly 2 shards."""
    return make_pretrain_shards(tmp_path_factory.mktemp("multinode_data"), per_class=40, shards=8)


def trainer_args(shards: str, out: Path, *extra: str) -> list:
    """Plain (non-resampled) epochs of 5 steps: 160 samples / (batch 8 x 4 ranks)."""
    return ["configs/pretrain/tiny.yaml", f"data.train=[{shards}]", f"run.output_dir={out}", "data.batch_size=8",
            "data.resampled=false", "data.num_workers=1", "train.epochs=2", "run.ckpt_every=5", "run.log_every=5",
            "train.image_every=0", "debug.record_keys=true", *extra]


def check_run(out: Path, total_samples: int = 160) -> dict:
    """4 ranks, 2 on each node, identical weights; every sample read exactly once per epoch across the ranks."""
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 10 and result["world_size"] == 4 and result["ranks_in_sync"], result
    assert Counter(result["hosts"]) == {"node1": 2, "node2": 2}
    per_epoch = {0: [], 1: []}
    for log in sorted((out / "keys").glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]] += record["keys"]
    for epoch, keys in per_epoch.items():
        assert len(keys) == total_samples and len(set(keys)) == total_samples, (epoch, Counter(keys).most_common(3))
    return result


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_sbatch_pretraining_across_two_nodes(cluster, shards, tmp_path, strategy):
    out = tmp_path / "run"
    extra = [] if strategy == "ddp" else ["train.strategy=deepspeed",
                                          "train.deepspeed_config=configs/deepspeed/zero2.json"]
    submitted = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2",
                            f"--output={tmp_path / 'job.log'}", "--export=ALL,NPROC_PER_NODE=2", "slurm/pretrain.sh",
                            *trainer_args(shards, out, *extra))
    job = submitted.stdout.strip().split(";")[0]
    assert cluster.wait(job, {"COMPLETED"}) == "COMPLETED"
    result = check_run(out)
    assert result["strategy"] == ("ddp" if strategy == "ddp" else "deepspeed")
    assert f"job {job} (restart 0): 2 node(s) x 2 processes, rendezvous node1:" in (tmp_path / "job.log").read_text()


def test_submitit_pretraining_across_two_nodes(cluster, shards, tmp_path):
    out = tmp_path / "run"
    args = trainer_args(shards, out)
    done = cluster.run(sys.executable, "slurm/submit.py", "--nodes", NODES, "--tasks-per-node", 2,
                       "--cpus-per-task", 1, "--timeout-min", 10, "--folder", tmp_path / "submitit" / "%j", "--wait",
                       "--", "--config", *args, timeout=300)
    assert "finished" in done.stdout
    check_run(out)
