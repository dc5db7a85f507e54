"""Typed YAML configs: values, overrides, derived lr, run metadata, and the errors bad input must raise."""
import json
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import pytest
import yaml

from runtime.cli import parse_cli
from runtime.config import ConfigError, OptimConfig, RunConfig, load_config, must_exist, scaled_lr, write_run_metadata


@dataclass
class DataSection:
    train: List[str]
    batch_size: int = 8
    root: Optional[str] = must_exist(None)


@dataclass
class Schema:
    run: RunConfig
    data: DataSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    name: str = "x"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
run: {output_dir: runs/a}
data:
  train: ["shards/{00000..00003}.tar"]
optim:
  blr: 1.5e-4
  betas: [0.9, 0.999]
"""


def test_file_and_overrides_are_typed(tmp_path):
    cfg = load_config(Schema, write(tmp_path, BASE),
                      ["optim.blr=1e-4", "data.batch_size=32", "optim.clip_grad=3", "strategy=deepspeed",
                       "name=007", "run.seed=5", "optim.lr=null", "data.train=[a.tar,b.tar]"])
    assert cfg.optim.blr == pytest.approx(1e-4) and isinstance(cfg.optim.blr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.batch_size == 32 and cfg.optim.clip_grad == 3.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.strategy == "deepspeed"
    assert cfg.name == "007"  # strings on the command line stay strings (YAML would give the integer 7)
    assert cfg.run.seed == 5 and cfg.optim.lr is None
    assert cfg.data.train == ["a.tar", "b.tar"]
    assert cfg.run.keep_last == RunConfig.__dataclass_fields__["keep_last"].default


def test_yaml_1e4_string_becomes_float(tmp_path):
    # PyYAML reads "1.5e-4" without a dot before e as a string; the schema says float
    cfg = load_config(Schema, write(tmp_path, BASE.replace("1.5e-4", "15e-5")))
    assert cfg.optim.blr == pytest.approx(1.5e-4)


def test_lr_is_derived_from_blr_and_effective_batch():
    optim = OptimConfig(blr=1e-3, accum_steps=2)
    assert scaled_lr(optim, batch_per_rank=64, world_size=8) == pytest.approx(1e-3 * 64 * 2 * 8 / 256)
    assert scaled_lr(OptimConfig(blr=1e-3, lr=5e-4), 64, 8) == 5e-4


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, BASE + "  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Schema, path)
    assert "optim.lrr" in str(e.value) and str(path) in str(e.value) and "blr" in str(e.value)


def test_unknown_key_in_override(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.sed"):
        load_config(Schema, write(tmp_path, BASE), ["run.sed=1"])


def test_override_that_cannot_be_converted(tmp_path):
    with pytest.raises(ConfigError, match=r"'data\.batch_size' expects an integer, got 'big'"):
        load_config(Schema, write(tmp_path, BASE), ["data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"'strategy' expects one of 'ddp', 'deepspeed'"):
        load_config(Schema, write(tmp_path, BASE), ["strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"'optim.betas' expects a list of 2 values"):
        load_config(Schema, write(tmp_path, BASE), ["optim.betas=[0.9]"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Schema, tmp_path / "nope.yaml")


def test_missing_required_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "data: {train: [a.tar]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(Schema, path)
    assert "missing required key 'run.output_dir'" in str(e.value) and str(path) in str(e.value)


def test_required_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.root' names a path that does not exist: .*absent"):
        load_config(Schema, write(tmp_path, BASE), [f"data.root={tmp_path / 'absent'}"])
    cfg = load_config(Schema, write(tmp_path, BASE), [f"data.root={tmp_path}"])
    assert cfg.data.root == str(tmp_path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Schema, write(tmp_path, "- a\n- b\n"))


def test_parse_cli_and_run_metadata(tmp_path):
    cfg, _ = parse_cli(Schema, ["--config", str(write(tmp_path, BASE)), "data.batch_size=4"])
    meta = write_run_metadata(tmp_path / "run", cfg, world_size=2)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 4 and saved["optim"]["betas"] == [0.9, 0.999]
    # the saved config reloads into the same typed config
    assert load_config(Schema, tmp_path / "run" / "config.yaml") == cfg
    on_disk = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert on_disk["world_size"] == 2 and on_disk["packages"]["torch"].startswith("2.")
    assert len(meta["git_sha"].split("+")[0]) in (40, len("unknown"))


def test_brace_patterns_in_list_overrides(tmp_path):
    cfg = load_config(Schema, write(tmp_path, BASE), ["data.train=[shards/{00000..00009}.tar, web/{0,1}.tar]"])
    assert cfg.data.train == ["shards/{00000..00009}.tar", "web/{0,1}.tar"]
    cfg = load_config(Schema, write(tmp_path, BASE), ["data.train=shards/{00000..00009}.tar"])
    assert cfg.data.train == ["shards/{00000..00009}.tar"]
    with pytest.raises(ConfigError, match=r"key 'data.batch_size': cannot read '\{1: \[' as a value"):
        load_config(Schema, write(tmp_path, BASE), ["data.batch_size={1: ["])


def test_a_bounded_list_default_is_each_configs_own():
    from finetune.config import FinetuneTrainConfig
    a, b = FinetuneTrainConfig(), FinetuneTrainConfig()
    a.probe_lrs.append(1.0)
    assert b.probe_lrs == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and a.probe_lrs is not b.probe_lrs
