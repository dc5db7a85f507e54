"""Typed YAML configs: dataclass schemas, strict keys, dotted CLI overrides, resolved-config and run metadata."""
import copy
import dataclasses
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from runtime.atomic import atomic_write_json, atomic_write_text

T = TypeVar("T")
MISSING = dataclasses.MISSING

# Versions recorded in every run directory, so a number can be traced to the stack that produced it.
TRACKED_PACKAGES = (
    "torch", "torchvision", "timm", "open_clip_torch", "webdataset", "deepspeed", "ray", "submitit",
    "tensorboard", "numpy", "pillow", "opencv-python-headless", "scikit-learn", "safetensors", "uniemox",
)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key and its source."""


def must_exist(default: Any = MISSING, **kwargs) -> Any:
    """A path field whose file or directory must exist when the config is loaded."""
    metadata = {"must_exist": True}
    if default is MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def bounded(default: Any = MISSING, low: Optional[float] = None, high: Optional[float] = None, *,
            open_low: bool = False, open_high: bool = False, **kwargs) -> Any:
    """A number field (or list of numbers) whose value must lie in [low, high] (an open end excludes it), checked
    when the config is loaded, so a value out of range is a config error (exit 2) and not a strange run."""
    metadata = {"range": (low, high, open_low, open_high)}
    if default is MISSING:
        return field(metadata=metadata, **kwargs)
    if isinstance(default, (list, tuple)):  # each config gets its own copy (a list is mutable)
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def range_text(low: Optional[float], high: Optional[float], open_low: bool, open_high: bool) -> str:
    if low is not None and high is not None:
        return f"{low} {'<' if open_low else '<='} value {'<' if open_high else '<='} {high}"
    if low is not None:
        return f"value {'>' if open_low else '>='} {low}"
    return f"value {'<' if open_high else '<='} {high}"


def _check_range(value: Any, bounds: Tuple, key: str, source: str) -> None:
    low, high, open_low, open_high = bounds
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue  # None or a word such as "auto"
        below = low is not None and (v <= low if open_low else v < low)
        above = high is not None and (v >= high if open_high else v > high)
        if below or above:
            raise ConfigError(f"{source}: key '{key}' = {v!r} is out of range (expected "
                              f"{range_text(low, high, open_low, open_high)})")


@dataclass
class RunConfig:
    """Where a run writes and how often it logs and checkpoints (shared by both trainers)."""
    output_dir: str                     # required: the run directory (checkpoints/, tb/, config.yaml, meta.json)
    seed: int = 0
    resume: str = "latest"              # "latest" (resume if the run dir has a checkpoint), "none", or a path
    log_every: int = bounded(10, 1)     # steps between metric reductions / TensorBoard points
    ckpt_every: int = bounded(100, 1)   # steps between checkpoints (one is always written at the end)
    keep_last: int = bounded(3, 1)      # rolling checkpoints kept
    milestone_every: int = bounded(0, 0)  # steps between checkpoints kept forever (0: none)
    dist_timeout_s: int = bounded(1800, 1)  # collective timeout: a crashed rank ends the others after this; longer
                                        # than the loader's 900 s, so a stalled loader is reported as itself
    device: Literal["auto", "cuda", "cpu"] = "auto"   # auto: this rank's GPU if there is one (runtime/device.py)


@dataclass
class OptimConfig:
    """AdamW with warmup + half-cycle cosine; lr derived as blr * effective_batch / 256 unless given."""
    blr: float = bounded(1e-3, 0, open_low=True)
    lr: Optional[float] = bounded(None, 0, open_low=True)
    min_lr: float = bounded(0.0, 0)
    weight_decay: float = bounded(0.05, 0)
    betas: Tuple[float, float] = bounded((0.9, 0.95), 0, 1, open_high=True)
    warmup_epochs: float = bounded(0.0, 0)
    accum_steps: int = bounded(1, 1)
    clip_grad: Optional[float] = bounded(None, 0, open_low=True)


@dataclass
class DebugConfig:
    """Fault injection for tests and drills (shared by both trainers); all off by default."""
    nan_steps: List[int] = field(default_factory=list)   # the loss becomes NaN at these steps ...
    nan_rank: int = 0                                      # ... on this rank
    crash_step: Optional[int] = None                       # this rank raises at this step
    crash_rank: int = 1
    step_sleep_s: float = 0.0                              # slows every step (to interrupt runs on purpose)
    record_keys: bool = False                              # each rank logs the sample keys it trains on
    save_sleep_s: float = 0.0                              # a pause inside every checkpoint write, before it commits
    count_host_syncs: bool = False                         # RUN/host_syncs/: calls per step that wait for a GPU
    cuda_sync_debug: bool = False                          # RUN/host_syncs/: CUDA's own sync detector, per step


def scaled_lr(optim: OptimConfig, batch_per_rank: int, world_size: int) -> float:
    """The absolute learning rate: optim.lr if given, else blr * (batch per rank * accum * world size) / 256."""
    if optim.lr is not None:
        return optim.lr
    return optim.blr * batch_per_rank * optim.accum_steps * world_size / 256


def with_scaled_lr(cfg: Any, batch_per_rank: int, world_size: int) -> Any:
    """A copy of cfg with optim.lr resolved (scaled_lr): the run's config, made once, never mutated after."""
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim,
                                                              lr=scaled_lr(cfg.optim, batch_per_rank, world_size)))


class _Override(str):
    """A value typed on the command line: parsed by the target field's type, not by YAML's guesses."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> ConfigError:
        kind = "str" if isinstance(value, _Override) else type(value).__name__
        return ConfigError(f"{source}: key '{key}' expects {expected}, got {value!r} ({kind})")

    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, _Override) else value
    if origin is Union:
        if isinstance(value, _Override) and value.lower() in ("null", "none", "~"):
            value = None
        if value is None:
            if type(None) in args:
                return None
            raise fail(_type_name(tp))
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, source)
        for candidate in inner:
            try:
                return _coerce(value, candidate, key, source)
            except ConfigError:
                continue
        raise fail(" or ".join(_type_name(a) for a in inner))
    if origin is Literal:
        if isinstance(value, _Override):
            matches = [a for a in args if str(a) == value]
            if matches:
                return matches[0]
        if value in args:
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, source, prefix=key + ".")
    if isinstance(value, _Override) and tp is not str:
        value = _parse_override(value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail("a boolean (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if origin in (list, List, Sequence, tuple, Tuple):
        if isinstance(value, str):
            value = [value]  # a single path where a list is expected
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({_type_name(tp)})")
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise fail("a mapping")
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    raise ConfigError(f"{source}: key '{key}' has an unsupported schema type {_type_name(tp)}")


def _split_list(text: str) -> List[str]:
    """'[a/{0..9}.tar, b.tar]' -> ['a/{0..9}.tar', 'b.tar']: commas inside braces belong to the item."""
    items, depth, current = [], 0, ""
    for ch in text.strip()[1:-1]:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    return items + ([current.strip()] if current.strip() else [])


def _parse_override(value: str, key: str, source: str) -> Any:
    if not value.strip():
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        if value.strip().startswith("[") and value.strip().endswith("]"):
            return _split_list(value)  # brace patterns (shards/{00000..00009}.tar) are not valid YAML flow
        raise ConfigError(f"{source}: key '{key}': cannot read {value!r} as a value") from None


def _build(schema: Type[T], raw: Dict[str, Any], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    renamed = getattr(schema, "RENAMED", {})
    for name in unknown:
        if name in renamed:
            raise ConfigError(f"{source}: {renamed[name]}")
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys{' in ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key, source)
        elif f.default is MISSING and f.default_factory is MISSING:
            if dataclasses.is_dataclass(hints[name]):  # a section left out: name its first required key
                kwargs[name] = _build(hints[name], {}, source, prefix=key + ".")
                continue
            raise ConfigError(f"{source}: missing required key '{key}' (set it in the config file or as {key}=...)")
        if f.metadata.get("range") and name in kwargs:
            _check_range(kwargs[name], f.metadata["range"], key, source)
        if f.metadata.get("must_exist") and kwargs.get(name) is not None:
            if not os.path.exists(kwargs[name]):
                raise ConfigError(f"{source}: key '{key}' names a path that does not exist: {kwargs[name]}")
    cfg = schema(**kwargs)
    validate = getattr(cfg, "validate", None)  # the rules between keys: a schema's own, checked once it is built
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return cfg


def _apply_override(raw: Dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value")
    dotted, value = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = _Override(value)


def load_config(schema: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (optional), apply `a.b=value` overrides, and build a typed, validated config."""
    raw: Dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
        raw = loaded or {}
        source = str(path)
    return config_from_dict(schema, raw, overrides, source)


def config_from_dict(schema: Type[T], raw: Dict[str, Any], overrides: Sequence[str] = (),
                     source: str = "defaults") -> T:
    """Build a typed, validated config from a plain mapping (e.g. a section stored in a checkpoint) + overrides."""
    raw = copy.deepcopy(dict(raw))
    for override in overrides:
        _apply_override(raw, override)
    if overrides:
        source += " + overrides (" + " ".join(overrides) + ")"
    return _build(schema, raw, source)


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, checkpoints and TensorBoard."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def git_sha(repo_dir: Optional[Path] = None) -> str:
    """The commit of the code that runs ('+dirty' when it has uncommitted changes; 'unknown' outside git)."""
    repo_dir = repo_dir or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> Dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_run_metadata(run_dir: Union[str, Path], cfg: Any, **extra: Any) -> Dict[str, Any]:
    """Write the resolved config (config.yaml) and provenance (meta.json) into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    meta = {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "argv": sys.argv,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    atomic_write_json(run_dir / "meta.json", meta)
    return meta
