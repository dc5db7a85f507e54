"""A 2-rank run's process group and its gloo threads are gone once shutdown() returns, even when torch._dynamo is
first imported after the group started (it used to keep the group alive until interpreter finalization, where a
gloo thread releasing Python-owned tensors aborted the process: "terminate called without an active exception")."""
import json

from conftest import run_torchrun


def test_no_gloo_thread_outlives_shutdown(tmp_path):
    run_torchrun(2, "tests.exit_worker", str(tmp_path))
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"threads_rank{rank}.json").read_text())
        assert threads == ["python"], (rank, threads)  # no pt_gloo_runloop / gloo_tcp_loop left
