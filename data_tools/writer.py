"""Write samples into tar shards, one job per shard; `NNNNN_stats.json` marks a shard complete, reruns skip it."""
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import webdataset as wds

from data_tools.schema import SCHEMA_VERSION, encode_record, sample_key, shard_name
from runtime.atomic import atomic_write_json, atomic_write_text, file_sha256, fsync_dir
from runtime.launcher_watch import die_with_parent

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


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` of one sharding job (0 <= index < count): it writes the shards whose number is
    index modulo count, so N parts together write exactly the shards of one run."""
    index: int
    count: int

    @classmethod
    def parse(cls, text: Optional[str], environ: Optional[Dict[str, str]] = None) -> Optional["Part"]:
        """`--part I/N`, else a Slurm array task's (SLURM_ARRAY_TASK_ID less SLURM_ARRAY_TASK_MIN, of
        SLURM_ARRAY_TASK_COUNT), else None (the whole job)."""
        env = os.environ if environ is None else environ
        if text is None and env.get("SLURM_ARRAY_TASK_COUNT"):
            text = f"{int(env['SLURM_ARRAY_TASK_ID']) - int(env.get('SLURM_ARRAY_TASK_MIN', 0))}/" \
                   f"{env['SLURM_ARRAY_TASK_COUNT']}"
        if text is None:
            return None
        try:
            index, count = (int(v) for v in str(text).split("/"))
        except ValueError:
            raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/4 (I from 0 to N - 1)") from None
        if not 0 <= index < count:
            raise ValueError(f"--part {text!r}: I must be in 0..{count - 1}")
        return cls(index, count)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index


PLAN = "plan.json"


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


def write_shard(task: ShardTask, make_sample: SampleMaker,
                results: Optional[Iterator[Any]] = None) -> Dict[str, Any]:
    """Write one shard to a hidden partial file, rename it into place, then write its stats (the marker).
    `results`: the task's samples, prepared elsewhere (a SampleStream), in item order; by default they are made
    here, one after the other."""
    split_dir = Path(task.split_dir)
    tar = split_dir / shard_name(task.shard)
    stats: Dict[str, Any] = {"shard": tar.name, "split": task.split, "schema_version": SCHEMA_VERSION,
                             "plan": plan_digest(task), "options": task.options, "samples": 0, "failed": 0,
                             "failures": {}, "classes": {}}
    status_rows = []
    with atomic_tar(tar) as writer:
        if results is None:
            results = (_call(make_sample, item) for item in task.items)
        for index, (item, result) in enumerate(zip(task.items, results)):
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


class SampleStream:
    """The samples of consecutive shards, prepared by one pool of threads with up to `window` items (default 32 per
    thread) in flight across shard boundaries. Samples are written in item order, so a slow item (a download that
    times out) holds the writer; the window lets the other threads go on downloading meanwhile, into the next shard
    too, instead of idling until it is done. Memory: the window's finished samples (about 50-100 KB each at 512 px)."""

    def __init__(self, tasks: Sequence[ShardTask], make_sample: SampleMaker, threads: int, window: int = 0):
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.make_sample, self.window = make_sample, window or 32 * threads
        self.items = (item for task in tasks for item in task.items)
        self.in_flight: deque = deque()

    def results(self, task: ShardTask) -> Iterator[Any]:
        """The results of `task`'s items, in order; the tasks' results must be taken in the order given."""
        for _ in task.items:
            for item in itertools.islice(self.items, max(0, self.window - len(self.in_flight))):
                self.in_flight.append(self.pool.submit(_call, self.make_sample, item))
            yield self.in_flight.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def write_shards(tasks: Sequence[ShardTask], make_sample: SampleMaker, threads: int = 0,
                 on_done: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Write shards one after the other in this process (their samples from one SampleStream when threads > 0)."""
    stream = SampleStream(tasks, make_sample, threads) if threads > 0 else None
    written = []
    try:
        for task in tasks:
            written.append(write_shard(task, make_sample, stream.results(task) if stream else None))
            if on_done is not None:
                on_done(written[-1])
    finally:
        if stream is not None:
            stream.close()
    return written


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
                    desc: str = "shards", threads: int = 0, part: Optional[Part] = None) -> List[Dict[str, Any]]:
    """Write every incomplete shard (of this `part` only, if given) in `workers` processes, logging a line per
    finished shard (samples, rate, time left); returns the stats of all shards (of this part's, with a part)."""
    if part is not None:
        tasks = [t for t in tasks if part.owns(t.shard)]
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
    progress = ShardProgress(desc, todo)
    if workers <= 1 or len(todo) <= 1:
        write_shards(todo, make_sample, threads, progress.done)
    else:
        # each process writes every n-th shard in turn (so its download threads can run ahead into its next shard);
        # the writers die with this process (a stopped or requeued part leaves none writing behind its back)
        lanes = [todo[i::workers] for i in range(min(workers, len(todo)))]
        with ProcessPoolExecutor(max_workers=len(lanes), mp_context=get_context("fork"),
                                 initializer=die_with_parent) as pool:
            running = [pool.submit(write_shards, lane, make_sample, threads) for lane in lanes]
            reported = [0] * len(lanes)
            while True:
                finished = wait(running, timeout=1.0).done
                for lane, count in enumerate(reported):  # log each shard as its completion marker appears
                    while count < len(lanes[lane]) and shard_complete(lanes[lane][count]):
                        progress.done(json.loads(stats_path(Path(lanes[lane][count].split_dir),
                                                            lanes[lane][count].shard).read_text()))
                        count += 1
                    reported[lane] = count
                for future in finished:
                    future.result()  # a lane that failed raises here
                if len(finished) == len(running):
                    break
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


def write_splits(out_dir: Path, plans: Dict[str, List[ShardTask]], make_sample: SampleMaker, info: Dict[str, Any],
                 workers: int = 1, desc: str = "shards", threads: int = 0,
                 part: Optional[Part] = None) -> Optional[Dict[str, Any]]:
    """The shards of every split (`plans`: split -> its tasks; this part's only, with a part), then, once every
    planned shard is complete, each split's sizes.json and info.json (`info` plus the splits' totals); returns
    that info, or None while other parts' shards are missing. OUT/plan.json, the same for every part, lets
    `merge-parts` finish the job."""
    out_dir = Path(out_dir)
    plan = {"splits": {split: {"dir": os.path.relpath(tasks[0].split_dir, out_dir) if tasks else split,
                               "shards": [plan_digest(t) for t in tasks]} for split, tasks in plans.items()},
            "info": info}
    atomic_write_json(out_dir / PLAN, plan)
    for split, tasks in plans.items():
        run_shard_tasks(tasks, make_sample, workers, f"{desc}/{split}" if len(plans) > 1 else desc, threads, part)
    missing = missing_shards(out_dir, plan)
    if missing:
        log.info("%s: part %d/%d done; %d shard(s) of other parts not written yet (e.g. %s): the last part to "
                 "finish, or `python -m data_tools merge-parts %s`, writes sizes.json and info.json", desc,
                 part.index if part else 0, part.count if part else 1, len(missing), missing[0], out_dir)
        return None
    return merge_parts(out_dir)


def missing_shards(out_dir: Path, plan: Dict[str, Any]) -> List[str]:
    """The planned shards without a completion marker of their plan, as 'SPLIT/NNNNN.tar'."""
    missing = []
    for split, entry in plan["splits"].items():
        split_dir = Path(out_dir) / entry["dir"]
        for shard, digest in enumerate(entry["shards"]):
            try:
                done = json.loads(stats_path(split_dir, shard).read_text()).get("plan") == digest \
                    and (split_dir / shard_name(shard)).is_file()
            except (OSError, json.JSONDecodeError):
                done = False
            if not done:
                missing.append(f"{split}/{shard_name(shard)}")
    return missing


def merge_parts(out_dir: Path) -> Dict[str, Any]:
    """sizes.json of every split and info.json, from OUT/plan.json and the shards' stats, when every planned shard
    is complete; otherwise an error naming the missing ones."""
    out_dir = Path(out_dir)
    try:
        plan = json.loads((out_dir / PLAN).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FileNotFoundError(f"{out_dir / PLAN}: not readable ({e}); it is written by crawl, shard-folder and "
                                f"shard-emoset before their first shard") from None
    missing = missing_shards(out_dir, plan)
    if missing:
        raise ValueError(f"{out_dir}: {len(missing)} planned shard(s) are not complete: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}; run (or requeue) the parts that write them")
    splits = {}
    for split, entry in plan["splits"].items():
        split_dir = out_dir / entry["dir"]
        for leftover in split_dir.glob(".*.tar.partial"):  # of a stopped writer; its shard was written since
            leftover.unlink(missing_ok=True)
        stats = [json.loads(stats_path(split_dir, i).read_text()) for i in range(len(entry["shards"]))]
        splits[split] = finalize_split(split_dir, stats)
    info = {**plan["info"], "splits": splits}
    write_info(out_dir, info)
    return info


def write_info(out_dir: Path, info: Dict[str, Any]) -> None:
    info = {"schema_version": SCHEMA_VERSION, "command": " ".join(sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    atomic_write_json(Path(out_dir) / "info.json", info)
