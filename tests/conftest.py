"""Shared test helpers: repository paths, an offline environment, and a torchrun launcher for multi-rank tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = str(REPO / "configs" / "teacher" / "tiny-clip.json")  # a tiny open_clip config
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def clean_env(**extra):
    """The test process's environment without launcher variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, target: str, *args: str):
    """torchrun for a module name, or for a script path (ending in .py) as users type it."""
    run = [target] if target.endswith(".py") else ["-m", target]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *run, *args]


def run_torchrun(nproc: int, target: str, *args: str, timeout: float = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, target, *args), cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {target} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and all its descendants at once (torchrun starts each worker in a session of its own)."""
    import psutil
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture
def repo() -> Path:
    return REPO
