"""Checkpoint store: atomicity under SIGKILL, retention, safe loading, schema versions, key reports, RNG state."""
import argparse
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from runtime.checkpoint import (CheckpointError, CheckpointStore, SCHEMA_VERSION, decide_resume, find_checkpoint,
                                load_checkpoint, load_model_state, step_dirname)
from runtime.seeding import capture_rng_state, restore_rng_state

from conftest import REPO, clean_env


def test_save_load_roundtrip_and_latest(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.latest() is None and decide_resume("latest", store) is None
    store.save(10, {"step": 10, "w": torch.arange(4.0)})
    store.save(20, {"step": 20, "w": torch.arange(4.0) * 2})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == step_dirname(20)
    state = load_checkpoint(tmp_path / "checkpoints")
    assert state["step"] == 20 and torch.equal(state["w"], torch.arange(4.0) * 2)
    assert state["schema_version"] == SCHEMA_VERSION
    # a run directory, a step directory and a state file all resolve
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / step_dirname(20)
    assert load_checkpoint(tmp_path / "checkpoints" / step_dirname(10) / "state.pt")["step"] == 10
    assert decide_resume("latest", store) == tmp_path / "checkpoints" / step_dirname(20)
    assert decide_resume("none", store) is None


def test_keep_last_and_milestones(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, milestone_every=4)
    for step in range(1, 11):
        store.save(step, {"step": step})
    assert [s for s, _ in store.checkpoints()] == [4, 8, 9, 10]
    assert store.latest().name == step_dirname(10)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """A real SIGKILL while the second checkpoint's file is half written."""
    child = textwrap.dedent(f"""
        import sys, time, torch
        from runtime import checkpoint
        store = checkpoint.CheckpointStore({str(tmp_path)!r})
        store.save(1, {{"step": 1, "w": torch.ones(3)}})
        def half_write(state, path):
            with open(path, "wb") as f:
                f.write(b"PK half a zip file")
                f.flush()
            print("WRITING", flush=True)
            time.sleep(120)
        checkpoint._write_state = half_write
        store.save(2, {{"step": 2, "w": torch.zeros(3)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = CheckpointStore(tmp_path)
    assert (tmp_path / "latest").read_text().strip() == step_dirname(1)
    assert [s for s, _ in store.checkpoints()] == [1]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert (tmp_path / (".partial-" + step_dirname(2))).exists()
    store.clean_partials()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_dirname(1)]


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint path does not exist: .*nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="checkpoint path does not exist"):
        decide_resume(str(tmp_path / "nowhere"), CheckpointStore(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found in .*empty"):
        load_checkpoint(tmp_path / "empty")


def test_newer_schema_is_refused(tmp_path):
    (tmp_path / "step_000000005").mkdir()
    torch.save({"schema_version": SCHEMA_VERSION + 1, "step": 5}, tmp_path / "step_000000005" / "state.pt")
    with pytest.raises(CheckpointError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this code"):
        load_checkpoint(tmp_path / "step_000000005")
    torch.save({"step": 5}, tmp_path / "step_000000005" / "state.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "step_000000005")


def test_loading_refuses_arbitrary_objects(tmp_path):
    """weights_only: a pickle with a non-tensor object (code could ride along) is not loaded."""
    (tmp_path / "step_000000001").mkdir()
    torch.save({"schema_version": 1, "args": argparse.Namespace(a=1)}, tmp_path / "step_000000001" / "state.pt")
    with pytest.raises(CheckpointError, match="refused to load: it pickles more than tensors.*argparse.Namespace"):
        load_checkpoint(tmp_path)


def test_model_state_reports_exact_keys():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    state = {"module." + k: v for k, v in model.state_dict().items()}  # DDP prefix is stripped
    assert load_model_state(model, state) == ([], [])
    del state["module.2.bias"]
    state["module.head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, state)
    assert "missing keys ['2.bias']" in str(e.value) and "unexpected keys ['head.weight']" in str(e.value)
    assert load_model_state(model, state, strict=False) == (["2.bias"], ["head.weight"])
    with pytest.raises(CheckpointError, match=r"unexpected keys \['head.weight'\]"):
        load_model_state(model, state, allowed_missing=["2.bias"])


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    CheckpointStore(tmp_path).save(1, {"rng": capture_rng_state()})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class FakeCuda:
    """A stand-in for torch.cuda's RNG calls (there is no GPU here): one generator state per device index of the
    node, as many devices as `visible`; set_rng_state records where each state went."""

    def __init__(self, visible):
        self.states = {i: torch.tensor([100 + i], dtype=torch.uint8) for i in range(visible)}
        self.restored = []

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index].clone()

    def get_rng_state_all(self):
        return [s.clone() for s in self.states.values()]

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index
        if index not in self.states:
            raise IndexError(f"no cuda:{index}")
        self.restored.append((index, int(state[0])))


def with_fake_cuda(monkeypatch, visible):
    fake = FakeCuda(visible)
    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_a_ranks_cuda_generator_resumes_under_another_gpu_layout(monkeypatch):
    """Written under torchrun (rank 3 on cuda:3 of 8 visible devices), resumed under per-task binding (that rank
    sees one device, cuda:0): its own generator, and only it, is restored onto its device."""
    with_fake_cuda(monkeypatch, visible=8)
    saved = capture_rng_state(torch.device("cuda", 3))
    assert int(saved["cuda"][0]) == 103 and saved["cuda"].dim() == 1  # one device's state, not a list of 8
    resumed = with_fake_cuda(monkeypatch, visible=1)
    restore_rng_state(saved, torch.device("cuda", 0))
    assert resumed.restored == [(0, 103)]
    restore_rng_state(saved, torch.device("cpu"))  # a CPU run keeps only the CPU generators
    assert resumed.restored == [(0, 103)]


def test_an_older_checkpoint_with_every_visible_device_still_resumes(monkeypatch):
    """Checkpoints written before held get_rng_state_all() of every rank: under one visible device the entry of
    that device index is used (the IndexError set_rng_state_all raised is gone); a device beyond the list is left
    as seeded, with a warning."""
    old = with_fake_cuda(monkeypatch, visible=8)
    saved = {**capture_rng_state(), "cuda": old.get_rng_state_all()}
    resumed = with_fake_cuda(monkeypatch, visible=1)
    restore_rng_state(saved, torch.device("cuda", 0))
    assert resumed.restored == [(0, 100)]
    wide = with_fake_cuda(monkeypatch, visible=16)
    restore_rng_state({**saved, "cuda": saved["cuda"][:2]}, torch.device("cuda", 5))
    assert wide.restored == []
