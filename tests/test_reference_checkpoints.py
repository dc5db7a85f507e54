"""The reference code's checkpoint files (MAE's misc.save_model: model, optimizer, epoch, scaler, a pickled
argparse.Namespace) read as they are: a models_vit classifier gives the logits of an independent forward of the
same weights; MAE pretraining files initialise fine-tuning and pretraining; anything else pickled is refused."""
import argparse
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from data_tools.registry import REGISTRY
from finetune.classifier import open_classifier
from finetune.config import EncoderConfig
from finetune.encoder import create_encoder
from finetune.export import main as export_main, read_export
from pretrain.config import LossConfig, ModelConfig
from pretrain.mae import get_arch
from pretrain.model import UniEmoXPretrainer
from runtime.checkpoint import CheckpointError

from test_mae import official_state_dict

FI = REGISTRY["FI"].classes


def models_vit_state(depth=12, dim=768, heads=12, patch=16, img=64, classes=8, seed=0):
    """A fine-tuned models_vit.VisionTransformer(global_pool=True) state dict: timm's names plus fc_norm and the
    `norm` its forward skips when it pools."""
    g = torch.Generator().manual_seed(seed)
    n = (img // patch) ** 2 + 1

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std
    state = {"cls_token": r(1, 1, dim), "pos_embed": r(1, n, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
             "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                      b + "attn.qkv.bias": r(3 * dim), b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                      b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                      b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                      b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    state.update({"norm.weight": 1 + r(dim), "norm.bias": r(dim), "fc_norm.weight": 1 + r(dim),
                  "fc_norm.bias": r(dim), "head.weight": r(classes, dim), "head.bias": r(classes)})
    return state


def reference_forward(state, x, heads=12, patch=16):
    """models_vit.VisionTransformer.forward with global_pool, written out: patchify, cls + pos, pre-norm blocks,
    mean of the patch tokens, fc_norm, head."""
    dim = state["cls_token"].shape[-1]
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], 1) + state["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        def p(name):
            return state[f"blocks.{i}.{name}"]
        h = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = (h @ p("attn.qkv.weight").T + p("attn.qkv.bias")).chunk(3, -1)
        split = [z.reshape(len(x), -1, heads, dim // heads).transpose(1, 2) for z in (q, k, v)]
        att = (split[0] @ split[1].transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
        a = (att @ split[2]).transpose(1, 2).reshape(len(x), -1, dim)
        t = t + a @ p("attn.proj.weight").T + p("attn.proj.bias")
        h = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        t = t + F.gelu(h @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    pooled = F.layer_norm(t[:, 1:].mean(1), (dim,), state["fc_norm.weight"], state["fc_norm.bias"], eps=1e-6)
    return pooled @ state["head.weight"].T + state["head.bias"]


def save_like_misc_save_model(path, model_state, model_name, input_size, nb_classes=8):
    """What MAE's util/misc.save_model writes (to_save = model, optimizer, epoch, scaler, args)."""
    args = argparse.Namespace(model=model_name, input_size=input_size, nb_classes=nb_classes, global_pool=True,
                              batch_size=64, blr=5e-4, layer_decay=0.65, output_dir="./output_dir", dataset="FI")
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": [0]}]}
    torch.save({"model": model_state, "optimizer": optimizer, "epoch": 49, "scaler": {"scale": 65536.0},
                "args": args}, path)


def test_a_reference_classifier_gives_the_reference_forwards_logits(tmp_path, caplog):
    state = models_vit_state()
    path = tmp_path / "checkpoint-best.pth"
    save_like_misc_save_model(path, state, "vit_base_patch16", 64)
    with caplog.at_level(logging.INFO):
        clf = open_classifier(str(path), FI)
    assert "ignored: norm.bias, norm.weight; lacking: none" in caplog.text
    assert clf.classes == list(FI) and clf.model.patch_embed.img_size == (64, 64)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = clf.model(x), reference_forward(state, x)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert (ours.argmax(1) == ref.argmax(1)).all()
    # the same weights as an export, then opened again: identical logits
    out = tmp_path / "fi.safetensors"
    assert export_main([str(path), "--dataset", "FI", "--out", str(out)]) == 0
    _, meta = read_export(str(out))
    assert meta["dataset"] == "" and meta["num_classes"] == "8"
    with torch.no_grad():
        assert torch.equal(open_classifier(str(out)).model(x), ours)


def test_a_reference_classifier_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "ck.pth"
    save_like_misc_save_model(path, models_vit_state(classes=6), "vit_base_patch16", 64)
    with pytest.raises(CheckpointError, match="its head has 6 outputs, the dataset has 8 classes"):
        open_classifier(str(path), FI)
    with pytest.raises(CheckpointError, match="does not name its classes: pass --dataset"):
        open_classifier(str(path))
    from finetune.encoder import reference_arch
    assert reference_arch({"model": "mae_vit_large_patch16_dec512d8b"}, "tiny", path) == get_arch("vit_l16")
    save_like_misc_save_model(path, models_vit_state(), "vit_tiny_patch4", 64)
    with pytest.raises(CheckpointError, match="args.model 'vit_tiny_patch4' is not one of"):
        open_classifier(str(path), FI)


def test_reference_pretraining_files_initialise_finetuning_and_pretraining(tmp_path, caplog):
    arch = get_arch("tiny")
    state = official_state_dict(arch, with_decoder=True)
    path = tmp_path / "checkpoint-199.pth"
    save_like_misc_save_model(path, state, None, 32)  # args without a model name: encoder.preset decides
    with caplog.at_level(logging.INFO):
        model, _, kind = create_encoder(EncoderConfig(checkpoint=str(path), preset="tiny"), 8)
    assert kind == "mae"
    assert "ignored (not the encoder's): decoder_blocks.* (" in caplog.text and "norm.* (2)" in caplog.text
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    pre = UniEmoXPretrainer(ModelConfig(preset="tiny", mae_checkpoint=str(path)), LossConfig(), 32)
    assert torch.equal(pre.mae.decoder_pred.weight, state["decoder_pred.weight"])
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    save_like_misc_save_model(path, encoder_only, None, 32)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        UniEmoXPretrainer(ModelConfig(preset="tiny", mae_checkpoint=str(path)), LossConfig(), 32)
    lacking = caplog.text.split("lacking (initialised fresh): ")[1].split(";")[0].split(", ")
    counts = [int(x.split("(")[1].rstrip(")")) if "(" in x else 1 for x in lacking]
    assert sum(counts) == len(state) - len(encoder_only)  # exactly the decoder's tensors, each named
    assert "mask_token" in lacking and "decoder_blocks.* (12)" in lacking


def test_a_reference_file_pickling_anything_else_is_refused(tmp_path):
    import pathlib
    path = tmp_path / "evil.pth"
    torch.save({"model": models_vit_state(depth=1, dim=32, heads=2), "args": argparse.Namespace(model=None),
                "output_dir": pathlib.PurePosixPath("out")}, path)  # any class but the Namespace
    with pytest.raises(CheckpointError, match="refused to load"):
        open_classifier(str(path), FI)
