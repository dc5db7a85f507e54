"""The temporal job on the training skeleton: 2 gloo ranks with LoRA (DDP and ZeRO) score every test frame once,
train only the adapters and the head and leave the base weights bit-identical; kill -9 in either stage and resume;
stage 2 from stage 1; the feature cache matches the encoder and refuses another one; bad input names its file."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.cache_frames import cache_frames, frame_view
from finetune.config import EncoderConfig
from finetune.encoder import create_encoder
from finetune.metrics import ccc
from finetune.temporal_main import main as temporal_main
from runtime.checkpoint import CheckpointStore, load_checkpoint
from runtime.seeding import seed_everything

from conftest import REPO, clean_env, kill_tree, run_torchrun
from frame_data import clip_shards

TARGET = "finetune/temporal_main.py"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return clip_shards(tmp_path_factory.mktemp("clips"))


def args(root, out, *extra):
    return ["--config", "configs/temporal/tiny.yaml", "--dataset", "toyva", "--data", str(root), "--from-scratch",
            f"run.output_dir={out}", "run.device=cpu", *extra]


def scratch_encoder(seed=0):
    seed_everything(seed)
    return create_encoder(EncoderConfig(from_scratch=True, preset="tiny", drop_path=0.0), 0)[0]


def check_lora_run(out: Path, info: dict) -> None:
    """Every test frame scored once, only adapters and head saved, the base bit-identical to its init."""
    metrics = json.loads((out / "metrics.json").read_text())
    test_frames = info["frames"]["test"]
    assert metrics["world_size"] == 2 and metrics["encoder_mode"] == "lora"
    assert metrics["test"]["clips"] == test_frames["clips"]
    assert metrics["test"]["frames"] == test_frames["frames"] - test_frames["frames_not_annotated"]
    pred = np.load(out / "predictions_test.npz")
    names = sorted({k.split("/")[0] for k in pred.files})
    assert len(names) == test_frames["clips"] and sum(len(pred[f"{n}/pred"]) for n in names) == test_frames["frames"]
    p = np.concatenate([pred[f"{n}/pred"][pred[f"{n}/valid"]] for n in names])
    t = np.concatenate([pred[f"{n}/true"][pred[f"{n}/valid"]] for n in names])
    assert metrics["test"]["valence"]["ccc"] == pytest.approx(ccc(p[:, 0], t[:, 0]), abs=1e-6)
    refs = metrics["references"]
    assert refs["clip-mean oracle"]["ccc_per_clip"] == pytest.approx(0.0, abs=1e-9)
    assert refs["train-mean constant"]["ccc"] == pytest.approx(0.0, abs=1e-9)
    assert "frames shuffled at test" in refs
    best = load_file(str(out / "best.safetensors"))
    assert best and all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in best)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in best.items())  # the adapters trained
    model = load_checkpoint(out)["model"]
    base = scratch_encoder().state_dict()
    for key, value in base.items():
        moved = "encoder." + key.replace("attn.qkv.", "attn.qkv.base.")
        assert torch.equal(model[moved], value), key
    for figure in ("va_plane", "curves", "embeddings_pca", "training"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure


def test_two_rank_lora_under_ddp_and_zero_scores_every_frame_once(clips, tmp_path):
    info = json.loads((clips / "info.json").read_text())
    lora = ["temporal.encoder_mode=lora", "temporal.lora_blocks=0", "train.epochs=2"]
    run_torchrun(2, TARGET, *args(clips, tmp_path / "ddp", *lora))
    check_lora_run(tmp_path / "ddp", info)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "ddp" / "tb"), size_guidance={"images": 0}).Reload()
    assert {"test/va_plane", "test/curves"} <= set(events.Tags()["images"])
    run_torchrun(2, TARGET, *args(clips, tmp_path / "zero", *lora, "train.strategy=deepspeed",
                                  f"train.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"), timeout=400)
    check_lora_run(tmp_path / "zero", info)


def kill_after(cmd, out: Path, step: int) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and (store.latest() is None or load_checkpoint(store.latest())["step"] < step):
        time.sleep(0.1)
    kill_tree(proc.pid)
    return load_checkpoint(out)["step"]


def test_kill9_in_either_stage_then_resume_and_stage2_from_stage1(clips, tmp_path):
    # stage 1 (LoRA + projector, queue of 100): 8 steps of 4 windows x 8 frames
    one = args(clips, tmp_path / "s1", "train.stage=1", "temporal.encoder_mode=lora", "contrastive.queue=100",
               "train.epochs=4", "run.ckpt_every=3")
    killed = kill_after([sys.executable, TARGET, *one, "debug.step_sleep_s=0.4"], tmp_path / "s1", 3)
    assert 3 <= killed < 8
    queue = load_checkpoint(tmp_path / "s1")["states"]["queue"]
    assert (queue["filled"], queue["ptr"]) == (min(100, 32 * killed), 32 * killed % 100)
    assert temporal_main(one) == 0  # resumed in this process
    final = load_checkpoint(tmp_path / "s1")
    assert final["step"] == 8 and final["states"]["queue"]["ptr"] == 32 * 8 % 100  # the queue came back, then went on
    stage1 = load_file(str(tmp_path / "s1" / "stage1.safetensors"))
    assert any(k.startswith("projector.") for k in stage1) and any(".lora_B." in k for k in stage1)
    # stage 2 from it, killed mid-run and resumed: every epoch evaluated once
    two = args(clips, tmp_path / "s2", "temporal.encoder_mode=lora", f"temporal.stage1={tmp_path / 's1'}",
               "train.epochs=4", "run.ckpt_every=3")
    killed = kill_after([sys.executable, TARGET, *two, "debug.step_sleep_s=0.4"], tmp_path / "s2", 3)
    assert temporal_main(two) == 0
    metrics = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert killed < metrics["final_step"] == 8 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    best = load_file(str(tmp_path / "s2" / "best.safetensors"))
    assert set(stage1) < set(best)  # the stage-1 weights, trained on, plus the new head


def test_feature_cache_matches_the_encoder_and_refuses_another(clips, tmp_path, capfd):
    cache = tmp_path / "cache"
    seed_everything(0)  # the scratch weights of a run with run.seed=0
    identity = cache_frames("toyva", str(clips), EncoderConfig(from_scratch=True, preset="tiny", drop_path=0.0),
                            str(cache), dtype="float32")
    stats = json.loads(next((cache / "test").glob("*_stats.json")).read_text())
    assert stats["encoder"] == identity and stats["frames"] > 0
    # the cached features are the encoder's pooled output of the evaluation view of each frame
    import webdataset as wds
    from data_tools.images import load_rgb
    from PIL import Image
    import io
    shard = sorted((clips / "test").glob("*.tar"))[0]
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    cached = next(iter(wds.WebDataset(str(cache / "test" / shard.name), shardshuffle=False)))
    assert cached["__key__"] == sample["__key__"]
    feats = np.load(io.BytesIO(cached["feats.npy"]))
    encoder, view = scratch_encoder().eval(), frame_view(32)
    with torch.no_grad():
        frames = torch.stack([view(load_rgb(Image.open(io.BytesIO(sample[f"f{i:04d}.jpg"]))))
                              for i in range(len(feats))])
        assert np.abs(encoder(frames).numpy() - feats).max() < 1e-5
    # a cached run trains from it
    out = tmp_path / "cached"
    assert temporal_main(args(clips, out, "temporal.encoder_mode=cached", f"data.cache={cache}",
                              "train.epochs=2", "temporal.shuffle_control=false")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["encoder_mode"] == "cached" and metrics["test"]["frames"] > 0
    assert all(k.startswith("head.") for k in load_file(str(out / "best.safetensors")))
    # another encoder's cache, and an incomplete one, are refused before anything trains
    capfd.readouterr()
    assert temporal_main(args(clips, tmp_path / "other", "temporal.encoder_mode=cached", f"data.cache={cache}",
                              "run.seed=1")) == 3
    err = capfd.readouterr().err
    assert "made by another encoder" in err and "weights_sha256" in err
    next((cache / "val").glob("*_stats.json")).unlink()
    capfd.readouterr()
    assert temporal_main(args(clips, tmp_path / "gap", "temporal.encoder_mode=cached", f"data.cache={cache}")) == 3
    err = capfd.readouterr().err
    assert "lacks features for 1 of" in err and "val/" in err


def test_full_fine_tuning_trains_every_encoder_weight_with_layer_decay(clips, tmp_path):
    out = tmp_path / "full"
    assert temporal_main(args(clips, out, "temporal.encoder_mode=full", "train.epochs=1",
                              "temporal.shuffle_control=false", "temporal.head=mean_pool")) == 0
    best = load_file(str(out / "best.safetensors"))
    init = scratch_encoder().state_dict()
    assert {f"encoder.{k}" for k in init} <= set(best)  # the whole encoder is the run's
    assert not torch.equal(best["encoder.blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    # timm's layer decay on the encoder's groups; the head at the full lr; every trained weight in one group
    from finetune.temporal_config import TemporalConfig
    from finetune.temporal_model import assemble_clip_model, param_groups
    from runtime.config import load_config
    cfg = load_config(TemporalConfig, str(out / "config.yaml"), [])
    model = assemble_clip_model(cfg)[0]
    groups = param_groups(model, cfg.temporal, 0.05)
    scales = [g.get("lr_scale", 1.0) for g in groups]
    assert min(scales) == pytest.approx(0.75 ** 3) and max(scales) == 1.0  # tiny: 2 blocks, embeddings at depth 0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_bad_input_names_what_is_wrong(clips, tmp_path, capfd):
    assert temporal_main(args(clips, tmp_path / "a", "--dataset", "afew")) == 3
    err = capfd.readouterr().err
    assert "does not match the shards" in err and "toyva" in err
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "info.json").write_text(json.dumps({"dataset": "toyva", "kind": "images", "splits": {}}))
    capfd.readouterr()
    assert temporal_main(args(tmp_path / "images", tmp_path / "b")) == 3
    assert "kind 'images', expected 'frames'" in capfd.readouterr().err
    capfd.readouterr()
    assert temporal_main(args(clips, tmp_path / "c", "temporal.encoder_mode=cached")) == 2  # no data.cache
