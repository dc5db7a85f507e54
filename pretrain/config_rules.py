"""The pretraining config's rules between keys, checked when it is built: each error names both keys and the fix."""
from pathlib import Path

from runtime.config import ConfigError


def check_pretrain_config(cfg) -> None:
    from pretrain.fusion import FUSIONS
    from pretrain.losses import loss_weights, needs_teacher
    from pretrain.mae import get_arch
    from pretrain.teacher import TEACHER_BACKENDS
    from pretrain.teacher_error import TeacherError

    train, model, teacher, data = cfg.train, cfg.model, cfg.teacher, cfg.data
    if train.strategy == "deepspeed" and not train.deepspeed_config:
        raise ConfigError("train.strategy=deepspeed needs train.deepspeed_config=FILE (e.g. "
                          "configs/deepspeed/zero2.json)")
    try:
        weights = loss_weights(cfg.loss)
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None
    if model.fusion not in FUSIONS:
        raise ConfigError(f"model.fusion={model.fusion!r} is not a fusion; choose one of {', '.join(FUSIONS)}")
    if teacher.backend not in TEACHER_BACKENDS:
        raise ConfigError(f"teacher.backend={teacher.backend!r} is not a teacher backend; choose one of "
                          f"{', '.join(TEACHER_BACKENDS)}")
    if teacher.cache is not None and not Path(teacher.cache).is_dir():
        raise ConfigError(f"teacher.cache={teacher.cache} is not a directory: make it with `python -m "
                          f"pretrain.cache_teacher --shards ... --out {teacher.cache}` (the teacher's outputs for "
                          f"data.train), or unset teacher.cache to run the teacher in every step")
    if data.weights is not None:
        if len(data.weights) != len(data.train):
            raise ConfigError(f"data.weights has {len(data.weights)} values for {len(data.train)} sources in "
                              f"data.train: give one weight per source")
        if not data.resampled:
            raise ConfigError("data.weights needs data.resampled=true (weighted draws of shards); unset "
                              "data.weights to read plain shards once per epoch")
    try:
        arch = get_arch(model.preset, img_size=model.img_size, patch_size=model.patch_size,
                        embed_dim=model.embed_dim, decoder_embed_dim=model.decoder_embed_dim)
    except ValueError as e:
        raise ConfigError(f"model.preset: {e}") from None
    person = model.person_img_size or arch.img_size
    if person % arch.patch_size:
        raise ConfigError(f"model.person_img_size={person} is not a multiple of the patch size ({arch.patch_size}, "
                          f"model.patch_size or model.preset={model.preset})")
    if model.projection == "decoder_embed" and needs_teacher(weights):
        try:
            width = TEACHER_BACKENDS[teacher.backend].embed_dim(teacher)
        except (TeacherError, OSError, ValueError) as e:
            raise ConfigError(f"teacher ({teacher.backend}), its embedding width: {e}") from None
        if arch.decoder_embed_dim != width:
            raise ConfigError(f"model.projection=decoder_embed needs the decoder width (model.decoder_embed_dim="
                              f"{arch.decoder_embed_dim}) to equal the teacher's embedding width ({width}, "
                              f"teacher.arch={teacher.arch or TEACHER_BACKENDS[teacher.backend].default_arch}); set "
                              f"model.decoder_embed_dim={width} or model.projection=linear")
