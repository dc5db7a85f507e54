"""The rules between config keys, checked when a config is built: one test per rule, each error naming both keys
and what to do, and the command line's exit 2 before anything starts."""
import pytest

from finetune.config import AdaptConfig, FinetuneConfig
from pretrain.config import PretrainConfig
from runtime.config import ConfigError, load_config

PRETRAIN = ["data.train=[shards/{00000..00001}.tar]", "run.output_dir=runs/x"]


def pretrain_config(*overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, "configs/pretrain/tiny.yaml", [*PRETRAIN, *overrides])


def refused(build, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        build(*overrides)
    return str(e.value)


def test_the_tiny_config_passes_every_rule():
    cfg = pretrain_config()
    assert cfg.teacher.cache is None and cfg.train.ema_decay is None


def test_deepspeed_needs_its_config():
    msg = refused(pretrain_config, "train.strategy=deepspeed")
    assert "train.strategy=deepspeed needs train.deepspeed_config=FILE (e.g. configs/deepspeed/zero2.json)" in msg
    assert msg.startswith("configs/pretrain/tiny.yaml + overrides")  # where the config came from


def test_every_loss_weight_zero_is_nothing_to_train():
    msg = refused(pretrain_config, "loss.mae=0", "loss.paired=0", "loss.relational=0")
    assert "loss: every loss weight is 0" in msg and "nothing to train" in msg


def test_the_fusion_is_one_of_the_registry():
    assert "model.fusion='concat' is not a fusion; choose one of sum_ln_elu, weighted_sum, gated_attention" in \
        refused(pretrain_config, "model.fusion=concat")


def test_the_teacher_backend_is_one_of_the_registry():
    msg = refused(pretrain_config, "teacher.backend=siglip")
    assert "teacher.backend='siglip' is not a teacher backend; choose one of open_clip, classifier" in msg


def test_the_teacher_cache_must_be_a_directory(tmp_path):
    msg = refused(pretrain_config, f"teacher.cache={tmp_path / 'missing'}")
    assert f"teacher.cache={tmp_path / 'missing'} is not a directory: make it with `python -m " \
           f"pretrain.cache_teacher --shards ... --out {tmp_path / 'missing'}`" in msg
    assert "unset teacher.cache to run the teacher in every step" in msg
    (tmp_path / "cache").mkdir()
    assert pretrain_config(f"teacher.cache={tmp_path / 'cache'}").teacher.cache == str(tmp_path / "cache")


def test_the_two_old_cache_keys_name_the_one_that_replaces_them(tmp_path):
    assert "teacher.cached is replaced by teacher.cache=DIR" in refused(pretrain_config, "teacher.cached=true")
    assert "data.teacher_cache is replaced by teacher.cache=DIR" in refused(pretrain_config,
                                                                          f"data.teacher_cache={tmp_path}")


def test_source_weights_are_one_per_source_and_need_resampling():
    two = ["data.train=[a/{0..1}.tar,b/{0..1}.tar]"]
    assert load_config(PretrainConfig, "configs/pretrain/tiny.yaml",
                       [*two, "run.output_dir=x", "data.weights=[1,3]"]).data.weights == [1.0, 3.0]
    msg = refused(pretrain_config, "data.weights=[1,3]")
    assert "data.weights has 2 values for 1 sources in data.train: give one weight per source" in msg
    msg = refused(pretrain_config, "data.weights=[1]", "data.resampled=false")
    assert "data.weights needs data.resampled=true" in msg


def test_the_person_crop_is_a_whole_number_of_patches():
    msg = refused(pretrain_config, "model.person_img_size=12")
    assert "model.person_img_size=12 is not a multiple of the patch size (8, model.patch_size or " \
           "model.preset=tiny)" in msg
    assert pretrain_config("model.person_img_size=16").model.person_img_size == 16


def test_the_decoder_embedding_projects_only_to_the_teachers_width():
    msg = refused(pretrain_config, "model.decoder_embed_dim=48")
    assert "model.projection=decoder_embed needs the decoder width (model.decoder_embed_dim=48) to equal the " \
           "teacher's embedding width (32, teacher.arch=configs/teacher/tiny-clip.json)" in msg
    assert "set model.decoder_embed_dim=32 or model.projection=linear" in msg
    assert pretrain_config("model.decoder_embed_dim=48", "model.projection=linear").model.projection == "linear"
    # no distillation term: the width does not matter
    assert pretrain_config("model.decoder_embed_dim=48", "loss.paired=0", "loss.relational=0")


def test_a_run_directory_written_with_the_old_cache_keys_is_the_same_run(tmp_path):
    """A config.yaml from before teacher.cache (teacher.cached + data.teacher_cache) compares as today's keys: the
    same cache resumes, another one is another run."""
    import yaml

    from runtime.config import config_to_dict
    from runtime.run_dir import RunDirError, check_same_run
    from runtime.checkpoint import CheckpointStore
    (tmp_path / "cache").mkdir()
    cfg = pretrain_config(f"teacher.cache={tmp_path / 'cache'}")
    old = config_to_dict(cfg)
    del old["teacher"]["cache"]
    old["teacher"]["cached"], old["data"]["teacher_cache"] = True, str(tmp_path / "cache")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    CheckpointStore(tmp_path / "checkpoints").save(5, {"step": 5})
    check_same_run(tmp_path, cfg, "latest")
    with pytest.raises(RunDirError, match=r"teacher.cache: .* there, None now"):
        check_same_run(tmp_path, pretrain_config(), "latest")


def finetune_config(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, "configs/finetune/tiny.yaml", ["data.dataset=FI", "run.output_dir=x",
                                                                      *overrides])


def test_a_fine_tuned_encoder_comes_from_exactly_one_source():
    assert "give exactly one of encoder.checkpoint=PATH and encoder.from_scratch=true (now encoder.checkpoint=None" \
        in refused(finetune_config)
    assert "encoder.from_scratch=true)" in refused(finetune_config, "encoder.checkpoint=runs/pre",
                                                   "encoder.from_scratch=true")
    assert finetune_config("encoder.from_scratch=true").encoder.from_scratch


def test_a_linear_probe_has_no_weight_average():
    msg = refused(finetune_config, "encoder.from_scratch=true", "train.mode=linear_probe", "train.ema_decay=0.999")
    assert "train.ema_decay has no meaning for train.mode=linear_probe" in msg


def test_contrastive_adaptation_has_no_mixup_cutmix_or_smoothing():
    def adapt_config(*overrides):
        return load_config(AdaptConfig, None, ["data.dataset=FI", "run.output_dir=x", *overrides])
    assert adapt_config().aug.mixup == 0
    msg = refused(adapt_config, "aug.mixup=0.5")
    # an aug.* override gives the rest of the section the AugmentConfig defaults (cutmix 1.0, smoothing 0.1)
    assert "aug.mixup=0.5, aug.cutmix=1.0, aug.smoothing=0.1: Mixup, CutMix and label smoothing have no meaning " \
           "for contrastive adaptation (image/prompt pairs): set them to 0" in msg


def test_the_command_line_exits_2_on_a_broken_rule(capfd, tmp_path):
    from pretrain.main import main
    assert main(["--config", "configs/pretrain/tiny.yaml", *PRETRAIN[:1], f"run.output_dir={tmp_path / 'run'}",
                 "train.strategy=deepspeed"]) == 2
    err = capfd.readouterr().err
    assert "config error:" in err and "train.deepspeed_config" in err and not (tmp_path / "run").exists()
