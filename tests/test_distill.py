"""CLIP teacher, distillation losses and the pretrainer: formulas, frozen teacher, overfit, the teacher as data
(made in the batch preparation or read from the cache), the cache command and its checks."""
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_tools.folder import shard_folder
from data_tools.samples import ImageOptions
from data_tools.tars import read_tar
from pretrain.cache_teacher import center_view, main as cache_main
from pretrain.config import LossConfig, ModelConfig, TeacherConfig
from pretrain.losses import paired_similarity, relational_similarity
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher, TeacherError

from conftest import TINY_CLIP, run_torchrun
from image_data import make_class_tree



@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return CLIPTeacher(TINY_CLIP, "random")


def batch_for(teacher, n=4, seed=0, person=True):
    g = torch.Generator().manual_seed(seed)
    texts = [f"The overall emotion conveyed is {e}." for e in ["awe", "fear", "joy", "anger", "sadness"][:n]]
    batch = {"image": torch.randn(n, 3, 32, 32, generator=g), "text": teacher.tokenize(texts),
             "noise": torch.rand(2 * n if person else n, 16, generator=g)}
    batch.update(clip_image=teacher.encode_image(batch["image"]), clip_text=teacher.encode_text(batch["text"]))
    if person:
        batch["person"] = torch.randn(n, 3, 32, 32, generator=g)
    return batch


def pretrainer(teacher, fusion="sum_ln_elu", **weights):
    losses = LossConfig(**{"mae": 1.0, "paired": 1.0, "relational": 1.0, **weights})
    return UniEmoXPretrainer(ModelConfig(preset="tiny", fusion=fusion), losses, teacher.embed_dim)


def test_teacher_reloads_from_a_file_and_stays_frozen(teacher, tmp_path):
    torch.save(teacher.model.state_dict(), tmp_path / "tiny_clip.pt")
    again = CLIPTeacher(TINY_CLIP, str(tmp_path / "tiny_clip.pt"))
    images, tokens = torch.randn(2, 3, 32, 32), teacher.tokenize(["a photo", "a scene"])
    assert torch.equal(again.encode_image(images), teacher.encode_image(images))
    assert torch.equal(again.encode_text(tokens), teacher.encode_text(tokens))
    again.train()
    assert not again.training and not again.model.training
    assert not any(p.requires_grad for p in again.parameters())


def test_hub_names_fail_fast_with_advice():
    with pytest.raises(TeacherError, match="names a hub download; this system never downloads weights.*"
                                           "teacher.checkpoint=/path/to/that/file"):
        CLIPTeacher("ViT-B-16", "openai")
    with pytest.raises(TeacherError, match="teacher checkpoint not found: /nowhere/clip.bin"):
        CLIPTeacher("ViT-B-16", "/nowhere/clip.bin")
    with pytest.raises(TeacherError, match="hf-hub"):
        CLIPTeacher("hf-hub:timm/ViT-B-16-SigLIP", "random")


def test_clip_normalisation_and_truncation(teacher):
    pixels = torch.rand(2, 3, 32, 32)
    imagenet = (pixels - teacher.in_mean) / teacher.in_std
    expected = (pixels - torch.tensor(teacher.model.visual.image_mean).view(1, 3, 1, 1)) / \
        torch.tensor(teacher.model.visual.image_std).view(1, 3, 1, 1)
    assert torch.allclose(teacher.to_clip_input(imagenet), expected, atol=1e-5)
    tokens = teacher.tokenize(["The main subjects are " + ", ".join(["dog"] * 200) + "."])
    assert tokens.shape == (1, 32) and tokens[0, -1].item() == 49407  # truncated, ends with end-of-text


def test_loss_formulas_on_hand_built_tensors():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    cos = torch.tensor([2 ** -0.5, 1.0, 0.0])
    assert paired_similarity(z, v).item() == pytest.approx(1 - cos.mean().item())
    # with texts = the basis, A = z and C = v (row-normalised): L1 = 1 - mean cos(z_i, v_i) = L2
    t = torch.eye(2)
    assert relational_similarity(z, v, t).item() == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    # a general case against the formula written out, and invariance to the logit scale
    torch.manual_seed(0)
    z, v, t = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    zn, vn, tn = (F.normalize(x, dim=-1) for x in (z, v, t))
    a, c = 100 * zn @ tn.T, 100 * vn @ tn.T
    expected = 1 - ((a * c).sum(1) / (a.norm(dim=1) * c.norm(dim=1))).mean()
    assert relational_similarity(z, v, t, scale=100.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert relational_similarity(z, v, t, scale=1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert relational_similarity(v, v, t).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_student_never_teacher(teacher):
    torch.manual_seed(0)
    model = pretrainer(teacher)
    out = model(batch_for(teacher))
    assert set(out.terms) == {"mae", "paired", "relational"}
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-6)
    out.loss.backward()
    assert model.mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.mae.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())  # not saved with the student


@pytest.mark.parametrize("terms", [("mae",), ("paired",), ("relational",), ("mae", "paired", "relational")])
def test_overfits_one_batch(teacher, terms):
    torch.manual_seed(0)
    weights = {k: (1.0 if k in terms else 0.0) for k in ("mae", "paired", "relational")}
    model = pretrainer(teacher, **weights)
    batch = batch_for(teacher, person="paired" in terms or "relational" in terms)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(20):
        out = model(batch)
        assert set(out.terms) == set(terms)  # a term with weight 0 is not computed
        optim.zero_grad()
        out.loss.backward()
        optim.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    if terms == ("mae",):
        assert all(p.grad is None for p in model.fusion.parameters())


def test_a_live_teacher_is_data_made_in_the_batch_preparation(tmp_path):
    """The pretraining job with a live teacher: the student holds no teacher (none of its parameters, buffers or
    state), and the prepared batch brings the teacher's embeddings of its normalised scene view and of its text,
    the fields a teacher cache brings; with no distillation term no teacher is built at all."""
    from pretrain.config import PretrainConfig
    from pretrain.data import normalize_views
    from pretrain.engine import Pretraining
    from runtime.config import load_config
    from runtime.distributed import resolve_env
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=4, size=40)
    shard_folder("toy", str(tmp_path / "src"), str(tmp_path / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=8, min_shards=1, options=ImageOptions(detector="none"))
    overrides = [f"data.train=[{tmp_path / 'shards' / 'train' / '00000.tar'}]", "data.num_workers=0",
                 "data.batch_size=4", "train.ema_decay=0.9"]
    job = Pretraining(load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                                  [*overrides, f"run.output_dir={tmp_path / 'live'}"]), resolve_env())
    teacher = job.teacher
    assert teacher is not None and not teacher.training
    held = {id(t) for t in (*job.model.parameters(), *job.model.buffers(), *job.ema.module.parameters())}
    assert not any(id(t) in held for t in (*teacher.parameters(), *teacher.buffers()))
    assert not any("teacher" in k for k in (*job.model.state_dict(), *job.ema.state_dict()))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
             "person": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
             "text": teacher.tokenize(["awe", "fear", "joy", "anger"])}
    prepared = job.prepare(dict(batch))
    image = normalize_views(dict(batch))["image"]
    assert torch.equal(prepared["clip_image"], teacher.encode_image(image))
    assert torch.equal(prepared["clip_text"], teacher.encode_text(batch["text"]))
    loss = job.forward(job.strategy.model, prepared)[0]
    assert loss.isfinite() and all(p.grad is None for p in teacher.parameters())
    mae_only = Pretraining(load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                                       [*overrides, f"run.output_dir={tmp_path / 'mae'}", "loss.paired=0",
                                        "loss.relational=0"]), resolve_env())
    assert mae_only.teacher is None and "clip_image" not in mae_only.prepare(dict(batch))


def test_scene_only_and_projection_choices(teacher):
    model = pretrainer(teacher, fusion="scene_only")
    batch = batch_for(teacher, person=False)
    out = model(batch)  # no person crop needed, encoder runs on the scene only
    assert set(out.terms) == {"mae", "paired", "relational"}
    with pytest.raises(ValueError, match=r"decoder width \(48\) to equal the teacher's embedding width \(32\); "
                                         r"use model.projection=linear"):
        UniEmoXPretrainer(ModelConfig(preset="tiny", decoder_embed_dim=48), LossConfig(), teacher.embed_dim)
    linear = UniEmoXPretrainer(ModelConfig(preset="tiny", decoder_embed_dim=48, projection="linear"),
                               LossConfig(), teacher.embed_dim)
    assert linear.proj.weight.shape == (32, 64) and linear(batch_for(teacher)).loss.isfinite()
    with pytest.raises(ValueError, match="every loss weight is 0"):
        pretrainer(teacher, mae=0.0, paired=0.0, relational=0.0)


def test_cache_teacher_command(teacher, tmp_path, capfd):
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=6, size=40)
    shard_folder("toy", str(tmp_path / "src"), str(tmp_path / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=5, min_shards=1, options=ImageOptions(detector="none"))
    torch.save(teacher.model.state_dict(), tmp_path / "clip.pt")
    args = ["--shards", str(tmp_path / "shards" / "train" / "{00000..00002}.tar"), "--teacher-arch", TINY_CLIP,
            "--teacher-checkpoint", str(tmp_path / "clip.pt"), "--out", str(tmp_path / "cache"), "--batch-size", "4",
            "--dtype", "float32"]
    assert cache_main(args) == 0
    view = center_view(32)
    for shard in range(3):
        source, _ = read_tar(tmp_path / "shards" / "train" / f"{shard:05d}.tar")
        cache, error = read_tar(tmp_path / "cache" / f"{shard:05d}.tar")
        assert error is None and set(cache) == set(source)
        for key, files in source.items():
            record = json.loads(files["json"])
            image = view(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))[None]
            v = np.load(io.BytesIO(cache[key]["clip_image.npy"]))
            t = np.load(io.BytesIO(cache[key]["clip_text.npy"]))
            assert np.allclose(v, teacher.encode_image(image)[0].numpy(), atol=1e-5)
            assert np.allclose(t, teacher.encode_text(teacher.tokenize([record["text"]]))[0].numpy(), atol=1e-5)
    stats = json.loads((tmp_path / "cache" / "00000_stats.json").read_text())
    assert stats["samples"] == 4 and stats["dim"] == 32  # 12 images dealt evenly into 3 shards
    before = os.stat(tmp_path / "cache" / "00001.tar").st_mtime_ns
    os.unlink(tmp_path / "cache" / "00002_stats.json")
    assert cache_main(args) == 0  # resumable per shard: only the shard without its marker is redone
    assert os.stat(tmp_path / "cache" / "00001.tar").st_mtime_ns == before
    assert (tmp_path / "cache" / "00002_stats.json").is_file()

    # the cache records its teacher: the same teacher.* passes, another one (same width) is refused naming both
    from pretrain.cache_teacher import check_teacher_cache
    same = TeacherConfig(checkpoint=str(tmp_path / "clip.pt"), arch=TINY_CLIP)
    sources = [[str(tmp_path / "shards" / "train" / f"{i:05d}.tar") for i in range(3)]]
    check_teacher_cache(str(tmp_path / "cache"), same, sources)
    torch.save(teacher.model.state_dict(), tmp_path / "other.pt")
    other = TeacherConfig(checkpoint=str(tmp_path / "other.pt"), arch=TINY_CLIP)
    with pytest.raises(ValueError, match=r"was made by the teacher .*clip.pt.*but this run's teacher.* is .*other.pt"):
        check_teacher_cache(str(tmp_path / "cache"), other, sources)
    from pretrain.main import main as pretrain_main
    rc = pretrain_main(["--config", "configs/pretrain/tiny.yaml",
                        f"data.train=[{tmp_path / 'shards' / 'train' / '{00000..00002}.tar'}]",
                        f"run.output_dir={tmp_path / 'run'}", f"teacher.cache={tmp_path / 'cache'}",
                        f"teacher.checkpoint={tmp_path / 'other.pt'}",
                        f"teacher.arch={TINY_CLIP}", "data.num_workers=0", "data.batch_size=4"])
    assert rc == 3 and not (tmp_path / "run" / "checkpoints").exists()
    # a cache that is not there is a config error (exit 2) naming the key and the command that makes it; one that
    # covers only some shards is refused before the model is built, naming the command that completes it (it resumes)
    cached_run = ["--config", "configs/pretrain/tiny.yaml",
                  f"data.train=[{tmp_path / 'shards' / 'train' / '{00000..00002}.tar'}]",
                  f"run.output_dir={tmp_path / 'run2'}", f"teacher.checkpoint={tmp_path / 'clip.pt'}",
                  f"teacher.arch={TINY_CLIP}", "data.num_workers=0", "data.batch_size=4"]
    capfd.readouterr()
    assert pretrain_main([*cached_run, f"teacher.cache={tmp_path / 'nowhere'}"]) == 2
    err = capfd.readouterr().err
    assert f"teacher.cache={tmp_path / 'nowhere'} is not a directory: make it with `python -m pretrain.cache_teacher" \
           in err and "unset teacher.cache to run the teacher in every step" in err
    os.unlink(tmp_path / "cache" / "00001_stats.json")
    assert pretrain_main([*cached_run, f"teacher.cache={tmp_path / 'cache'}"]) == 3
    err = capfd.readouterr().err
    assert f"teacher.cache={tmp_path / 'cache'} lacks the teacher's outputs for 1 of 3 shards of data.train " \
           f"(e.g. 00001.tar): run `python -m pretrain.cache_teacher --shards" in err and "Traceback" not in err
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_the_cache_split_over_ranks_is_the_one_process_cache(teacher, tmp_path):
    """torchrun with 2 ranks: rank 0 embeds shards 0, 2, 4, rank 1 shards 1, 3, each decoding in its loader workers;
    together they write byte for byte what one process writes, and a rerun finds nothing left to do."""
    make_class_tree(tmp_path / "src", ["a", "b"], per_class=10, size=40)
    shard_folder("toy", str(tmp_path / "src"), str(tmp_path / "shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=4, min_shards=5, options=ImageOptions(detector="none"))
    torch.save(teacher.model.state_dict(), tmp_path / "clip.pt")

    def args(out):
        return ["--shards", str(tmp_path / "shards" / "train" / "{00000..00004}.tar"), "--teacher-arch", TINY_CLIP,
                "--teacher-checkpoint", str(tmp_path / "clip.pt"), "--out", str(out), "--batch-size", "3",
                "--workers", "2"]
    assert cache_main(args(tmp_path / "one")) == 0
    proc = run_torchrun(2, "pretrain.cache_teacher", *args(tmp_path / "two"))
    text = proc.stdout + proc.stderr  # (rank 1 logs warnings only; its progress bar shows its share)
    assert "rank 0 of 2, 3 shards, 12 samples" in text and "teacher cache (rank 1): 100%" in text
    assert "| 2/2 [" in text.split("teacher cache (rank 1): 100%")[1]
    for shard in range(5):
        name = f"{shard:05d}.tar"
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
        assert json.loads((tmp_path / "two" / f"{shard:05d}_stats.json").read_text())["samples"] == 4
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()}
    run_torchrun(2, "pretrain.cache_teacher", *args(tmp_path / "two"))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").iterdir()} == before


def test_a_loss_term_is_declared_once_in_the_registry(teacher, monkeypatch):
    """A new term is its registry entry plus a config weight of the same name: the model computes and weighs it, and
    whether it needs the teacher comes from its declaration, not from a list of names elsewhere."""
    from dataclasses import dataclass

    from pretrain.losses import LOSS_TERMS, LossTerm, loss_weights, needs_teacher

    @dataclass
    class WithNorm(LossConfig):
        student_norm: float = 0.0

    monkeypatch.setitem(LOSS_TERMS, "student_norm", LossTerm(lambda out: out["reconstruction"] * 0 + 0.5,
                                                             needs_teacher=False))
    only_new = WithNorm(mae=0.0, paired=0.0, relational=0.0, student_norm=2.0)
    assert loss_weights(only_new)["student_norm"] == 2.0 and not needs_teacher(loss_weights(only_new))
    with pytest.raises(ValueError, match=r"loss terms \['student_norm'\] have no weight in LossConfig"):
        loss_weights(LossConfig())
    mixed = WithNorm(mae=1.0, paired=0.0, relational=0.0, student_norm=2.0)
    model = UniEmoXPretrainer(ModelConfig(preset="tiny"), mixed, 32)
    assert not model.distill  # no term that reads the teacher is on: no teacher, no person branch
    out = model(batch_for(teacher, person=False))
    assert set(out.terms) == {"mae", "student_norm"} and out.terms["student_norm"].item() == 0.5
    assert out.loss.item() == pytest.approx(out.terms["mae"].item() + 2.0 * 0.5, rel=1e-6)
    assert needs_teacher({"mae": 1.0, "paired": 0.5, "relational": 0.0})
    assert not needs_teacher({"mae": 1.0, "paired": 0.0, "relational": 0.0})
