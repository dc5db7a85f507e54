"""Metric logger: window means over steps and ranks, and counts as window totals, read back from TensorBoard event
files."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_torchrun


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("nproc", [1, 2])
def test_window_means_across_steps_and_ranks(tmp_path, nproc):
    run_torchrun(nproc, "tests.metric_logger_worker", str(tmp_path))
    acc = read_events(tmp_path)
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    mean_rank_offset = 10.0 * sum(range(nproc)) / nproc
    assert loss == pytest.approx({3: mean_rank_offset + 2.0, 6: mean_rank_offset + 5.0})
    assert {e.step: e.value for e in acc.Scalars("train/acc")} == pytest.approx({3: 2.0, 6: 5.0})
    # counts are totals of the window, not means: 3 steps x sum over ranks of (r + 1); skipped updates once
    dropped = 3 * sum(r + 1 for r in range(nproc))
    assert {e.step: e.value for e in acc.Scalars("train/dropped")} == pytest.approx({3: dropped, 6: dropped})
    assert {e.step: e.value for e in acc.Scalars("train/skipped")} == pytest.approx({3: 2.0, 6: 0.0})
    assert [e.value for e in acc.Scalars("train/lr")] == [0.5]
    assert all(e.value > 0 for e in acc.Scalars("perf/img_per_s"))
    assert all(0 <= e.value <= 1 for e in acc.Scalars("perf/data_wait_share"))
    assert len(acc.Images("recon")) == 1
    assert "config/text_summary" in acc.Tags()["tensors"]
