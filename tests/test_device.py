"""What a rank runs on: a GPU asked for and missing is an error at start, bf16 only where it has tensor cores (fp16
with loss scaling elsewhere), loader workers from the CPUs a rank may use, per-block torch.compile."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import LossConfig, ModelConfig, TeacherConfig
from pretrain.teacher import teacher_embed_dim
from pretrain.model import UniEmoXPretrainer
from runtime.checkpoint import load_checkpoint
from runtime.device import DeviceError, compile_blocks, cpus_per_rank, loader_workers, resolve_device
from runtime.distributed import DistEnv
from runtime.precision import resolve_precision

from conftest import REPO, TINY_CLIP, clean_env
from pretrain_fixtures import make_pretrain_shards, pretrain_args

ENV = DistEnv(0, 3, 4, "127.0.0.1", 29500, "torchrun")


def test_a_gpu_asked_for_and_missing_is_an_error_naming_what_asked():
    assert resolve_device(ENV, "auto", "auto", {}) == torch.device("cpu")  # nothing asked for a GPU
    with pytest.raises(DeviceError, match=r"run.device=cuda, but torch .* sees no CUDA device"):
        resolve_device(ENV, "cuda", "auto", {})
    with pytest.raises(DeviceError, match=r"Slurm gave this job GPUs \(SLURM_GPUS_ON_NODE=8\).*run.device=cpu"):
        resolve_device(ENV, "auto", "auto", {"SLURM_GPUS_ON_NODE": "8"})
    with pytest.raises(DeviceError, match=r"SLURM_JOB_GPUS=0,1"):
        resolve_device(ENV, "auto", "fp32", {"SLURM_GPUS_PER_NODE": "0", "SLURM_JOB_GPUS": "0,1"})
    for precision in ("bf16", "fp16"):
        with pytest.raises(DeviceError, match=f"train.precision={precision} expects a GPU"):
            resolve_device(ENV, "auto", precision, {})
    # on purpose: the CPU, whatever was asked for
    assert resolve_device(ENV, "cpu", "bf16", {"SLURM_GPUS_ON_NODE": "8"}) == torch.device("cpu")
    assert resolve_device(ENV, "auto", "auto", {"SLURM_GPUS_PER_NODE": "0"}) == torch.device("cpu")


def test_precision_follows_the_gpu_generation(monkeypatch):
    """A stand-in for torch.cuda's capability query (no GPU here): Ampere and later get bf16, Volta/Turing fp16
    with loss scaling, and an explicit bf16 there is refused."""
    capability = {"cap": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("auto", torch.device("cpu")) == "fp32"
    capability["cap"] = (7, 0)
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("fp32", cuda) == "fp32"
    with pytest.raises(ValueError, match=r"bf16 on Tesla V100-SXM2-32GB \(compute capability 7.0\).*fp16"):
        resolve_precision("bf16", cuda)


def test_loader_workers_come_from_the_cpus_a_rank_may_use():
    assert cpus_per_rank({"SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": "8"}) == (
        8, "SLURM_CPUS_PER_TASK=64 / 8 local rank(s)")
    assert loader_workers("auto", {"SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": "8"}) == 6  # (6 + 2) x 8 = 64
    assert loader_workers("auto", {"SLURM_CPUS_PER_TASK": "10"}) == 8  # a submitit task: its CPUs are its own
    assert loader_workers("auto", {"SLURM_CPUS_PER_TASK": "4", "LOCAL_WORLD_SIZE": "8"}) == 1  # never 0
    import os
    assert cpus_per_rank({})[0] == len(os.sched_getaffinity(0))
    assert loader_workers(3, {"SLURM_CPUS_PER_TASK": "64"}) == 3


def test_a_run_on_a_node_without_the_gpus_slurm_promised_fails_before_anything_is_written(tmp_path):
    shards = make_pretrain_shards(tmp_path / "data", per_class=4, shards=2)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, *pretrain_args(shards, out)], cwd=REPO, capture_output=True, text=True,
                          env=clean_env(SLURM_GPUS_ON_NODE="4"), timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "DeviceError: Slurm gave this job GPUs (SLURM_GPUS_ON_NODE=4)" in proc.stderr
    assert not out.exists()


def test_fp16_trains_with_a_grad_scaler_whose_state_resumes(tmp_path):
    """fp16 autocast with torch's GradScaler (here on the CPU, on purpose: run.device=cpu): the losses fall, the
    scaler's state is in the checkpoint and a resumed run carries it on."""
    shards = make_pretrain_shards(tmp_path / "data")
    out = tmp_path / "run"
    fp16 = ["train.precision=fp16", "run.device=cpu"]
    subprocess.run([sys.executable, *pretrain_args(shards, out, "train.epochs=1", *fp16)], cwd=REPO,
                   env=clean_env(), check=True, capture_output=True, timeout=300)
    saved = load_checkpoint(out)["scaler"]  # the scale halves at each overflow; the tracker counts steps since
    assert load_checkpoint(out)["step"] == 20 and 0 < saved["scale"] <= 65536 and 0 < saved["_growth_tracker"] <= 20
    subprocess.run([sys.executable, *pretrain_args(shards, out, "train.epochs=1.5", *fp16)], cwd=REPO,
                   env=clean_env(), check=True, capture_output=True, timeout=300)
    resumed = load_checkpoint(out)
    assert resumed["step"] == 30
    # carried on from the saved state: 10 more steps on the same scale, or a smaller one after an overflow (a new
    # scaler would be back at 65536 with a tracker of at most 10)
    assert (resumed["scaler"]["scale"] == saved["scale"] and resumed["scaler"]["_growth_tracker"] ==
            saved["_growth_tracker"] + 10) or resumed["scaler"]["scale"] < saved["scale"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_compiled_blocks_give_the_eager_step():
    """train.compile on the tiny preset (inductor on the CPU): loss and gradients of one step equal eager's."""
    torch.manual_seed(0)
    model = UniEmoXPretrainer(ModelConfig(preset="tiny"), LossConfig(),
                              teacher_embed_dim(TeacherConfig(checkpoint="random", arch=TINY_CLIP)))
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "person": torch.randn(8, 3, 32, 32, generator=g),
             "clip_image": F.normalize(torch.randn(8, 32, generator=g), dim=-1),
             "clip_text": F.normalize(torch.randn(8, 32, generator=g), dim=-1), "noise": torch.rand(16, 16, generator=g)}

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    eager_loss, eager_grads = step()
    assert compile_blocks(model.mae.blocks, model.mae.decoder_blocks) == 3
    compiled_loss, compiled_grads = step()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert len(compiled_grads) == len(eager_grads)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(compiled_grads, eager_grads))


def test_only_the_views_take_deepspeeds_bf16_and_cached_targets_stay_fp32():
    """Moving a batch keeps every dtype; the job's prepare casts the image views to the dtype DeepSpeed's bf16 weights
    need, and nothing else (cached teacher embeddings, the losses' targets, stay fp32)."""
    from pretrain.data import normalize_views
    from runtime.device import to_device
    batch = {"image": torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8),
             "person": torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8),
             "clip_image": torch.randn(2, 4), "clip_text": torch.randn(2, 4), "key": ["a", "b"]}
    moved = to_device(batch, torch.device("cpu"))
    assert {k: v.dtype for k, v in moved.items() if torch.is_tensor(v)} == {
        "image": torch.uint8, "person": torch.uint8, "clip_image": torch.float32, "clip_text": torch.float32}
    prepared = normalize_views(moved, torch.bfloat16)
    assert prepared["image"].dtype == prepared["person"].dtype == torch.bfloat16
    assert prepared["clip_image"].dtype == torch.float32 and torch.equal(prepared["clip_image"], batch["clip_image"])
