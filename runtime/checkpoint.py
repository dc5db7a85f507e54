"""Step-based checkpoint store: atomic directories, an atomic `latest` pointer, keep-last-k plus milestones."""
import argparse
import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from runtime import distributed
from runtime.atomic import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

FULL_DISK_BYTES = 1 << 20  # a failed write that leaves less free than this ran out of space

REFERENCE_GLOBALS = (argparse.Namespace,)  # what MAE's misc.save_model pickles beyond plain data (its `args`)
SCHEMA_VERSION = 1          # bump when the layout of the state dict changes; older versions stay loadable
STATE_FILE = "state.pt"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, too new, or does not fit the model."""


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


class CheckpointStore:
    """`root/step_000000100/` directories, each complete or absent; `root/latest` names the newest good one.

    A checkpoint is written into `root/.partial-step_.../` and renamed into place only when every file in it is
    flushed, so a crash at any moment leaves either the old or the new checkpoint, never half of one.
    """

    def __init__(self, root: Union[str, Path], keep_last: int = 3, milestone_every: int = 0,
                 pause_before_commit_s: float = 0.0):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.pause_before_commit_s = pause_before_commit_s  # debug.save_sleep_s: a window to kill a save in
        self.root = Path(root)
        self.keep_last = keep_last
        self.milestone_every = milestone_every

    def checkpoints(self) -> List[Tuple[int, Path]]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def latest(self) -> Optional[Path]:
        pointer = self.root / LATEST
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if target.is_dir():
                return target
            log.warning("%s names %s, which is missing; using the newest complete checkpoint", pointer, target)
        found = self.checkpoints()
        return found[-1][1] if found else None

    def clean_partials(self) -> None:
        """Remove what a crashed save left behind (call once at start-up, before any rank saves)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(PARTIAL_PREFIX):
                    log.warning("removing incomplete checkpoint %s", p)
                    shutil.rmtree(p, ignore_errors=True)

    def partial_dir(self, step: int) -> Path:
        """An empty directory to write step's files into; every rank gets the same path (DeepSpeed needs that)."""
        path = self.root / (PARTIAL_PREFIX + step_dirname(step))
        if distributed.is_main():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        distributed.barrier()
        return path

    def commit(self, step: int) -> Path:
        """Rename step's partial directory into place, point `latest` at it, drop old checkpoints (rank 0)."""
        partial = self.root / (PARTIAL_PREFIX + step_dirname(step))
        final = self.root / step_dirname(step)
        for f in partial.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # the same step saved twice (e.g. periodic and final): the new one wins
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        self.prune()
        return final

    def save(self, step: int, state: Dict[str, Any],
             write_shards: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
        """Save step's checkpoint. Called on every rank: `write_shards(dir)` (if given) runs on every rank first
        (DeepSpeed's per-rank files), then rank 0 writes `state` as state.pt and commits."""
        partial = self.partial_dir(step)
        need = tensor_bytes(state)
        try:
            if write_shards is not None:
                write_shards(partial)
                distributed.barrier()
            final = None
            if distributed.is_main():
                check_free_space(partial, need)
                _write_state({"schema_version": SCHEMA_VERSION, **state}, partial / STATE_FILE)
                time.sleep(self.pause_before_commit_s)
                final = self.commit(step)
                log.info("checkpoint saved: %s", final)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a bare RuntimeError
            free = shutil.disk_usage(self.root).free  # a write that failed on a full disk left it (nearly) full
            shutil.rmtree(partial, ignore_errors=True)
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            if isinstance(e, CheckpointError) or not (full or free < FULL_DISK_BYTES):
                raise
            raise CheckpointError(self._disk_full(step, need, f"{type(e).__name__}: {e}")) from None
        distributed.barrier()
        return final

    def _disk_full(self, step: int, need: int, detail: str) -> str:
        latest = self.latest()
        return (f"no space left in {self.root} for the checkpoint of step {step} (about {need / 2**20:.0f} MiB "
                f"needed, {shutil.disk_usage(self.root).free / 2**20:.0f} MiB free; {detail}). Nothing of it was "
                f"kept; {latest if latest else 'no earlier checkpoint'} stays the resume point: free space and rerun")

    def prune(self) -> None:
        found = self.checkpoints()
        keep = {p for _, p in found[-self.keep_last:]}
        keep |= {p for s, p in found if self.milestone_every and s % self.milestone_every == 0}
        latest = self.latest()
        for _, p in found:
            if p not in keep and p != latest:
                shutil.rmtree(p, ignore_errors=True)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what torch.save will write, give or take its metadata)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_free_space(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{free} bytes free, {need} needed")


def _write_state(state: Dict[str, Any], path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def find_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint directory from a step directory, a state file, a checkpoints/ dir or a run directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if p.is_file():
        return p.parent
    if (p / STATE_FILE).is_file() or any(p.glob("*/mp_rank_*")):
        return p
    for store_root in (p, p / "checkpoints"):
        latest = CheckpointStore(store_root).latest() if store_root.is_dir() else None
        if latest is not None:
            return latest
    raise CheckpointError(f"no checkpoint found in {p} (expected {STATE_FILE}, a 'latest' pointer or step_* dirs)")


def decide_resume(resume: str, store: CheckpointStore) -> Optional[Path]:
    """Rank 0 decides what to resume from ('latest', 'none' or a path) and every rank gets its answer."""
    decision: Optional[Union[str, Exception]] = None
    if distributed.is_main():
        try:
            if resume == "latest":
                found = store.latest()
                decision = str(found) if found else None
            elif resume != "none":
                decision = str(find_checkpoint(resume))
        except CheckpointError as e:
            decision = e
    decision = distributed.broadcast_object(decision)
    if isinstance(decision, Exception):
        raise decision
    return Path(decision) if decision else None


def safe_torch_load(path: Union[str, Path], allowed: Sequence[type] = ()) -> Any:
    """torch.load of tensors and plain data only (weights_only, plus the `allowed` classes): a file that pickles a
    callable or any other object is refused with a CheckpointError naming the file and what it holds."""
    import pickle
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported global" in line or "GLOBAL" in line), lines[0])
        raise CheckpointError(f"{path}: refused to load: it pickles more than tensors and plain data ({detail}). "
                              f"Only load files you trust; re-save them as plain state dicts or safetensors") from None


def load_reference_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(weights, args) of a checkpoint written by MAE's `misc.save_model` (and the UniEmoX reference code built on
    it): `{'model', 'optimizer', 'epoch', 'scaler', 'args'}` with `args` a pickled argparse.Namespace, the one
    class allowed beyond plain data; a bare state dict (no 'model') is read as the weights. The other entries are
    ignored."""
    return reference_parts(safe_torch_load(path, allowed=REFERENCE_GLOBALS), path)


def reference_parts(raw: Any, path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(weights, args as a dict) of a loaded reference checkpoint (see load_reference_checkpoint)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, expected a dict of tensors or MAE's "
                              f"{{'model': ..., 'args': ...}}")
    weights = raw.get("model", raw)
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a dict of tensors")
    args = raw.get("args")
    return weights, vars(args) if hasattr(args, "__dict__") else dict(args or {})


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint's state dict safely (weights_only) and check its schema version."""
    ckpt_dir = find_checkpoint(path)
    file = ckpt_dir / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {STATE_FILE} (is it complete?)")
    state = safe_torch_load(file)
    check_schema(state, file)
    return state


def check_schema(state: Dict[str, Any], source: Any) -> None:
    version = state.get("schema_version") if isinstance(state, dict) else None
    if version is None:
        raise CheckpointError(f"{source} is not a checkpoint of this project (no schema_version key)")
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{source} was written by checkpoint schema version {version}, newer than this code "
                              f"reads ({SCHEMA_VERSION}); update the code to load it")


def strip_prefix(state_dict: Dict[str, Any], prefixes: Sequence[str] = ("module.", "_orig_mod.")) -> Dict[str, Any]:
    """Remove wrapper prefixes (DDP's module., torch.compile's _orig_mod.) from parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in prefixes:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def trained_weights(state: Dict[str, Any]) -> Dict[str, Any]:
    """The weights a checkpoint stands for: its EMA's when the run kept one (train.ema_decay), else the model's."""
    return (state.get("states") or {}).get("ema") or state["model"]


def summarize_keys(keys: Iterable[str]) -> str:
    """Key names grouped by their first part ('decoder_blocks.* (96)'), for load reports."""
    groups: Dict[str, int] = {}
    for k in keys:
        groups[k.split(".")[0]] = groups.get(k.split(".")[0], 0) + 1
    return ", ".join(g if g in keys else f"{g}.* ({n})" for g, n in groups.items()) or "none"


def load_model_state(model: torch.nn.Module, state_dict: Dict[str, Any], strict: bool = True,
                     allowed_missing: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """Load weights, report missing/unexpected keys; with strict, any key outside `allowed_missing` is an error."""
    result = model.load_state_dict(strip_prefix(state_dict), strict=False)
    missing = sorted(set(result.missing_keys) - set(allowed_missing))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        msg = f"state dict does not fit {type(model).__name__}: missing keys {missing}, unexpected keys {unexpected}"
        if strict:
            raise CheckpointError(msg)
        log.warning(msg)
    return missing, unexpected
