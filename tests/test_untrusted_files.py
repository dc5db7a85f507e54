"""Untrusted files: a .pth that pickles a callable is refused by every loader (MAE checkpoint, resume, DeepSpeed
shards, fine-tuning --checkpoint, detector) before anything runs; a safetensors export whose metadata lies about its
architecture is a clear error."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.encoder import read_encoder_source
from finetune.main import main as finetune_main
from pretrain.mae import MaskedAutoencoderViT, get_arch, load_mae_checkpoint
from runtime.checkpoint import STATE_FILE, CheckpointError, load_checkpoint
from runtime.strategy import check_deepspeed_files

from image_data import emotion6_shards


class Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """A checkpoint-shaped file with a payload next to real tensors, and the marker it would create."""
    marker = tmp_path / "payload_ran"
    arch = get_arch("tiny")
    state = {"model": MaskedAutoencoderViT(arch).state_dict(), "schema_version": 1, "step": 5,
             "hook": Payload(marker)}
    path = tmp_path / "evil.pth"
    torch.save(state, path)
    return path, marker


def refused(call, path):
    """The call raises a CheckpointError that says why and names the file (or the directory holding it)."""
    with pytest.raises(CheckpointError, match=r"refused to load: it pickles more than tensors.*system") as e:
        call()
    assert str(path) in str(e.value)


def test_every_loader_refuses_a_pickled_callable(evil, tmp_path):
    path, marker = evil
    refused(lambda: load_mae_checkpoint(MaskedAutoencoderViT(get_arch("tiny")), path), path)  # model.mae_checkpoint
    refused(lambda: read_encoder_source(str(path), "tiny"), path)                            # fine-tune --checkpoint
    run = tmp_path / "run" / "checkpoints" / "step_000000005"
    run.mkdir(parents=True)
    (run / STATE_FILE).write_bytes(path.read_bytes())
    refused(lambda: load_checkpoint(run), run)                                                # resume
    refused(lambda: read_encoder_source(str(tmp_path / "run"), "tiny"), run)                 # a run directory
    shards = tmp_path / "ds"
    shards.mkdir()
    (shards / "mp_rank_00_model_states.pt").write_bytes(path.read_bytes())
    refused(lambda: check_deepspeed_files(shards), shards)                                   # ZeRO shards
    from data_tools.detect import TorchvisionDetector
    refused(lambda: TorchvisionDetector("fasterrcnn_mobilenet_v3_large_320_fpn", str(path)), path)
    assert not marker.exists()  # the payload never ran


def test_finetuning_cli_refuses_it_with_a_clear_error(evil, tmp_path, capsys):
    path, marker = evil
    root = emotion6_shards(tmp_path / "e6", per_class=6, shard_size=40, min_shards=1)
    rc = finetune_main(["--config", "configs/finetune/tiny.yaml", "--dataset", "Emotion6", "--data", str(root),
                        "--checkpoint", str(path), f"run.output_dir={tmp_path / 'ft'}"])
    assert rc == 3 and not marker.exists()
    assert f"CheckpointError: {path}: refused to load" in capsys.readouterr().err


def test_a_real_deepspeed_style_file_still_loads(tmp_path):
    """What DeepSpeed writes (tensors, containers and its loss-scaler record) passes the check."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "state": {0: torch.zeros(3)}},
                "ds_version": "0.19"}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    check_deepspeed_files(tmp_path)


def write_export(tmp_path, arch_meta):
    from pretrain.config import LossConfig, ModelConfig
    from pretrain.engine import export_weights
    from pretrain.model import UniEmoXPretrainer
    model = UniEmoXPretrainer(ModelConfig(preset="tiny", projection="linear"), LossConfig(paired=0, relational=0),
                              512)
    tmp_path.mkdir(parents=True, exist_ok=True)
    good = tmp_path / "weights.safetensors"
    export_weights(model, good, 10)
    lying = tmp_path / "lying.safetensors"
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta = {k: v for k, v in {**f.metadata(), **arch_meta}.items() if v is not None}  # None: drop the key
    save_file(load_file(str(good)), str(lying), metadata=meta)
    return good, lying


def test_safetensors_whose_metadata_lies_about_the_architecture(tmp_path):
    tiny = dataclasses.asdict(get_arch("tiny"))
    good, lying = write_export(tmp_path, {"arch": json.dumps({**tiny, "depth": 7, "embed_dim": 96})})
    _, arch, kind = read_encoder_source(str(good), "vit_b16")
    assert kind == "pretrain-safetensors" and arch == get_arch("tiny")
    with pytest.raises(CheckpointError, match=r"lying.safetensors: its metadata does not match its tensors: "
                                              r"embed_dim declared 96, tensors say 64.*depth declared 7"):
        read_encoder_source(str(lying), "vit_b16")
    for n, garbled_arch in enumerate(("{not json", json.dumps({**tiny, "colour": 3}))):
        _, garbled = write_export(tmp_path / f"g{n}", {"arch": garbled_arch})
        with pytest.raises(CheckpointError, match="its metadata does not describe an architecture"):
            read_encoder_source(str(garbled), "vit_b16")
    # files written before the architecture became one JSON field carry arch.* keys: still read, still checked
    _, legacy = write_export(tmp_path / "old", {"arch": None, **{f"arch.{k}": str(v) for k, v in tiny.items()}})
    assert read_encoder_source(str(legacy), "vit_b16")[1] == get_arch("tiny")
    _, legacy_lying = write_export(tmp_path / "old2", {"arch": None, **{f"arch.{k}": str(v) for k, v in tiny.items()},
                                                       "arch.depth": "7"})
    with pytest.raises(CheckpointError, match="depth declared 7"):
        read_encoder_source(str(legacy_lying), "vit_b16")


def test_classifier_export_with_a_lying_arch(tmp_path):
    """finetune.predict reads the classifier exports: a declared width that its tensors contradict is refused."""
    from finetune.encoder import build_vit
    from finetune.predict import Predictor
    arch = get_arch("tiny")
    model = build_vit(arch, 3, arch.img_size)
    meta = {"format": "uniemox-classifier", "classes": json.dumps(["a", "b", "c"]), "task": "single_label",
            "num_classes": "3", "arch": json.dumps({**vars(arch), "embed_dim": 128}),
            "transform": json.dumps({"input_size": arch.img_size, "interpolation": "bicubic", "crop_pct": 1.0,
                                     "mean": [0.5] * 3, "std": [0.5] * 3})}
    path = tmp_path / "clf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="embed_dim declared 128, tensors say 64"):
        Predictor(str(path))
