"""No host sync on a training step that does not log: every call that would wait for a GPU is counted with a
TorchFunctionMode over real runs (pretraining with DDP and ZeRO-2, fine-tuning), and over hand-written calls."""
import json

import pytest
import torch

from runtime.host_sync import HostSyncCounter

from conftest import run_torchrun
from image_data import emotion6_shards
from pretrain_fixtures import make_pretrain_shards, pretrain_args


def test_the_counter_sees_each_kind_of_host_read_and_attributes_it():
    device = torch.device("cpu")
    x = torch.randn(4)
    with HostSyncCounter(device) as counter:
        x.sum().item(), x.tolist(), float(x[0]), bool(x[0] > 0), int(x[1] > 0), x.numpy(), x.cpu()
        x.to("cpu"), x[x > 0], torch.tensor([1.0], device=device), x.nonzero()
        x.to(device), x + 1, torch.zeros(3, device=device), torch.tensor([2.0])  # none of these waits
    assert [c["call"] for c in counter.calls] == ["item", "tolist", "__float__", "__bool__", "__int__", "numpy",
                                                  "cpu", "to(cpu)", "boolean mask", "tensor", "nonzero"]
    assert counter.counts["project"] == 11 and all(c["where"].startswith("test_host_syncs.py:")
                                                   for c in counter.calls)
    with HostSyncCounter(device) as counter:
        torch.nn.utils.get_total_norm([torch.ones(3), torch.ones(2)])  # torch's own `to` its inputs' device
    assert counter.counts["project"] == 0


def sync_records(run_dir):
    rows = {}
    for path in sorted((run_dir / "host_syncs").glob("rank*.jsonl")):
        rows[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def assert_quiet_steps_do_not_sync(run_dir, total_steps):
    rows = sync_records(run_dir)
    assert sorted(rows) == ["rank0", "rank1"]
    for rank, records in rows.items():
        assert [r["step"] for r in records] == list(range(1, total_steps + 1)), rank
        quiet = [r for r in records if r["quiet"]]
        assert len(quiet) >= total_steps // 2, rank
        assert [(r["step"], r["calls"]) for r in quiet if r["project"]] == [], rank
        loud = [r for r in records if not r["quiet"]]
        assert all(r["project"] > 0 for r in loud if r["step"] % 5 == 0)  # the log steps do read the device
    return rows


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pretrain_shards(tmp_path_factory.mktemp("sync_data"))


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_pretraining_steps_between_logs_never_wait_for_the_device(shards, tmp_path, strategy):
    """10 steps per epoch, log every 5, checkpoint every 10, images every 10, a NaN on rank 1 at step 3 (its update
    is skipped on the device, and reported at the next sync): quiet steps 2-4 and 6-9 count 0 project calls;
    DeepSpeed's own step() reads the device and is counted apart."""
    extra = ["train.epochs=1", "run.ckpt_every=10", "debug.count_host_syncs=true", "debug.nan_steps=[3]",
             "debug.nan_rank=1"]
    if strategy == "zero2":
        extra += ["train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"]
    out = tmp_path / strategy
    run_torchrun(2, *pretrain_args(shards, out, *extra))
    result = json.loads((out / "result.json").read_text())
    assert result["skipped_steps"] == 1 and result["ranks_in_sync"]
    rows = assert_quiet_steps_do_not_sync(out, 10)
    deepspeed_calls = sum(r["deepspeed"] for r in rows["rank0"] if r["quiet"])
    assert (deepspeed_calls > 0) == (strategy == "zero2")


def test_finetuning_steps_between_logs_never_wait_for_the_device(tmp_path):
    data = emotion6_shards(tmp_path / "e6", per_class=20, shard_size=30, min_shards=2)
    out = tmp_path / "ft"
    run_torchrun(2, "finetune/main.py", "--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6", "--data",
                 str(data), f"run.output_dir={out}", "--from-scratch", "data.batch_size=8", "train.epochs=2",
                 "run.log_every=5", "debug.count_host_syncs=true")
    steps = json.loads((out / "metrics.json").read_text())["final_step"]
    assert steps >= 10
    assert_quiet_steps_do_not_sync(out, steps)
