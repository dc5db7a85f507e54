"""A trained classifier from any source (a fine-tuning or probe run, an export, a reference .pth) with its classes,
task and evaluation transform: what predict, eval and export read."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from timm.data import create_transform
from timm.models.vision_transformer import VisionTransformer

from data_tools.registry import SINGLE_LABEL
from finetune.encoder import arch_from_metadata, build_vit, check_arch_fits
from finetune.export import classifier_state


@dataclass
class Classifier:
    model: VisionTransformer
    classes: List[str]
    task: str
    transform: Callable
    meta: Dict[str, str]
    continuous: List[str]    # values the head predicts after the classes (EMOTIC's V/A/D)


def open_classifier(checkpoint: str, classes: Optional[Sequence[str]] = None, task: str = SINGLE_LABEL,
                    preset: str = "vit_b16") -> Classifier:
    """The classifier in evaluation mode with its own evaluation transform (`preset`: the architecture of a
    reference .pth whose args do not name one)."""
    state, meta = classifier_state(checkpoint, classes, task, preset)
    names: List[str] = json.loads(meta["classes"])
    tf = json.loads(meta["transform"])
    arch = arch_from_metadata(meta, Path(checkpoint))
    check_arch_fits(state, arch, Path(checkpoint))
    model = build_vit(arch, state["head.weight"].shape[0], tf["input_size"])
    model.load_state_dict(state)
    model.eval()
    transform = create_transform(tf["input_size"], is_training=False, interpolation=tf["interpolation"],
                                 crop_pct=tf["crop_pct"], mean=tuple(tf["mean"]), std=tuple(tf["std"]))
    return Classifier(model, names, meta["task"], transform, meta, json.loads(meta.get("continuous", "[]")))
