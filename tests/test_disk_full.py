"""Disk full while writing a checkpoint (a size-limited tmpfs the test mounts): a clear error, nothing half-written,
the previous checkpoint intact and loadable, and the run resumes once space is freed."""
import json
import os
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch

from runtime.checkpoint import CheckpointError, CheckpointStore, load_checkpoint

from conftest import REPO, clean_env, run_torchrun, torchrun_cmd
from pretrain_fixtures import make_pretrain_shards, pretrain_args


@contextmanager
def small_disk(path, size):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mounted.stderr.strip()}); `make test` runs as root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory, leave=64 << 10):
    """Write a filler file until only `leave` bytes are free."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        while True:
            free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(1 << 20, free - leave))
                f.flush()
            except OSError:
                break
    return filler


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_stays(tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        store = CheckpointStore(disk / "checkpoints")
        store.save(1, {"model": {"w": torch.ones(256, 1024)}, "step": 1})  # 1 MiB
        with pytest.raises(CheckpointError, match=r"no space left in .* for the checkpoint of step 2 .*step_000000001 "
                                                  r"stays the resume point: free space and rerun"):
            store.save(2, {"model": {"w": torch.ones(768, 1024)}, "step": 2})  # 3 MiB: refused before writing

        def shards(directory):  # what DeepSpeed writes first on every rank: here it hits the full disk itself
            torch.save({"optim": torch.ones(768, 1024)}, directory / "zero_pp_rank_0_optim_states.pt")
        with pytest.raises(CheckpointError, match=r"no space left .* step 3 .*RuntimeError"):
            store.save(3, {"model": {"w": torch.ones(4)}, "step": 3}, write_shards=shards)
        assert [step for step, _ in store.checkpoints()] == [1] and store.latest().name == "step_000000001"
        assert load_checkpoint(store.latest())["step"] == 1
        assert sorted(p.name for p in store.root.iterdir()) == ["latest", "step_000000001"]  # no partial left
        store.save(3, {"model": {"w": torch.ones(4)}, "step": 3})  # small enough: saved
        assert load_checkpoint(store.latest())["step"] == 3


def test_pretraining_stops_on_a_full_disk_and_resumes_when_space_is_freed(tmp_path):
    shards = make_pretrain_shards(tmp_path / "data")
    with small_disk(tmp_path / "disk", "48m") as disk:
        out, log = disk / "run", tmp_path / "run.log"
        args = pretrain_args(shards, out, "train.epochs=4", "train.image_every=0")
        with open(log, "w") as sink:
            proc = subprocess.Popen(torchrun_cmd(2, *args, "debug.step_sleep_s=0.5"), cwd=REPO, env=clean_env(),
                                    stdout=sink, stderr=subprocess.STDOUT)
        store = CheckpointStore(out / "checkpoints")
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and (
                store.latest() is None or load_checkpoint(store.latest())["step"] < 5):
            time.sleep(0.1)
        filler = fill(disk)  # the disk fills up between two checkpoints
        assert proc.wait(timeout=180) != 0
        text = log.read_text()
        assert "CheckpointError: no space left in" in text and "stays the resume point" in text, text[-3000:]
        last = load_checkpoint(store.latest())["step"]
        assert last >= 5 and all(load_checkpoint(p)["step"] == s for s, p in store.checkpoints())
        assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # nothing half-written kept
        filler.unlink()
        run_torchrun(2, *args)
        result = json.loads((out / "result.json").read_text())
        assert result["resumed_from_step"] == last and result["final_step"] == 40 and result["ranks_in_sync"]
