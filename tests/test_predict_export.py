"""Using the encoder: predict CLI on real image files, zero-shot against a hand computation, timm reload of exports."""
import csv
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from runtime.distributed import resolve_env
from finetune.config import EncoderConfig, FinetuneConfig
from finetune.encoder import create_encoder
from finetune.data import patch_timm_posterize
from finetune.engine import Finetuning
from finetune.export import TIMM_BASE, export_classifier, export_encoder, read_export
from finetune.predict import Predictor, main as predict_main
from finetune.zeroshot import TEMPLATES, evaluate, read_labels
from pretrain.config import LossConfig, ModelConfig
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher
from runtime.checkpoint import CheckpointStore
from runtime.config import config_to_dict, load_config

from conftest import REPO, TINY_CLIP
from image_data import E6, bad_files, emotion6_shards, jpeg_bytes, photo_crop



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Emotion6-shaped shards, a tiny pretraining checkpoint, its teacher's weights, and a fine-tuned run."""
    root = tmp_path_factory.mktemp("use")
    emotion6_shards(root, per_class=12, shard_size=100, min_shards=1)
    torch.manual_seed(0)
    teacher = CLIPTeacher(TINY_CLIP, "random")
    torch.save(teacher.model.state_dict(), root / "clip.pt")
    model_cfg = ModelConfig(preset="tiny")
    pre = UniEmoXPretrainer(model_cfg, LossConfig(), teacher.embed_dim)
    cfg = {"model": config_to_dict(model_cfg), "teacher": {"arch": TINY_CLIP, "checkpoint": "random"}}
    CheckpointStore(root / "pre" / "checkpoints").save(3, {"model": pre.state_dict(), "step": 3, "config": cfg})
    ft_cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml",
                         ["data.dataset=Emotion6", f"data.root={root / 'shards'}", f"run.output_dir={root / 'ft'}",
                          f"encoder.checkpoint={root / 'pre'}", "train.epochs=2", "data.num_workers=0",
                          "data.batch_size=8"])
    patch_timm_posterize()  # what finetune/main.py does before training with RandAugment
    Finetuning(ft_cfg, resolve_env()).run()
    return {"root": root, "teacher": teacher, "pre": pre}


def test_predict_folder_and_bad_inputs(setup, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(5):
        (images / f"p{i}.jpg").write_bytes(jpeg_bytes(photo_crop(100 + i, 48, tint=i % 6, n_tints=6)))
    (images / "notes.txt").write_text("skipped: not an image extension")
    (images / "truncated.jpg").write_bytes(bad_files()["truncated.jpg"])
    (images / "empty.jpg").write_bytes(bad_files()["empty.jpg"])
    (tmp_path / "page.jpg").write_bytes(bad_files()["page.jpg"])
    out = tmp_path / "preds.csv"
    assert predict_main(["--checkpoint", str(setup["root"] / "ft"), str(images), str(tmp_path / "page.jpg"),
                         "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8  # 5 good + truncated + empty + page; the .txt is not an image file
    by_name = {r["input"].split("/")[-1]: r for r in rows}
    assert by_name["truncated.jpg"]["status"] == "failed" and "decode_error" in by_name["truncated.jpg"]["reason"]
    assert by_name["page.jpg"]["reason"].startswith("not_an_image")
    assert by_name["empty.jpg"]["reason"] == "empty: 0-byte file"  # the reason once, then what it means
    assert all(r["reason"].count(r["reason"].split(":")[0]) == 1 for r in rows if r["status"] == "failed")
    jsonl = tmp_path / "preds.jsonl"
    assert predict_main(["--checkpoint", str(setup["root"] / "ft"), str(images / "p*.jpg"), "--out", str(jsonl),
                         "--topk", "6"]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 5
    for r in records:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [r[f"score{k}"] for k in range(1, 7)] == sorted(r["probabilities"].values(), reverse=True)
        assert r["label1"] == max(r["probabilities"], key=r["probabilities"].get)


def test_predict_errors(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert predict_main(["--checkpoint", str(setup["root"] / "ft"), str(tmp_path / "empty")]) == 2
    assert "no images found under" in capsys.readouterr().err
    assert predict_main(["--checkpoint", str(setup["root"] / "pre"), str(tmp_path)]) == 2
    assert "no classification head" in capsys.readouterr().err
    encoder_file = export_encoder(str(setup["root"] / "pre"), str(tmp_path / "enc.safetensors"))
    assert predict_main(["--checkpoint", str(encoder_file), str(tmp_path)]) == 2
    assert "has no classification head" in capsys.readouterr().err
    (tmp_path / "labels.txt").write_text("joy\nfear\n\nanger\n")
    with pytest.raises(ValueError, match="labels.txt:3: blank line"):
        read_labels(str(tmp_path / "labels.txt"))
    (tmp_path / "labels.txt").write_text("joy\nfear\njoy\n")
    with pytest.raises(ValueError, match="labels.txt:3: label 'joy' repeats line 1"):
        read_labels(str(tmp_path / "labels.txt"))


def test_zero_shot_matches_a_hand_computation(setup, tmp_path):
    result = evaluate(str(setup["root"] / "pre"), setup["teacher"], "Emotion6", str(setup["root"] / "shards"),
                      str(tmp_path))
    # by hand: no masking, the whole image as the person crop, decoder_embed projection, fusion, cosine with the
    # mean of the normalised template embeddings
    from finetune.data import LabelledTransform, eval_loader, make_transforms, resolve_dataset
    from finetune.config import AugmentConfig, FinetuneDataConfig
    info = resolve_dataset("Emotion6", str(setup["root"] / "shards"), tmp_path)
    _, tf = make_transforms(32, AugmentConfig())
    loader = eval_loader(info, "test", LabelledTransform(tf, "single_label", 6),
                         FinetuneDataConfig(dataset="Emotion6", num_workers=0))
    pre, teacher = setup["pre"].eval(), setup["teacher"]
    text = []
    for c in E6:
        e = F.normalize(teacher.model.encode_text(teacher.tokenize([t.format(c) for t in TEMPLATES])).float(), dim=-1)
        text.append(F.normalize(e.mean(0), dim=-1))
    text = torch.stack(text)
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            latent, _, _ = pre.mae.forward_encoder(torch.cat([x, x]), 0.0)
            cls = pre.mae.decoder_embed(latent[:, 0])
            z = F.normalize(pre.fusion(cls[:len(x)], cls[len(x):]), dim=-1)
            correct += ((z @ text.T).argmax(1) == batch["target"]).sum().item()
            total += len(x)
    assert result["test"]["n"] == total == 12 and result["test"]["top1"] == pytest.approx(correct / total)


def test_zero_shot_writes_beside_its_run_and_never_overwrites_silently(setup, capsys):
    from finetune.zeroshot import main as zeroshot_main
    args = ["--checkpoint", str(setup["root"] / "pre"), "--dataset", "Emotion6", "--data",
            str(setup["root"] / "shards"), "--teacher-checkpoint", str(setup["root"] / "clip.pt")]
    out = setup["root"] / "pre" / "zeroshot_Emotion6" / "zeroshot.json"
    assert zeroshot_main(args) == 0 and out.is_file()
    first = out.read_bytes()
    capsys.readouterr()
    assert zeroshot_main(args) == 2
    assert capsys.readouterr().err.strip() == f"error: {out} exists: give another --out, or --overwrite to replace it"
    assert out.read_bytes() == first
    assert zeroshot_main([*args, "--overwrite"]) == 0
    assert json.loads(out.read_text())["test"]["top1"] == json.loads(first)["test"]["top1"]
    assert zeroshot_main([*args, "--teacher-only"]) == 0
    assert (setup["root"] / "pre" / "zeroshot_Emotion6_teacher" / "zeroshot.json").is_file()


def test_exports_reload_in_timm(setup, tmp_path):
    # the encoder of a pretraining run
    path = export_encoder(str(setup["root"] / "pre"), str(tmp_path / "encoder.safetensors"))
    _, meta = read_export(str(path))
    args = json.loads(meta["timm_model_args"])
    ours, _, _ = create_encoder(EncoderConfig(checkpoint=str(setup["root"] / "pre")), 0)
    theirs = timm.create_model(TIMM_BASE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
                               num_classes=0, **args)
    x = torch.randn(2, 3, 32, 32)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    # the fine-tuned classifier, head and class names included
    path = export_classifier(str(setup["root"] / "ft"), str(tmp_path / "classifier.safetensors"))
    _, meta = read_export(str(path))
    assert json.loads(meta["classes"]) == E6 and meta["task"] == "single_label"
    overlay = json.loads(meta["timm_pretrained_cfg"])
    timm_model = timm.create_model(TIMM_BASE, pretrained=True, num_classes=6,
                                   pretrained_cfg_overlay=dict(file=str(path), **overlay),
                                   **json.loads(meta["timm_model_args"])).eval()
    # timm's own preprocessing call gives the export's transform, not the base name's 224 px and mean/std 0.5
    transform = json.loads(meta["transform"])
    resolved = timm.data.resolve_data_config({}, model=timm_model)
    assert tuple(resolved["input_size"]) == (3, transform["input_size"], transform["input_size"]) == (3, 32, 32)
    assert resolved["mean"] == pytest.approx(transform["mean"]) and resolved["std"] == pytest.approx(transform["std"])
    assert resolved["crop_pct"] == transform["crop_pct"] and resolved["interpolation"] == "bicubic"
    plain = timm.data.resolve_data_config({}, model=timm.create_model(TIMM_BASE, pretrained=False, num_classes=6,
                                                                      **json.loads(meta["timm_model_args"])))
    assert plain["mean"] != resolved["mean"] and plain["input_size"] != resolved["input_size"]
    predictor = Predictor(str(path))
    with torch.no_grad():
        assert (predictor.model(x) - timm_model(x)).abs().max() < 1e-5
        assert predictor.model(x).abs().sum() > 0


def test_finetuning_starts_from_an_encoder_export(setup, tmp_path):
    path = export_encoder(str(setup["root"] / "pre"), str(tmp_path / "encoder.safetensors"))
    model, arch, kind = create_encoder(EncoderConfig(checkpoint=str(path)), 6)
    assert kind == "export" and arch.embed_dim == 64
    assert torch.equal(model.blocks[0].mlp.fc1.weight, setup["pre"].mae.blocks[0].mlp.fc1.weight)
