"""A run directory belongs to one run: a rerun that would resume it with a config that makes another run is refused."""
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import yaml

from runtime import distributed
from runtime.checkpoint import CheckpointError, CheckpointStore
from runtime.config import config_to_dict, write_run_metadata

# what makes a run (its weights could not have come from another value); sections or single keys
RUN_IDENTITY = ("model", "teacher", "data", "encoder", "loss", "train.mode", "train.strategy", "train.templates")
# ... except where a rerun may differ: how the data is read, not which data
EXECUTION_ONLY = ("data.num_workers", "data.url_timeout_s", "data.shuffle_buffer")


class RunDirError(CheckpointError):
    """The run directory holds another run than the one the config describes."""


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _selected(flat: Dict[str, Any], identity: Iterable[str], ignore: Iterable[str]) -> Dict[str, Any]:
    identity, ignore = tuple(identity), tuple(ignore)
    return {k: v for k, v in flat.items()
            if any(k == s or k.startswith(s + ".") for s in identity) and k not in ignore}


def run_differences(saved: Dict[str, Any], new: Dict[str, Any], identity: Iterable[str] = RUN_IDENTITY,
                    ignore: Iterable[str] = EXECUTION_ONLY) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key that makes the run and differs between two configs."""
    a, b = _selected(_flatten(saved), identity, ignore), _selected(_flatten(new), identity, ignore)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def with_current_keys(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A saved config in today's keys: runs written before teacher.cache replaced teacher.cached (+
    data.teacher_cache) compare as the same run."""
    teacher, data = dict(saved.get("teacher") or {}), dict(saved.get("data") or {})
    if "cached" not in teacher and "teacher_cache" not in data:
        return saved
    cache = data.pop("teacher_cache", None)
    teacher["cache"] = cache if teacher.pop("cached", False) else None
    return {**saved, "teacher": teacher, "data": data}


def check_same_run(run_dir: Path, cfg: Any, resume: str) -> None:
    """Before anything is built or written: if `run_dir` has a checkpoint this run would resume (run.resume=latest)
    and its config.yaml describes another run, raise RunDirError naming each differing key."""
    saved_file = Path(run_dir) / "config.yaml"
    if resume != "latest" or not saved_file.is_file():
        return
    if CheckpointStore(Path(run_dir) / "checkpoints").latest() is None:
        return  # nothing to resume: the run starts afresh and records its own config
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError:
        return  # not ours to judge; resuming reports what does not fit
    diffs = run_differences(with_current_keys(saved), config_to_dict(cfg))
    if diffs:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise RunDirError(f"{run_dir} holds another run, which this one would resume (its config.yaml differs in "
                          f"{shown}{more}): set run.output_dir to a new directory, or remove this one")


def record_run(run_dir: Path, store: CheckpointStore, cfg: Any, env: Any, **meta: Any) -> None:
    """Rank 0 removes half-written checkpoints and records the run starting (or resuming) in run_dir: config.yaml
    and meta.json (provenance, the Slurm restart count); every rank waits for it."""
    if env.is_main:
        store.clean_partials()
        write_run_metadata(run_dir, cfg, world_size=env.world_size, launcher=env.launcher,
                           restart_count=os.environ.get("SLURM_RESTART_COUNT", "0"), **meta)
    distributed.barrier()
