"""A 2-rank run's process groups and their gloo threads are gone once shutdown() returns, even when torch._dynamo is
first imported after the group started, and after DeepSpeed ZeRO-2 steps (both used to keep groups alive until
interpreter finalization, where a gloo thread releasing Python-owned tensors can abort the process: "terminate
called without an active exception")."""
import json
import logging

import torch.distributed as dist

from conftest import run_torchrun
from runtime import distributed


def test_no_gloo_thread_outlives_shutdown(tmp_path):
    for mode in ("late_import", "deepspeed"):
        run_torchrun(2, "tests.exit_worker", str(tmp_path), mode)
        for rank in (0, 1):
            threads = json.loads((tmp_path / f"{mode}_threads_rank{rank}.json").read_text())
            assert threads == ["python"], (mode, rank, threads)  # no pt_gloo_runloop / gloo_tcp_loop left


def test_a_failing_release_still_tears_the_groups_down(monkeypatch, caplog):
    for var in distributed.TORCHRUN_VARS:  # init_distributed exports them; undone after the test
        monkeypatch.setenv(var, "0")
    distributed.init_distributed(distributed.DistEnv(0, 0, 1, "127.0.0.1", 0, "single"), always=True)
    released = []

    def broken_release():
        raise RuntimeError("engine already gone")

    distributed.release_at_shutdown(lambda: released.append("registered first"))
    distributed.release_at_shutdown(broken_release)
    with caplog.at_level(logging.ERROR, logger="runtime.distributed"):
        distributed.shutdown()
    assert not dist.is_initialized() and released == ["registered first"]
    assert "release at shutdown failed" in caplog.text and "engine already gone" in caplog.text


def test_gloo_threads_create_no_thread_states_while_training(tmp_path):
    """A gloo thread that creates a Python thread state takes CPython's thread-list lock without the GIL (Python
    < 3.12): a loader worker forked then hangs in fork. With init_distributed, gloo threads keep one state each, so
    DDP or ZeRO-2 steps (DeepSpeed's own gloo group included) and collectives create none; with a bare
    init_process_group they create one per finished work."""
    for mode in ("runtime", "deepspeed", "plain"):
        run_torchrun(2, "tests.gloo_state_worker", str(tmp_path), mode)
    for rank in (0, 1):
        created = {mode: json.loads((tmp_path / f"{mode}_rank{rank}.json").read_text())["created"]
                   for mode in ("runtime", "deepspeed", "plain")}
        # the bare group is the control: its count varies with which gloo thread completes each work (as few as 8)
        assert created["runtime"] == 0 and created["deepspeed"] == 0 and created["plain"] > 0, (rank, created)
