"""The fine-tuning job's config (encoder, data, augmentation, training mode, plus run and optim from runtime), and
the teacher-adaptation job's."""
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple, Union

from runtime.config import ConfigError, DebugConfig, OptimConfig, RunConfig, bounded


# the flags of the entry points of jobs on a labelled dataset with an encoder (finetune/main.py, temporal_main.py)
ENCODER_DATA_FLAGS = {"--dataset": "data.dataset", "--data": "data.root", "--checkpoint": "encoder.checkpoint",
                      "--from-scratch": "encoder.from_scratch=true"}


@dataclass
class EncoderConfig:
    checkpoint: Optional[str] = None   # pretraining run / checkpoint dir / weights.safetensors / official MAE .pth
    from_scratch: bool = False         # random init (the checkpoint must then be unset)
    preset: str = "vit_b16"            # architecture when it cannot be read from the checkpoint (MAE .pth, scratch)
    img_size: Optional[int] = None     # default: the encoder's pretraining size; position embeddings interpolate
    drop_path: float = bounded(0.2, 0, 1, open_high=True)

    def validate(self) -> None:
        """Checked when the config is built, and by create_encoder."""
        if self.from_scratch == bool(self.checkpoint):
            raise ConfigError("give exactly one of encoder.checkpoint=PATH and encoder.from_scratch=true (now "
                              f"encoder.checkpoint={self.checkpoint}, "
                              f"encoder.from_scratch={str(self.from_scratch).lower()})")


@dataclass
class FinetuneDataConfig:
    dataset: str                        # required: a registry name (FI, Emotion6, ...) or the name of a sharded set
    root: Optional[str] = None          # shards made by data_tools (has info.json), or an image folder to shard
    batch_size: int = bounded(16, 1)               # per rank
    num_workers: Union[int, Literal["auto"]] = bounded(4, 0) # auto: this rank's CPUs less 2 (runtime/device.py)
    shuffle_buffer: int = bounded(1000, 0)


@dataclass
class AugmentConfig:
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    crop_scale: Tuple[float, float] = bounded((0.08, 1.0), 0, 1, open_low=True)   # RandomResizedCrop area range
    hflip: float = bounded(0.5, 0, 1)  # horizontal-flip probability (0 for digits, text, anything handed)
    color_jitter: Optional[float] = bounded(None, 0) # timm's ColorJitter strength without auto_augment (MAE: none)
    re_prob: float = bounded(0.25, 0, 1)              # random erasing
    mixup: float = bounded(0.8, 0)
    cutmix: float = bounded(1.0, 0)
    smoothing: float = bounded(0.1, 0, 1, open_high=True)
    crop_pct: float = bounded(0.875, 0, 1, open_low=True)  # evaluation: resize to size / crop_pct, centre crop


@dataclass
class FinetuneTrainConfig:
    epochs: int = bounded(100, 1)
    mode: Literal["finetune", "linear_probe", "eval"] = "finetune"  # eval: score encoder.checkpoint, no training
    layer_decay: float = bounded(0.75, 0, 1, open_low=True)  # layer-wise lr decay (the reference ignored it)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # see pretrain.config
    max_nonfinite: int = bounded(3, 1)
    compile: bool = False               # torch.compile each transformer block
    ema_decay: Optional[float] = bounded(None, 0, 1, open_high=True)  # EMA of the weights: evaluated, kept, tested
    probe_lrs: List[float] = bounded([1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 0, open_low=True)
    probe_epochs: int = bounded(90, 1)


@dataclass
class LabelledJobConfig:
    """What every job on a labelled benchmark has: its run directory and its shards."""
    run: RunConfig
    data: FinetuneDataConfig


@dataclass
class FinetuneConfig(LabelledJobConfig):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-3, weight_decay=0.05, betas=(0.9, 0.999),
                                                                   warmup_epochs=5, min_lr=1e-6))
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        """The rules between keys, checked when the config is built."""
        self.encoder.validate()  # also where the encoder section was left out (its defaults are not built)
        if self.train.mode in ("linear_probe", "eval") and self.train.ema_decay is not None:
            raise ConfigError(f"train.ema_decay has no meaning for train.mode={self.train.mode} (nothing is "
                              f"trained by SGD): unset train.ema_decay")
        if self.train.mode == "eval" and not self.encoder.checkpoint:
            raise ConfigError("train.mode=eval (--eval) scores a trained classifier: give it as --checkpoint "
                              "(encoder.checkpoint)")


@dataclass
class AdaptTeacherConfig:
    arch: str = "ViT-B-16"              # open_clip model name or model-config .json
    checkpoint: str = "random"          # the teacher's local weights file ("random": plumbing tests only)


@dataclass
class AdaptTrainConfig:
    epochs: int = bounded(10, 1)
    templates: str = "emotion"          # finetune.zeroshot template set (emotion, object) or a file, one per line
    freeze_text: bool = True            # keep the text tower as it is (open_clip's lock_text_tower)
    vision_unlocked_groups: Optional[int] = bounded(None, 0)  # train the last k groups of the image tower (None: all)
    balanced: bool = True               # class-balanced draws (each class equally often per epoch)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # see pretrain.config
    max_nonfinite: int = 3


@dataclass
class AdaptConfig(LabelledJobConfig):
    teacher: AdaptTeacherConfig = field(default_factory=AdaptTeacherConfig)
    aug: AugmentConfig = field(default_factory=lambda: AugmentConfig(
        auto_augment=None, crop_scale=(0.5, 1.0), re_prob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, crop_pct=1.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-5, weight_decay=0.1, betas=(0.9, 0.98),
                                                                   warmup_epochs=1, min_lr=0.0))
    train: AdaptTrainConfig = field(default_factory=AdaptTrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        """The rules between keys, checked when the config is built."""
        used = [f"aug.{k}={v}" for k, v in (("mixup", self.aug.mixup), ("cutmix", self.aug.cutmix),
                                            ("smoothing", self.aug.smoothing)) if v]
        if used:
            raise ConfigError(f"{', '.join(used)}: Mixup, CutMix and label smoothing have no meaning for "
                              f"contrastive adaptation (image/prompt pairs): set them to 0")
