"""The pretraining job's config: model, teacher, loss weights, data, training loop (plus run and optim from runtime)."""
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Literal, Optional, Tuple, Union

from runtime.config import DebugConfig, OptimConfig, RunConfig, bounded, must_exist


@dataclass
class ModelConfig:
    preset: str = "vit_l16"                 # tiny, vit_b16, vit_l16, vit_h14 (pretrain/mae.py PRESETS)
    img_size: Optional[int] = None          # each of these overrides the preset's value
    person_img_size: Optional[int] = None   # the person crop's side (default: img_size); smaller = fewer tokens
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    decoder_embed_dim: Optional[int] = None
    decoder_depth: Optional[int] = None
    decoder_num_heads: Optional[int] = None
    mask_ratio: float = bounded(0.75, 0, 1, open_low=True, open_high=True)  # MAE's default (reference: 0.9)
    norm_pix_loss: bool = False
    projection: Literal["decoder_embed", "linear"] = "decoder_embed"
    fusion: str = "sum_ln_elu"              # pretrain/fusion.py FUSIONS (sum_ln_elu, weighted_sum, gated_attention,
                                            # mlp_glu, bilinear_residual, scene_only)
    fusion_heads: int = bounded(3, 1)
    mae_checkpoint: Optional[str] = must_exist(None)   # official mae_pretrain_* / mae_visualize_* file
    init_from: Optional[str] = must_exist(None)        # weights of one of our checkpoints (fresh optimizer)


@dataclass
class TeacherConfig:
    checkpoint: str                         # required. open_clip: a local open_clip / OpenAI weights file, or
                                            # "random" (plumbing tests only); classifier: a torchvision weights
                                            # file, or "packaged" (the file the `teacher` extra installs)
    backend: str = "open_clip"              # pretrain/teacher.py TEACHER_BACKENDS: open_clip, classifier
    arch: Optional[str] = None              # open_clip: model name or model-config .json (default ViT-B-16);
                                            # classifier: torchvision ImageNet-1k model (default mobilenet_v2)
    text_encoder: str = "packaged"          # classifier: sentence-transformers model directory, or "packaged"
    image_size: int = bounded(224, 1)                  # classifier: its input side (open_clip uses the model's own)
    temperature: float = bounded(3.0, 0, open_low=True)  # classifier: logits / temperature before the softmax
    checkpoint_sha256: Optional[str] = None # classifier: expected sha256 of the weights file (checked)
    cache: Optional[str] = None             # a teacher cache (pretrain.cache_teacher): its clip_image / clip_text
                                            # stand in for the teacher; unset: the teacher runs in every step
    RENAMED: ClassVar[Dict[str, str]] = {"cached": "teacher.cached is replaced by teacher.cache=DIR (the teacher "
                                                   "cache's directory; unset: the teacher runs live)"}


@dataclass
class LossConfig:
    mae: float = bounded(1.0, 0)                       # L3, masked-patch reconstruction
    paired: float = bounded(1.0, 0)                    # L2, student vs CLIP image embedding
    relational: float = bounded(1.0, 0)                # L1, similarity profile over the batch's texts


@dataclass
class DataConfig:
    train: List[str]                        # required: shard files or brace patterns; several sources are mixed
    weights: Optional[List[float]] = bounded(None, 0, open_low=True)  # one per source (resampled only)
    batch_size: int = bounded(64, 1)                   # per rank and micro-step
    num_workers: Union[int, Literal["auto"]] = bounded(4, 0) # auto: this rank's CPUs less 2 (runtime/device.py)
    shuffle_buffer: int = bounded(2000, 0)
    resampled: bool = True                  # draw shards with replacement (fixed steps per epoch on every rank)
    samples_per_epoch: Optional[int] = bounded(None, 1)  # default: the shards' sizes.json totals (pipe: needs it)
    url_timeout_s: float = bounded(60.0, 0, open_low=True)            # http(s) shards: connect and per-read timeout
    crop_scale: Tuple[float, float] = bounded((0.2, 1.0), 0, 1, open_low=True)
    RENAMED: ClassVar[Dict[str, str]] = {"teacher_cache": "data.teacher_cache is replaced by teacher.cache=DIR"}


@dataclass
class TrainConfig:
    epochs: float = bounded(100, 0, open_low=True)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: Optional[str] = must_exist(None)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs >= 8.0, fp16 older, CPU fp32
    max_nonfinite: int = bounded(3, 1)  # consecutive skipped steps (non-finite loss) before the run stops
    image_every: int = bounded(500, 0)                 # steps between reconstruction images in TensorBoard (0: never)
    peak_tflops: Optional[float] = bounded(None, 0, open_low=True)  # per device, for MFU; known GPUs looked up
    compile: bool = False                   # torch.compile each transformer block (encoder and decoder)
    ema_decay: Optional[float] = bounded(None, 0, 1, open_high=True)  # EMA of the weights, exported (e.g. 0.9998)


@dataclass
class PretrainConfig:
    run: RunConfig
    teacher: TeacherConfig
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(blr=1.5e-4, weight_decay=0.05,
                                                                   betas=(0.9, 0.95), warmup_epochs=40))
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        """The rules between keys, checked when the config is built (pretrain/config_rules.py)."""
        from pretrain.config_rules import check_pretrain_config
        check_pretrain_config(self)
