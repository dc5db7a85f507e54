"""Several nodes for real: a two-node Slurm in network namespaces (own address and host name per node), pretraining
across both nodes with 2 processes each (DDP and DeepSpeed ZeRO-2) by sbatch and by submitit, requeue, a node's death,
a Ray sweep over both nodes, and shards streamed over http from a faulty server on one node."""
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
    """Plain (non-resampled) epochs of 5 steps: 160 samples / (batch 8 x 4 ranks); an `extra` override replaces the
    default of its key (a key given twice is an error on the command line)."""
    keys = {"data.train": f"[{shards}]", "run.output_dir": str(out), "data.batch_size": "8", "data.resampled": "false",
            "data.num_workers": "1", "train.epochs": "2", "run.ckpt_every": "5", "run.log_every": "5",
            "train.image_every": "0", "debug.record_keys": "true"}
    keys.update(o.split("=", 1) for o in extra)
    return ["configs/pretrain/tiny.yaml", *(f"{k}={v}" for k, v in keys.items())]


def check_run(out: Path, total_samples: int = 160) -> dict:
    """4 ranks, 2 on each node, identical weights; every sample read exactly once per epoch across the ranks; in a
    run that was not interrupted, each rank's one loader worker made its batches of both epochs."""
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 10 and result["world_size"] == 4 and result["ranks_in_sync"], result
    assert Counter(result["hosts"]) == {"node1": 2, "node2": 2}
    per_epoch = {0: [], 1: []}
    for log in sorted((out / "keys").glob("rank*.jsonl")):
        workers = {0: set(), 1: set()}
        for line in log.read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]] += record["keys"]
            workers[record["epoch"]].add(record["worker_pid"])
        if result["resumed_from_step"] == 0:
            assert len(workers[0]) == 1 and workers[0] == workers[1], (log.name, workers)
    for epoch, keys in per_epoch.items():
        assert len(keys) == total_samples and len(set(keys)) == total_samples, (epoch, Counter(keys).most_common(3))
    return result


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_sbatch_pretraining_across_two_nodes(cluster, shards, tmp_path, strategy):
    out = tmp_path / "run"
    extra = [] if strategy == "ddp" else ["train.strategy=deepspeed",
                                          "train.deepspeed_config=configs/deepspeed/zero2.json"]
    submitted = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
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
    done = cluster.run(sys.executable, "slurm/submit.py", "--nodes", NODES, "--tasks-per-node", 2, "--gpus-per-node", 0,
                       "--cpus-per-task", 1, "--timeout-min", 10, "--folder", tmp_path / "submitit" / "%j", "--wait",
                       "--", "--config", *args, timeout=300)
    assert "finished" in done.stdout
    check_run(out)


def wait_for_checkpoint(out: Path, step: int, timeout: float = 240) -> None:
    from runtime.checkpoint import CheckpointStore, load_checkpoint
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = store.latest()
        if latest is not None and load_checkpoint(latest)["step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} in {out}")


def test_requeue_resumes_on_both_nodes(cluster, shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
                      f"--output={log}",
                      "--export=ALL,NPROC_PER_NODE=2", "slurm/pretrain.sh",
                      *trainer_args(shards, out, "train.epochs=4", "debug.step_sleep_s=0.4")).stdout.strip()
    wait_for_checkpoint(out, 5)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what Slurm sends ahead of a time limit
    cluster.wait(job, {"PENDING"}, timeout=120)
    stopped = json.loads((out / "result.json").read_text())
    assert stopped["stopped_by_signal"] == "SIGTERM" and 5 <= stopped["final_step"] < 20
    # a requeued job is held back until slurmd has cleaned the old instance up; as the admin, release it once
    # both nodes are idle
    deadline = time.time() + 60
    while time.time() < deadline and cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() != ["idle"] * NODES:
        time.sleep(0.5)
    time.sleep(5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert cluster.wait(job, {"COMPLETED"}) == "COMPLETED"
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from_step"] == stopped["final_step"] and result["final_step"] == 20
    assert result["ranks_in_sync"] and Counter(result["hosts"]) == {"node1": 2, "node2": 2}
    assert f"job {job} (restart 1): 2 node(s) x 2 processes" in log.read_text()


def trainer_pids(cluster: Cluster, node: int) -> list:
    """The training processes (ranks and their loader workers, not torchrun's agent) in a node's namespace."""
    _, prefix = (cluster.base / "cluster").read_text().split()
    pids = subprocess.run(["ip", "netns", "pids", f"{prefix}{node}"], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain/main.py" in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(int(pid))
    return found


def test_a_node_killed_mid_run_ends_the_job_and_a_rerun_resumes(cluster, shards, tmp_path):
    import signal
    out, log = tmp_path / "run", tmp_path / "job.log"
    timeout_s, ckpt_every = 60, 5
    args = trainer_args(shards, out, "train.epochs=4", "debug.step_sleep_s=0.4", f"run.dist_timeout_s={timeout_s}")
    sbatch = ["sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
              f"--output={log}",
              "--export=ALL,NPROC_PER_NODE=2", "--no-requeue", "slurm/pretrain.sh", *args]
    job = cluster.run(*sbatch).stdout.strip()
    wait_for_checkpoint(out, 7)
    victims = trainer_pids(cluster, 2)
    assert len(victims) == 4, victims  # 2 ranks and their loader workers
    killed_at_step = max(json.loads(line)["step"] for line in (out / "keys" / "rank0.jsonl").read_text().splitlines())
    start = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    state = _wait_terminal(cluster, job, timeout_s + 120)
    ended_after = time.time() - start
    print(f"job {job} ended {state} {ended_after:.1f} s after node2's trainers were killed at step {killed_at_step}")
    assert state == "FAILED" and ended_after < timeout_s + 60, (state, ended_after)
    assert not trainer_pids(cluster, 1) and not trainer_pids(cluster, 2)  # nothing left holding the nodes
    rerun = cluster.run(*sbatch).stdout.strip()
    assert cluster.wait(rerun, {"COMPLETED"}) == "COMPLETED"
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 20 and result["ranks_in_sync"]
    assert killed_at_step - ckpt_every <= result["resumed_from_step"] <= killed_at_step
    print(f"rerun resumed from step {result['resumed_from_step']} (killed at {killed_at_step})")


def _wait_terminal(cluster: Cluster, job: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, _ = cluster.job_state(job)
        if state in ("FAILED", "COMPLETED", "CANCELLED", "NODE_FAIL", "TIMEOUT"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still running {timeout} s after a node's trainers were killed")


def ray_trial_pids() -> list:
    """Processes running a Ray Tune trial (a function trainable's actor: title ray::ImplicitFunc.train)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ImplicitFunc"):
            found.append(int(proc.name))
    return found


def test_sweep_across_two_nodes(cluster, tmp_path):
    """A Ray head on node1 and a worker on node2 (token auth, no fixed sleeps); four one-CPU trials on two
    2-CPU nodes run on both; a trial killed mid-run is retried; results.md is written."""
    import signal

    import yaml

    from data_tools.folder import shard_folder
    from data_tools.registry import REGISTRY
    from data_tools.samples import ImageOptions
    from image_data import make_class_tree
    make_class_tree(tmp_path / "src", REGISTRY["Emotion6"].classes, per_class=16, size=36)
    shard_folder("Emotion6", str(tmp_path / "src"), str(tmp_path / "shards"), shard_size=100, min_shards=1,
                 options=ImageOptions(detector="none"))
    sweep = {"output_dir": str(tmp_path / "sweep"), "datasets": {"Emotion6": str(tmp_path / "shards")},
             "base_config": str(REPO / "configs/finetune/tiny.yaml"),
             "base_overrides": ["encoder.from_scratch=true", "train.epochs=6", "data.num_workers=0",
                                "aug.auto_augment=null", "debug.step_sleep_s=0.3"],
             "search_space": {"optim.blr": {"grid": [1e-3, 2e-3, 3e-3, 4e-3]}}, "num_samples": 1,
             "scheduler": {"name": "fifo"}, "resources_per_trial": {"cpu": 1}, "max_failures": 1}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    log = tmp_path / "job.log"
    job = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
                      f"--output={log}",
                      "slurm/sweep.sh", "--config", tmp_path / "sweep.yaml").stdout.strip()
    deadline = time.time() + 240
    while time.time() < deadline and not ray_trial_pids():
        time.sleep(0.5)
    time.sleep(3)
    victims = ray_trial_pids()
    assert victims, f"no trial process appeared:\n{log.read_text() if log.exists() else ''}"
    os.kill(victims[0], signal.SIGKILL)
    assert cluster.wait(job, {"COMPLETED"}, timeout=600) == "COMPLETED", log.read_text()
    import csv
    rows = list(csv.DictReader((tmp_path / "sweep" / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert {r["node"] for r in rows} == {"node1", "node2"}, rows
    assert (tmp_path / "sweep" / "results.md").is_file()
    text = log.read_text()
    assert "Ray cluster at" in text and "2 node(s) alive" in text
    assert "InvalidAuthToken" not in text and "Usage stats collection is enabled" not in text
    host_state = Path("/tmp/ray/ray_current_cluster")  # the nodes kept their Ray state to themselves
    assert not host_state.exists() or "10.213." not in host_state.read_text()


def test_ranks_on_both_nodes_stream_shards_from_a_server_with_faults(cluster, shards, tmp_path):
    """A shard server on node1 (http://node1:PORT); one shard answers 404 and one breaks off mid-tar. The 4 ranks
    read only over the network, the losses are counted and logged, the run goes on to its last step."""
    import signal
    shard_dir = Path(shards).parent
    server = subprocess.Popen(
        ["bash", str(HERE / "multinode_exec.sh"), str(cluster.base), "1", sys.executable, "tests/shard_server.py",
         str(shard_dir), "--bind", "0.0.0.0", "--fail", "00002.tar=404", "--drop", "00005.tar"],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = server.stdout.readline().strip().rsplit(":", 1)[-1]
        assert port.isdigit(), f"shard server did not start (exit {server.poll()})"
        out, log = tmp_path / "run", tmp_path / "job.log"
        url = f"http://node1:{port}/{{00000..00007}}.tar"
        job = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
                      f"--output={log}",
                          "--export=ALL,NPROC_PER_NODE=2", "slurm/pretrain.sh",
                          *trainer_args(url, out, "data.url_timeout_s=10")).stdout.strip()
        assert cluster.wait(job, {"COMPLETED"}) == "COMPLETED"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    result = json.loads((out / "result.json").read_text())
    assert result["final_step"] == 10 and result["ranks_in_sync"]
    assert Counter(result["hosts"]) == {"node1": 2, "node2": 2}
    for rank in range(4):  # every rank, node2's too, trained on what it read over the network
        assert (out / "keys" / f"rank{rank}.jsonl").read_text().strip(), rank
    assert result["dropped_in_this_run"] >= 4, result  # both bad shards, in each of the 2 epochs
    text = log.read_text()
    assert "unreadable_shard" in text and "HTTP Error 404" in text and "00002.tar" in text
    assert "bad_tar" in text and "00005.tar" in text
    print(f"streamed run: {result['dropped_in_this_run']} losses counted, final step {result['final_step']}")
