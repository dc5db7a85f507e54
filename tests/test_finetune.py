"""Fine-tuning: 2-rank DDP beats chance, encoders load from every source, linear probe, multi-label and
regression heads with metrics recomputed by sklearn / by hand, kill -9 resume, and the errors bad input gets."""
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from sklearn.metrics import average_precision_score, f1_score

from data_tools.registry import UnknownDatasetError
from data_tools.schema import encode_record, make_record
from runtime.distributed import resolve_env
from finetune.config import EncoderConfig, FinetuneConfig
from finetune.encoder import create_encoder
from finetune.linear_probe import LinearProbe
from finetune.main import main as finetune_main
from finetune.metrics import ccc, compute_metrics
from pretrain.config import LossConfig, ModelConfig, TeacherConfig
from pretrain.teacher import teacher_embed_dim
from pretrain.model import UniEmoXPretrainer
from runtime.checkpoint import CheckpointError, CheckpointStore, load_checkpoint
from runtime.config import load_config

from conftest import REPO, TINY_CLIP, clean_env, kill_tree, run_torchrun, torchrun_cmd
from image_data import emotion6_shards, jpeg_bytes, make_class_tree, photo_crop
from pretrain_fixtures import make_pretrain_shards
from test_mae import official_state_dict



@pytest.fixture(scope="module")
def emotion6(tmp_path_factory):
    """Emotion6-shaped shards: 6 classes x 40 tinted photo crops (the tint makes the classes learnable)."""
    return emotion6_shards(tmp_path_factory.mktemp("e6"), per_class=40, shard_size=30, min_shards=2)


def ft_args(root, out, *extra):
    return ["finetune/main.py", "--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6", "--data", str(root),
            f"run.output_dir={out}", "data.batch_size=16", *extra]


def test_two_rank_finetune_beats_chance(emotion6, tmp_path):
    out = tmp_path / "ft"
    run_torchrun(2, *ft_args(emotion6, out, "--from-scratch", "train.epochs=8"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["task"] == "single_label"
    assert metrics["test"]["top1"] > 1 / 6 + 0.3, metrics["test"]
    best_val = max(h["val_top1"] for h in metrics["history"])
    assert metrics["val"]["top1"] == best_val  # the tested weights are the first epoch that reached the best val
    assert metrics["best_epoch"] == min(h["epoch"] for h in metrics["history"] if h["val_top1"] == best_val)
    # every reported number is recomputed from the saved predictions
    pred = np.load(out / "predictions_test.npz")
    labels = pred["targets"].astype(int)
    assert len(labels) == metrics["test"]["n"] == 48 and len(set(pred["keys"].tolist())) == 48
    assert metrics["test"]["top1"] == pytest.approx((pred["outputs"].argmax(1) == labels).mean())
    assert metrics["test"]["macro_f1"] == pytest.approx(f1_score(labels, pred["outputs"].argmax(1), average="macro"))
    assert (out / "confusion_test.csv").read_text().startswith("true\\predicted,anger,disgust")
    assert (out / "best.safetensors").is_file()


def test_kill9_then_resume_ends_at_the_same_step(emotion6, tmp_path):
    out = tmp_path / "ft"
    args = ft_args(emotion6, out, "--from-scratch", "train.epochs=4", "run.ckpt_every=3")
    proc = subprocess.Popen(torchrun_cmd(2, *args, "debug.step_sleep_s=0.3"), cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = CheckpointStore(out / "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and (store.latest() is None or load_checkpoint(store.latest())["step"] < 3):
        time.sleep(0.1)
    kill_tree(proc.pid)
    killed_at = load_checkpoint(out)["step"]
    run_torchrun(2, *args)
    metrics = json.loads((out / "metrics.json").read_text())
    steps_per_epoch = json.loads((emotion6 / "info.json").read_text())["splits"]["train"]["samples"] // (16 * 2)
    assert killed_at < metrics["final_step"] == 4 * steps_per_epoch
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]  # each epoch evaluated once, none lost


def test_encoder_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    pre = UniEmoXPretrainer(ModelConfig(preset="tiny"), LossConfig(),
                            teacher_embed_dim(TeacherConfig(checkpoint="random", arch=TINY_CLIP)))
    cfg = {"model": {"preset": "tiny", "img_size": 32}, "teacher": {"arch": TINY_CLIP}}
    CheckpointStore(tmp_path / "run" / "checkpoints").save(7, {"model": pre.state_dict(), "step": 7, "config": cfg})
    model, arch, kind = create_encoder(EncoderConfig(checkpoint=str(tmp_path / "run")), 6)
    assert kind == "pretrain" and arch.embed_dim == 64 and model.head.out_features == 6
    assert torch.equal(model.blocks[1].attn.qkv.weight, pre.mae.blocks[1].attn.qkv.weight)
    assert torch.equal(model.pos_embed, pre.mae.pos_embed)
    # at another input size the position embeddings are resampled
    model48, _, _ = create_encoder(EncoderConfig(checkpoint=str(tmp_path / "run"), img_size=48), 6)
    assert model48.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(model48.pos_embed[:, 0], pre.mae.pos_embed[:, 0])
    # a run that kept an EMA of its weights (train.ema_decay) gives the EMA, as its weights.safetensors does
    ema = {k: v + 1.0 for k, v in pre.state_dict().items()}
    CheckpointStore(tmp_path / "ema" / "checkpoints").save(7, {"model": pre.state_dict(), "step": 7, "config": cfg,
                                                              "states": {"ema": ema}})
    averaged, _, _ = create_encoder(EncoderConfig(checkpoint=str(tmp_path / "ema")), 6)
    assert torch.equal(averaged.blocks[1].attn.qkv.weight, ema["mae.blocks.1.attn.qkv.weight"])


def test_encoder_errors(tmp_path):
    from pretrain.mae import get_arch
    torch.save({"model": official_state_dict(get_arch("tiny"), with_decoder=False)}, tmp_path / "mae_tiny.pth")
    model, _, kind = create_encoder(EncoderConfig(checkpoint=str(tmp_path / "mae_tiny.pth"), preset="tiny"), 3)
    assert kind == "mae"
    with pytest.raises(CheckpointError) as e:  # a ViT-B/16 asked to take tiny weights
        create_encoder(EncoderConfig(checkpoint=str(tmp_path / "mae_tiny.pth"), preset="vit_b16"), 3)
    assert "mismatched shapes ['cls_token (checkpoint (1, 1, 64) vs model (1, 1, 768))'" in str(e.value)
    with pytest.raises(ValueError, match="exactly one of encoder.checkpoint"):
        create_encoder(EncoderConfig(), 3)
    with pytest.raises(CheckpointError, match="encoder checkpoint not found"):
        create_encoder(EncoderConfig(checkpoint=str(tmp_path / "none.pth")), 3)


def write_task_shards(root: Path, task: str, n: int = 120):
    """Shards whose targets are multi-hot labels or valence/arousal, derived from the image tint."""
    classes = ["warm", "cool", "bright"]
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 3), ("test", n // 3)):
        (root / split).mkdir(parents=True)
        with wds.TarWriter(str(root / split / "00000.tar")) as w:
            for i in range(count):
                tint = int(rng.integers(0, 3))
                extra = {"labels": [int(tint == 0 or tint == 2), int(tint == 1), int(tint == 2)]} \
                    if task == "multi_label" else {"valence": float(tint - 1), "arousal": float(tint) / 2}
                record = make_record(dataset="toy", split=split, source=f"{i}", width=40, height=40, label=tint,
                                     emotion=classes[tint], **extra)
                w.write({"__key__": f"{split}_{i:05d}", "jpg": jpeg_bytes(photo_crop(i, 40, tint=tint, n_tints=3)),
                         "json": encode_record(record)})
        (root / split / "sizes.json").write_text(json.dumps({"00000.tar": count}))
    info = {"dataset": "toy", "task": task, "classes": classes,
            "splits": {s: {"samples": c, "shards": 1} for s, c in (("train", n), ("val", n // 3), ("test", n // 3))}}
    (root / "info.json").write_text(json.dumps(info))
    return root


@pytest.mark.parametrize("task", ["multi_label", "regression"])
def test_multilabel_and_regression_heads(tmp_path, task):
    root = write_task_shards(tmp_path / "data", task)
    out = tmp_path / "run"
    assert finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "toy", "--data", str(root),
                          "--from-scratch", f"run.output_dir={out}", "train.epochs=6", "data.num_workers=0",
                          "aug.auto_augment=null"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    pred = np.load(out / "predictions_test.npz")
    outputs, targets = pred["outputs"], pred["targets"]
    if task == "multi_label":
        expected = np.mean([average_precision_score(targets[:, j], outputs[:, j]) for j in range(3)])
        assert metrics["test"]["mAP"] == pytest.approx(expected)
        assert metrics["test"]["mAP"] > 0.6
    else:
        def hand_ccc(x, y):
            return 2 * np.cov(x, y, bias=True)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
        per = [hand_ccc(outputs[:, i], targets[:, i]) for i in range(2)]
        assert metrics["test"]["ccc_valence"] == pytest.approx(per[0], abs=1e-6)
        assert metrics["test"]["ccc"] == pytest.approx(np.mean(per), abs=1e-6)
        assert metrics["test"]["ccc"] > 0.1
        history = [h["val_ccc"] for h in metrics["history"]]
        assert max(history[-2:]) > history[0] + 0.05  # the head learns


def test_metric_functions_against_references():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    m = compute_metrics("single_label", logits, labels, ["a", "b", "c", "d"])
    assert m["macro_f1"] == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))
    top3 = np.mean([labels[i] in np.argsort(-logits[i])[:3] for i in range(50)])
    assert m["top3"] == pytest.approx(top3)
    x, y = rng.normal(size=200), rng.normal(size=200) * 0.5 + 0.3
    x = x - x.mean()
    assert ccc(x, x) == pytest.approx(1.0) and ccc(x, -x) == pytest.approx(-1.0)  # -1 needs equal means: centred x
    expected = 2 * np.mean((x - x.mean()) * (y - y.mean())) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert ccc(x, y) == pytest.approx(expected)


def test_linear_probe(emotion6, tmp_path):
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml",
                      ["data.dataset=Emotion6", f"data.root={emotion6}", f"run.output_dir={tmp_path}",
                       "encoder.from_scratch=true", "train.mode=linear_probe", "train.probe_epochs=30",
                       "data.num_workers=0", "train.probe_lrs=[0.01,0.1,1.0]"])
    result = LinearProbe(cfg, resolve_env()).run()
    assert result["best_lr"] in (0.01, 0.1, 1.0) and set(result["val_by_lr"]) == {"0.01", "0.1", "1.0"}
    assert result["val"]["top1"] == max(result["val_by_lr"].values())
    assert result["test"]["top1"] > 1 / 6 + 0.2  # random frozen features still separate tints linearly


def test_bad_input(emotion6, tmp_path, capsys):
    assert finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "FJ", "--data",
                          str(tmp_path / "folder"), "--from-scratch", f"run.output_dir={tmp_path / 'a'}"]) == 3
    (tmp_path / "folder").mkdir()
    make_class_tree(tmp_path / "folder", ["anger", "boredom"], per_class=2, size=16)
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'FJ'; registered: FI, Emotion6, UBE, CAER-S"):
        from finetune.data import resolve_dataset
        resolve_dataset("FJ", str(tmp_path / "folder"), tmp_path / "run")
    rc = finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6", "--data",
                        str(tmp_path / "folder"), "--from-scratch", f"run.output_dir={tmp_path / 'b'}"])
    assert rc == 3
    rc = finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "FI", "--data", str(emotion6),
                        "--from-scratch", f"run.output_dir={tmp_path / 'c'}"])
    assert rc == 3
    # shards of another dataset: a registered name, an unknown one, a generic one — each an error naming both
    rc = finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "FOO", "--data", str(emotion6),
                        "--from-scratch", f"run.output_dir={tmp_path / 'd'}"])
    assert rc == 3 and not (tmp_path / "d" / "metrics.json").exists()
    err = capsys.readouterr().err
    assert "class folder 'boredom' is not a class of Emotion6" in err
    assert "--dataset 'FI' does not match the shards in" in err and "which hold 'Emotion6'" in err
    assert "unknown dataset 'FOO'; registered: FI, Emotion6" in err and "hold 'Emotion6' (pass --dataset Emotion6)" in err
    from finetune.data import resolve_dataset
    generic = make_pretrain_shards(tmp_path / "toy", per_class=10, shards=2)  # shards of the generic 'toy'
    with pytest.raises(ValueError, match="--dataset 'Emotion6' does not match .* which hold 'toy'"):
        resolve_dataset("Emotion6", str(Path(generic).parent.parent), tmp_path / "run")
    crawled = tmp_path / "crawled"  # unlabelled web shards (data_tools crawl): pretraining only
    crawled.mkdir()
    (crawled / "info.json").write_text(json.dumps({"dataset": "web", "task": "unlabelled", "classes": [],
                                                   "splits": {"train": {"samples": 4}}}))
    with pytest.raises(ValueError, match=r"crawled/info.json: task 'unlabelled' cannot be fine-tuned on"):
        resolve_dataset("web", str(crawled), tmp_path / "run")
