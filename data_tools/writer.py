"""Write samples into tar shards, one job per shard; `NNNNN_stats.json` marks a shard complete, reruns skip it."""
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import webdataset as wds

from data_tools.schema import SCHEMA_VERSION, encode_record, sample_key, shard_name
from runtime.atomic import atomic_write_json, atomic_write_text, file_sha256, fsync_dir

log = logging.getLogger(__name__)

# make_sample(item) -> (jpeg bytes or {member: bytes}, record); raises an exception with a `.reason` to skip it
SampleMaker = Callable[[Any], Tuple[Any, Dict[str, Any]]]


@dataclass
class ShardTask:
    split_dir: str
    split: str
    shard: int
    items: List[Any] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)  # how images are written (size, quality, detector)


def stats_path(split_dir: Path, shard: int) -> Path:
    return Path(split_dir) / f"{shard:05d}_stats.json"


def plan_digest(task: ShardTask) -> str:
    """Fingerprint of what a shard should hold: a rerun with another split, seed or image options (max side,
    quality, detector) rewrites the shard."""
    plan = {"items": task.items, "options": task.options} if task.options else task.items
    return hashlib.sha1(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def written_options(task: ShardTask) -> Dict[str, Any]:
    """The image options a finished shard's stats record (empty when there is none)."""
    try:
        return json.loads(stats_path(Path(task.split_dir), task.shard).read_text()).get("options") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def shard_complete(task: ShardTask) -> bool:
    stats = stats_path(Path(task.split_dir), task.shard)
    if not stats.is_file() or not (Path(task.split_dir) / shard_name(task.shard)).is_file():
        return False
    try:
        return json.loads(stats.read_text()).get("plan") == plan_digest(task)
    except (OSError, json.JSONDecodeError):
        return False


SHARD_MTIME = 1_700_000_000  # 2023-11-14, any whole second will do


@contextlib.contextmanager
def atomic_tar(path: Path) -> Iterator[wds.TarWriter]:
    """A TarWriter on a hidden partial file, flushed and renamed to `path` only when the block ends cleanly."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as stream:
        # A whole-second mtime: webdataset's default (time.time(), a float) makes tarfile add a PAX header to every
        # member, which doubles the headers the reader parses. Fixed, so rewriting a shard gives the same bytes.
        writer = wds.TarWriter(stream, mtime=SHARD_MTIME)
        yield writer
        writer.close()  # closes `stream` too
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def write_shard(task: ShardTask, make_sample: SampleMaker, threads: int = 0) -> Dict[str, Any]:
    """Write one shard to a hidden partial file, rename it into place, then write its stats (the marker)."""
    split_dir = Path(task.split_dir)
    tar = split_dir / shard_name(task.shard)
    stats: Dict[str, Any] = {"shard": tar.name, "split": task.split, "schema_version": SCHEMA_VERSION,
                             "plan": plan_digest(task), "options": task.options, "samples": 0, "failed": 0,
                             "failures": {}, "classes": {}}
    status_rows = []
    with atomic_tar(tar) as writer:
        for index, (item, result) in enumerate(zip(task.items, _results(task.items, make_sample, threads))):
            key = sample_key(task.split, task.shard, index)
            if isinstance(result, Exception):  # every failure is counted with its reason, none stops the shard
                reason = getattr(result, "reason", "unexpected_error")
                stats["failed"] += 1
                stats["failures"][reason] = stats["failures"].get(reason, 0) + 1
                status_rows.append({"key": key, "source": describe_item(item), "status": "failed",
                                    "reason": reason, "error": str(result)})
                if reason == "unexpected_error":
                    log.error("unexpected error on %s: %r", describe_item(item), result)
                continue
            image, record = result  # one JPEG, or {member name: bytes} (a clip's frames)
            members = image if isinstance(image, dict) else {"jpg": image}
            writer.write({"__key__": key, **members, "json": encode_record(record)})
            stats["samples"] += 1
            name = record.get("emotion") or "<unlabelled>"
            stats["classes"][name] = stats["classes"].get(name, 0) + 1
            status_rows.append({"key": key, "source": describe_item(item), "status": "ok", "reason": None,
                                "error": None})
    stats["sha256"] = file_sha256(tar)  # `verify` names a shard whose bytes changed after it was written
    atomic_write_text(status_path(split_dir, task.shard), "".join(json.dumps(r) + "\n" for r in status_rows))
    atomic_write_json(stats_path(split_dir, task.shard), stats)  # last: the completion marker
    return stats


def _call(make_sample: SampleMaker, item: Any):
    try:
        return make_sample(item)
    except Exception as e:
        return e


def _results(items: Sequence[Any], make_sample: SampleMaker, threads: int) -> Iterator[Any]:
    """Samples in item order; with threads > 0, up to that many are prepared concurrently (downloads)."""
    if threads <= 0:
        return (_call(make_sample, item) for item in items)
    pool = ThreadPoolExecutor(max_workers=threads)
    results = pool.map(partial(_call, make_sample), items)

    def drain():
        try:
            yield from results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return drain()


def status_path(split_dir: Path, shard: int) -> Path:
    return Path(split_dir) / f"{shard:05d}_status.jsonl"


def describe_item(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("source") or item.get("url") or item.get("path") or item)
    return str(item)


def plan_shards(split_dir: Path, split: str, items: Sequence[Any], shard_size: int,
                min_shards: int = 1, options: Any = None) -> List[ShardTask]:
    """Deal items into consecutive shards of at most shard_size (at least min_shards when there are enough items);
    `options` (an ImageOptions) is part of each shard's plan."""
    n_shards = max(-(-len(items) // shard_size), min(min_shards, len(items)), 1 if items else 0)
    per_shard = -(-len(items) // n_shards) if n_shards else 0
    opts = dataclasses.asdict(options) if options is not None else {}
    return [ShardTask(str(split_dir), split, i, list(items[i * per_shard:(i + 1) * per_shard]), opts)
            for i in range(n_shards)]


def run_shard_tasks(tasks: Sequence[ShardTask], make_sample: SampleMaker, workers: int = 1,
                    desc: str = "shards", threads: int = 0) -> List[Dict[str, Any]]:
    """Write every incomplete shard (in `workers` processes), logging a line per finished shard (samples, rate,
    time left); returns the stats of all shards."""
    todo = [t for t in tasks if not shard_complete(t)]
    skipped = len(tasks) - len(todo)
    if skipped:
        log.info("%s: %d of %d shards already complete, skipped", desc, skipped, len(tasks))
    changed = [(t, old) for t, old in ((t, written_options(t)) for t in todo) if old and old != t.options]
    if changed:
        task, old = changed[0]
        new = task.options
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v)
        log.info("%s: %d shard(s) were written with other image options (%s): rewriting them", desc, len(changed),
                 diff)
    for t in todo:
        Path(t.split_dir).mkdir(parents=True, exist_ok=True)
    if todo:
        items = sum(len(t.items) for t in todo)
        detector = todo[0].options.get("detector")
        log.info("%s: writing %d shard(s) of %d item(s) in %d process(es)%s", desc, len(todo), items,
                 max(1, min(workers, len(todo))), f", person detector {detector}" if detector else "")
    job = partial(write_shard, make_sample=make_sample, threads=threads)
    progress = ShardProgress(desc, todo)
    if workers <= 1 or len(todo) <= 1:
        for t in todo:
            progress.done(job(t))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
            for stats in pool.map(job, todo):
                progress.done(stats)
    return [json.loads(stats_path(Path(t.split_dir), t.shard).read_text()) for t in tasks]


class ShardProgress:
    """One log line per finished shard: how many, samples and failures so far, items per second, time left."""

    def __init__(self, desc: str, todo: Sequence[ShardTask]):
        self.desc, self.total = desc, len(todo)
        self.items_total = sum(len(t.items) for t in todo)
        self.finished = self.samples = self.failed = 0
        self.start = time.monotonic()

    def done(self, stats: Dict[str, Any]) -> None:
        self.finished += 1
        self.samples += stats["samples"]
        self.failed += stats["failed"]
        elapsed = time.monotonic() - self.start
        rate = (self.samples + self.failed) / max(elapsed, 1e-9)
        left = (self.items_total - self.samples - self.failed) / max(rate, 1e-9)
        log.info("%s: shard %d of %d written (%d samples, %d failed so far), %.1f items/s, about %s left", self.desc,
                 self.finished, self.total, self.samples, self.failed, rate, _duration(left))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def finalize_split(split_dir: Path, stats: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Write the split's sizes.json ({shard: samples}) and return its totals."""
    sizes = {s["shard"]: s["samples"] for s in stats}
    atomic_write_json(Path(split_dir) / "sizes.json", sizes)
    classes: Dict[str, int] = {}
    failures: Dict[str, int] = {}
    for s in stats:
        for k, v in s["classes"].items():
            classes[k] = classes.get(k, 0) + v
        for k, v in s["failures"].items():
            failures[k] = failures.get(k, 0) + v
    return {"shards": len(stats), "samples": sum(sizes.values()), "failed": sum(s["failed"] for s in stats),
            "failures": failures, "classes": dict(sorted(classes.items()))}


def write_info(out_dir: Path, info: Dict[str, Any]) -> None:
    info = {"schema_version": SCHEMA_VERSION, "command": " ".join(sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    atomic_write_json(Path(out_dir) / "info.json", info)
