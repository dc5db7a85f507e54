"""`python -m finetune.export RUN --out FILE`: weights for timm users, as self-describing safetensors.

A pretraining run gives the encoder (timm ViT names, no head); a fine-tuning run gives the classifier of its best
epoch with its class names, task and evaluation transform. Either loads with timm:

    meta = safe_open(FILE, "pt").metadata()
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=int(meta["num_classes"]),
                              pretrained_cfg_overlay=dict(file=FILE, **json.loads(meta["timm_pretrained_cfg"])),
                              **json.loads(meta["timm_model_args"]))
    timm.data.resolve_data_config({}, model=model)  # the export's own input size, mean/std, crop_pct, interpolation
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from data_tools.registry import SINGLE_LABEL, get_dataset
from finetune.encoder import arch_from_metadata, build_vit, load_classifier, read_encoder_source, to_timm_keys
from pretrain.mae import MAEArch, arch_metadata
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD
from runtime.atomic import atomic_save_safetensors
from runtime.checkpoint import CheckpointError
from runtime.cli import HelpFormatter, with_one_line_errors

REFERENCE_CROP_PCT = 224 / 256  # MAE's evaluation transform: resize to 256, centre crop 224
TIMM_BASE = "vit_base_patch16_224"  # any timm ViT name works: the model arguments below define the architecture


def timm_model_args(arch: MAEArch, img_size: Optional[int] = None) -> Dict[str, Any]:
    return {"img_size": img_size or arch.img_size, "patch_size": arch.patch_size, "embed_dim": arch.embed_dim,
            "depth": arch.depth, "num_heads": arch.num_heads, "mlp_ratio": arch.mlp_ratio, "qkv_bias": True,
            "global_pool": "avg"}



def timm_pretrained_cfg(img_size: int, num_classes: int, crop_pct: float = 0.875) -> Dict[str, Any]:
    """What timm's pretrained_cfg_overlay needs so `resolve_data_config` gives this export's evaluation transform
    (the base name's own cfg says 224 px and mean/std 0.5); crop_pct 0.875 for an encoder, timm's default."""
    return {"num_classes": num_classes, "input_size": [3, img_size, img_size], "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def export_encoder(source: str, out: str, preset: str = "vit_b16") -> Path:
    state, arch, kind = read_encoder_source(source, preset)
    if kind == "reference-classifier":
        raise CheckpointError(f"{source} is a fine-tuned classifier: pass --dataset NAME (its benchmark) to export it "
                              f"as a classifier")
    if kind == "finetune":
        raise CheckpointError(f"{source} is a fine-tuning run: export it as a classifier (finetune.export picks that "
                              f"for run directories with best.safetensors)")
    meta = {"format": "uniemox-encoder", "source": str(source), "num_classes": "0",
            **arch_metadata(arch), "timm_model_args": json.dumps(timm_model_args(arch)),
            "timm_pretrained_cfg": json.dumps(timm_pretrained_cfg(arch.img_size, 0))}
    tensors = to_timm_keys(state)
    # the pooled-feature LayerNorm a fine-tuning model starts with (1, 0), so timm loads the file strictly
    tensors["fc_norm.weight"], tensors["fc_norm.bias"] = torch.ones(arch.embed_dim), torch.zeros(arch.embed_dim)
    return atomic_save_safetensors(tensors, Path(out), meta)


def classifier_bundle(run_dir: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The best-validation weights of a fine-tuning run and the metadata prediction needs."""
    run = Path(run_dir)
    best, metrics_file = run / "best.safetensors", run / "metrics.json"
    if not best.is_file() or not metrics_file.is_file():
        raise CheckpointError(f"{run} is not a finished fine-tuning or linear-probe run (best.safetensors and "
                              f"metrics.json needed)")
    import yaml
    with safe_open(str(best), "pt") as f:
        best_meta = f.metadata() or {}
    state = load_file(str(best))
    # the architecture: in best.safetensors' metadata (runs of earlier versions: in their checkpoint)
    arch = arch_from_metadata(best_meta, best) if "arch" in best_meta else read_encoder_source(str(run), "vit_b16")[1]
    metrics = json.loads(metrics_file.read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    img_size = int(round((state["pos_embed"].shape[1] - 1) ** 0.5)) * arch.patch_size
    meta = classifier_meta(arch, img_size, metrics["classes"], metrics["task"], metrics["dataset"],
                           cfg["aug"]["crop_pct"], str(run), metrics.get("continuous", []))
    meta["test_metrics"] = json.dumps({k: v for k, v in metrics["test"].items() if isinstance(v, float)})
    return state, meta


def classifier_meta(arch: MAEArch, img_size: int, classes: Sequence[str], task: str, dataset: str, crop_pct: float,
                    source: str, continuous: Sequence[str] = ()) -> Dict[str, str]:
    """The metadata of an exported classifier: what predict, eval and timm need besides the weights
    (`continuous`: the values its head predicts after the classes, EMOTIC's V/A/D)."""
    return {"format": "uniemox-classifier", "source": source, "num_classes": str(len(classes) + len(continuous)),
            "classes": json.dumps(list(classes)), "continuous": json.dumps(list(continuous)), "task": task,
            "dataset": dataset, **arch_metadata(arch),
            "timm_model_args": json.dumps(timm_model_args(arch, img_size)),
            "transform": json.dumps({"input_size": img_size, "crop_pct": crop_pct, "interpolation": "bicubic",
                                     "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}),
            "timm_pretrained_cfg": json.dumps(timm_pretrained_cfg(img_size, len(classes) + len(continuous),
                                                                  crop_pct))}


def reference_bundle(path: str, classes: Sequence[str], task: str = SINGLE_LABEL, preset: str = "vit_b16"
                     ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """A reference (MAE / UniEmoX models_vit) fine-tuned classifier .pth and the metadata it lacks: the classes
    (its head's order is the dataset's), the task and MAE's evaluation transform."""
    state, arch, kind = read_encoder_source(path, preset)  # args.model names the architecture, else preset
    if kind != "reference-classifier":
        raise CheckpointError(f"{path} is not a fine-tuned classifier (no head.weight): give a fine-tuning run, an "
                              f"exported classifier or a reference classifier .pth")
    model = build_vit(arch, len(classes))
    load_classifier(model, state, path)  # checks the head fits the classes; drops the unused norm.*
    crop_pct = REFERENCE_CROP_PCT if arch.img_size <= 224 else 1.0  # MAE's build_transform
    meta = classifier_meta(arch, arch.img_size, classes, task, dataset="", crop_pct=crop_pct, source=path)
    return model.state_dict(), meta


def classifier_state(checkpoint: str, classes: Optional[Sequence[str]] = None, task: str = SINGLE_LABEL,
                     preset: str = "vit_b16") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(weights, metadata) of a classifier: a run directory with best.safetensors, an exported classifier, or
    (given the classes) a reference .pth."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "best.safetensors").is_file():
        state, meta = classifier_bundle(str(path))
    elif path.suffix == ".safetensors" and path.is_file():
        state, meta = read_export(str(path))
    elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        if classes is None:
            raise CheckpointError(f"{checkpoint}: a reference .pth does not name its classes: pass --dataset NAME "
                                  f"(a registered benchmark) so its head's outputs can be named")
        state, meta = reference_bundle(str(path), classes, task, preset)
    else:
        raise CheckpointError(f"{checkpoint}: expected a fine-tuning run (with best.safetensors), an exported "
                              f"classifier .safetensors or a reference classifier .pth; a pretraining checkpoint "
                              f"has no classification head (use --zero-shot --labels FILE)")
    if meta["format"] != "uniemox-classifier" or "head.weight" not in state:
        raise CheckpointError(f"{checkpoint} has no classification head (an encoder export): use --zero-shot "
                              f"--labels FILE with its pretraining run, or fine-tune it first")
    return state, meta


def export_classifier(checkpoint: str, out: str, classes: Optional[Sequence[str]] = None,
                      task: str = SINGLE_LABEL, preset: str = "vit_b16") -> Path:
    state, meta = classifier_state(checkpoint, classes, task, preset)
    return atomic_save_safetensors(state, Path(out), meta)


def read_export(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in ("uniemox-classifier", "uniemox-encoder"):
            raise CheckpointError(f"{path} is not an export of this project (format {meta.get('format')!r})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("source", help="a fine-tuning run (classifier) or a pretraining run/checkpoint/MAE file")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--preset", default="vit_b16", help="architecture of an official MAE .pth without args")
    parser.add_argument("--dataset", help="a reference classifier .pth: the registered benchmark its head was "
                                          "trained on (names its outputs)")
    args = parser.parse_args(argv)

    def export() -> Path:
        if (Path(args.source) / "best.safetensors").is_file():
            return export_classifier(args.source, args.out)
        if args.dataset:
            spec = get_dataset(args.dataset)
            return export_classifier(args.source, args.out, spec.classes, spec.task, args.preset)
        return export_encoder(args.source, args.out, args.preset)
    return with_one_line_errors(lambda: report(export()))


def report(path: Path) -> int:
    """Print where the export went and the timm call that loads it."""
    meta = safe_open(str(path), "pt").metadata()
    overlay = ", ".join(f"{k}={v!r}" for k, v in json.loads(meta["timm_pretrained_cfg"]).items())
    print(f"wrote {path} ({meta['format']}); timm: timm.create_model({TIMM_BASE!r}, pretrained=True, "
          f"num_classes={meta['num_classes']}, pretrained_cfg_overlay=dict(file={str(path)!r}, {overlay}), "
          + ", ".join(f"{k}={v!r}" for k, v in json.loads(meta["timm_model_args"]).items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
