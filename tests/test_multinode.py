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


@pytest.fixture(scope="module")
def photo_server(cluster, tmp_path_factory):
    """48 photos served from node1 (http://node1:PORT/NNN.jpg), each answer 0.15 s late; a URL list of them with two
    rows that answer 404."""
    import signal

    from image_data import jpeg_bytes, photo_crop
    root = tmp_path_factory.mktemp("photos")
    for i in range(48):
        (root / f"{i:03d}.jpg").write_bytes(jpeg_bytes(photo_crop(i, 80)))
    server = subprocess.Popen(
        ["bash", str(HERE / "multinode_exec.sh"), str(cluster.base), "1", sys.executable, "tests/shard_server.py",
         str(root), "--bind", "0.0.0.0", "--delay", "0.15"],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = server.stdout.readline().strip().rsplit(":", 1)[-1]
        assert port.isdigit(), f"photo server did not start (exit {server.poll()})"
        rows = [f"http://node1:{port}/{i:03d}.jpg" for i in range(48)] + [f"http://node1:{port}/gone{i}.jpg"
                                                                         for i in range(2)]
        urls = root / "urls.csv"
        urls.write_text("url\n" + "\n".join(rows) + "\n")
        yield urls
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def crawl_args(cluster: Cluster, urls: Path, out: Path) -> list:
    """The cluster's network is allowed by CIDR, as a crawl of an image server inside a cluster would be."""
    node1 = next(line.split()[0] for line in (cluster.base / "hosts").read_text().splitlines()
                 if line.split()[1:] == ["node1"])
    net = node1.rsplit(".", 1)[0]
    return [urls, "--out", out, "--detector", "none", "--shard-size", "5", "--threads", "2", "--retries", "0",
            "--allow-cidr", f"{net}.0/24"]


def same_shards(a: Path, b: Path) -> None:
    """Every file of two sharding outputs byte-identical (info.json apart: it records the command and the time)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "sizes.json" in names and "info.json" in names
    for name in names:
        if name != "info.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "info.json").read_text())["splits"] == json.loads((b / "info.json").read_text())["splits"]


def array_task_hosts(log_dir: Path) -> dict:
    """task id -> host names it ran on, from the data jobs' first log line of each (re)start."""
    hosts = {}
    for log in log_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            if " task " in line and " on node" in line:
                task = line.split(" task ", 1)[1].split()[0]
                hosts.setdefault(task, []).append(line.split(" on ", 1)[1].split(",")[0])
    return hosts


def test_a_crawl_split_over_two_nodes_gives_the_shards_of_a_one_node_crawl(cluster, photo_server, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    cluster.run(sys.executable, "-m", "data_tools", "crawl", *crawl_args(cluster, photo_server, whole), node=2,
                timeout=180)
    (tmp_path / "logs").mkdir()
    job = cluster.run("sbatch", "--parsable", "--array=0-1", "--cpus-per-task=2",
                      f"--output={tmp_path / 'logs' / '%A_%a.log'}", "slurm/crawl.sh",
                      *crawl_args(cluster, photo_server, parts)).stdout.strip()
    for task in (0, 1):
        assert cluster.wait(f"{job}_{task}", {"COMPLETED"}) == "COMPLETED"
    hosts = array_task_hosts(tmp_path / "logs")
    assert sorted(h for task in ("0", "1") for h in hosts[task]) == ["node1", "node2"], hosts  # a part on each
    same_shards(whole, parts)
    stats = json.loads((whole / "info.json").read_text())["splits"]["train"]
    assert stats["samples"] == 48 and stats["failures"] == {"http_404": 2} and stats["shards"] == 10


def test_a_crawl_part_requeued_mid_shard_leaves_no_partial_shard_and_completes(cluster, photo_server, tmp_path):
    """Part 0 of 2 as a batch job, stopped while it writes a shard (USR1, as ahead of a time limit) and requeued:
    no visible shard is ever partial, merge-parts names every shard not yet complete, the requeued part finishes
    its shards, and part 1 (run later, on the other node) completes the job."""
    import tarfile
    out, log = tmp_path / "out", tmp_path / "part0.log"
    job = cluster.run("sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}", "slurm/crawl.sh",
                      *crawl_args(cluster, photo_server, out), "--part", "0/2").stdout.strip()
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".*.tar.partial")):  # a shard is being written
        time.sleep(0.05)
    assert list(out.glob(".*.tar.partial")), cluster.logs()
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.wait(job, {"PENDING"}, timeout=120)
    for tar in out.glob("[0-9]*.tar"):  # what is visible is whole (a tar renamed into place, marker or not)
        with tarfile.open(tar) as f:
            assert len(f.getmembers()) % 2 == 0, tar  # jpg + json per sample
    plan = json.loads((out / "plan.json").read_text())["splits"]["train"]["shards"]
    incomplete = [f"train/{n:05d}.tar" for n in range(len(plan)) if not (out / f"{n:05d}_stats.json").exists()]
    assert any(int(name[6:11]) % 2 == 0 for name in incomplete), incomplete  # part 0 was stopped with work left
    refused = cluster.run(sys.executable, "-m", "data_tools", "merge-parts", out, check=False)
    assert refused.returncode == 2 and all(name in refused.stderr for name in incomplete), refused.stderr
    deadline = time.time() + 60  # as in test_requeue_resumes_on_both_nodes: release the requeued job by hand
    while time.time() < deadline and cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() != ["idle"] * NODES:
        time.sleep(0.5)
    time.sleep(5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    assert cluster.wait(job, {"COMPLETED"}, timeout=240) == "COMPLETED"
    text = log.read_text()
    assert "USR1: stopping this part" in text and "(restart 1)" in text, text
    assert not (out / "info.json").exists()  # part 1 has not run
    cluster.run(sys.executable, "-m", "data_tools", "crawl", *crawl_args(cluster, photo_server, out), "--part", "1/2",
                node=2, timeout=180)
    assert not list(out.glob(".*.partial")), sorted(p.name for p in out.iterdir())
    info = json.loads((out / "info.json").read_text())["splits"]["train"]
    assert info["samples"] == 48 and info["failures"] == {"http_404": 2}
    from data_tools.verify import verify
    assert not verify(str(out))["problems"]


def test_merge_parts_refuses_an_incomplete_sharding_job_until_its_last_part_runs(cluster, tmp_path):
    from data_tools.registry import REGISTRY
    from image_data import make_class_tree
    make_class_tree(tmp_path / "src", REGISTRY["Emotion6"].classes, per_class=4, size=36)
    out = tmp_path / "shards"
    args = ["shard-folder", "Emotion6", tmp_path / "src", "--out", out, "--detector", "none", "--shard-size", "4",
            "--min-shards", "2"]
    first = cluster.run("sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path / 'p0.log'}",
                        "slurm/shard.sh", *args, "--part", "0/2").stdout.strip()
    assert cluster.wait(first, {"COMPLETED"}) == "COMPLETED"
    refused = cluster.run(sys.executable, "-m", "data_tools", "merge-parts", out, node=2, check=False)
    plan = json.loads((out / "plan.json").read_text())
    odd = [f"{split}/{n:05d}.tar" for split, entry in plan["splits"].items() for n in range(len(entry["shards"]))
           if n % 2]
    assert refused.returncode == 2 and odd and all(name in refused.stderr for name in odd[:10]), refused.stderr
    assert not (out / "info.json").exists()
    second = cluster.run("sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path / 'p1.log'}",
                         "slurm/shard.sh", *args, "--part", "1/2").stdout.strip()
    assert cluster.wait(second, {"COMPLETED"}) == "COMPLETED"
    info = json.loads((out / "info.json").read_text())  # the last part wrote it
    assert sum(s["samples"] for s in info["splits"].values()) == 4 * len(REGISTRY["Emotion6"].classes)
    assert cluster.run(sys.executable, "-m", "data_tools", "merge-parts", out, node=2).returncode == 0
    bad = subprocess.run(["bash", "slurm/shard.sh", "crawl", "x"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "must be shard-folder or shard-emoset, not 'crawl'" in bad.stderr, bad.stderr


def test_the_teacher_cache_as_a_job_over_two_nodes(cluster, shards, tmp_path):
    """slurm/cache_teacher.sh: one torchrun per node, rank r of 2 embeds shards r, r+2, ...; every shard's sidecar
    and completion marker is written (test_distill shows a rerun skips them and 2 ranks write what 1 does)."""
    out, log = tmp_path / "cache", tmp_path / "job.log"
    job = cluster.run("sbatch", "--parsable", f"--nodes={NODES}", "--cpus-per-task=2", "--gpus-per-node=0",
                      f"--output={log}", "--export=ALL,NPROC_PER_NODE=1", "slurm/cache_teacher.sh", "--shards", shards,
                      "--teacher-config", "configs/pretrain/tiny.yaml", "--out", out, "--workers", "1",
                      "--batch-size", "16").stdout.strip()
    assert cluster.wait(job, {"COMPLETED"}) == "COMPLETED"
    for shard in range(8):
        assert json.loads((out / f"{shard:05d}_stats.json").read_text())["samples"] == 20, shard
    text = log.read_text()
    assert "2 node(s) x 1 processes" in text and "rank 0 of 2, 4 shards, 80 samples" in text, text
    assert (out / "00007.tar").is_file()
