"""The temporal valence/arousal job's config: clip-chunk shards, how the encoder is used (frozen, cached, LoRA, full),
the head over frames, the optional contrastive stage 1, plus run and optim from runtime."""
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from finetune.config import EncoderConfig, FinetuneDataConfig, LabelledJobConfig
from runtime.config import ConfigError, DebugConfig, OptimConfig, bounded, must_exist

ENCODER_MODES = ("frozen", "cached", "lora", "full")


@dataclass
class TemporalDataConfig(FinetuneDataConfig):
    batch_size: int = bounded(8, 1)              # clip windows per rank
    window: int = bounded(16, 1)                 # frames per training window (a random one per chunk)
    eval_stride: int = bounded(8, 1)             # evaluation: overlapping windows this far apart, stitched
    cache: Optional[str] = must_exist(None)      # per-frame features made by finetune.cache_frames (mode cached)


@dataclass
class TemporalModelConfig:
    encoder_mode: Literal["frozen", "cached", "lora", "full"] = "frozen"
    head: Literal["per_frame", "mean_pool", "transformer"] = "transformer"
    width: int = bounded(128, 1)
    depth: int = bounded(2, 1)
    heads: int = bounded(4, 1)
    dropout: float = bounded(0.1, 0, 1, open_high=True)
    max_frames: int = bounded(256, 1)            # the transformer's time embedding (>= data.window)
    lora_rank: int = bounded(8, 1)
    lora_alpha: float = bounded(16.0, 0, open_low=True)
    lora_targets: List[str] = field(default_factory=lambda: ["q", "v"])
    lora_blocks: int = bounded(1, 0)             # the last k blocks get adapters (0: every block)
    lora_lr_scale: float = bounded(1.0, 0, open_low=True)  # the adapters' lr over the head's (the study: 8)
    layer_decay: float = bounded(0.75, 0, 1, open_low=True)  # encoder_mode=full
    stage1: Optional[str] = must_exist(None)     # a stage-1 run (train.stage=1) whose adapters/encoder start stage 2
    shuffle_control: bool = True                 # also score test with each clip's frames shuffled


@dataclass
class ContrastiveConfig:
    """Stage 1 (train.stage=1): InfoNCE between adjacent frames (a queue of past frames as extra negatives) and
    between a clip and its frames, positives weighted by V/A similarity, plus a smoothness penalty."""
    dim: int = bounded(128, 1)                   # the frame projector: feature -> feature -> dim, L2-normalised
    queue: int = bounded(512, 0)                 # past frames as negatives (4,096 collapsed the study's stage 1)
    local_temperature: float = bounded(0.1, 0, open_low=True)
    global_temperature: float = bounded(0.1, 0, open_low=True)
    va_sigma: float = bounded(0.5, 0, open_low=True)  # weight of a positive pair exp(-|dVA|^2 / (2 sigma^2))
    global_weight: float = bounded(1.0, 0)
    smooth_weight: float = bounded(0.1, 0)


@dataclass
class TemporalTrainConfig:
    epochs: int = bounded(20, 1)
    stage: Literal[1, 2] = 2                     # 1: contrastive pretraining over frames, 2: V/A regression
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: Optional[str] = must_exist(None)
    max_nonfinite: int = bounded(3, 1)


@dataclass
class TemporalConfig(LabelledJobConfig):
    data: TemporalDataConfig
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    temporal: TemporalModelConfig = field(default_factory=TemporalModelConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1e-3, weight_decay=0.05, betas=(0.9, 0.999),
                                                                   warmup_epochs=1, min_lr=1e-6))
    train: TemporalTrainConfig = field(default_factory=TemporalTrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        self.encoder.validate()
        t, mode = self.temporal, self.temporal.encoder_mode
        if (mode == "cached") != bool(self.data.cache):
            raise ConfigError("temporal.encoder_mode=cached reads data.cache=DIR (made by finetune.cache_frames), "
                              f"and only that mode does (now encoder_mode={mode}, data.cache={self.data.cache})")
        if t.head == "transformer" and self.data.window > t.max_frames:
            raise ConfigError(f"data.window={self.data.window} is longer than temporal.max_frames={t.max_frames}")
        if not t.lora_targets or set(t.lora_targets) - {"q", "k", "v"}:
            raise ConfigError(f"temporal.lora_targets={t.lora_targets}: expected a non-empty subset of [q, k, v]")
        if self.train.stage == 1 and mode not in ("lora", "full", "cached"):
            raise ConfigError("train.stage=1 trains the frame projector and the encoder's adapters or weights: use "
                              "temporal.encoder_mode=lora, full or cached (a frozen encoder has nothing to train "
                              "but the projector: use cached)")
        if self.train.stage == 1 and t.stage1:
            raise ConfigError("temporal.stage1 starts stage 2 from a stage-1 run; it has no meaning in train.stage=1")
