"""The shard reader both trainers use: webdataset stages with explicit rank/worker split and (seed, epoch) seeds.

Order of stages: shard list (seeded permutation split by rank then worker, or seeded weighted resampling) ->
tar members -> shuffle buffer on raw bytes -> decode (corrupt samples dropped and counted) -> the trainer's
transform -> batches that carry the number of samples dropped since the previous batch (`batch["corrupt"]`).
"""
import io
import itertools
import math
import os
import random
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle

from data_tools.images import ImageError, load_rgb
from data_tools.remote import URL_TIMEOUT_S, shard_name
from data_tools.shard_errors import check_enough_shards
from data_tools.tar_stream import CorruptCounter, tar_samples
from runtime.launcher_watch import die_with_parent
from runtime.epochs import SharedEpoch
from runtime.seeding import seed_everything

LOADER_TIMEOUT_S = 900     # a worker that delivers no batch for this long is an error, never a silent hang
LOADER_JOIN_TIMEOUT_S = 5
FRAME_MEMBER = re.compile(r"f\d{4,}\.jpg")  # a clip chunk's frames (data_tools.frames)
MAX_FAILED_SAMPLES = 1000  # samples in a row the transform rejects: a wrong transform or wrong shards, an error


def expand_urls(spec: Union[str, Sequence[str]]) -> List[str]:
    """Brace patterns ('shards/{00000..00009}.tar') and lists of them -> concrete shard paths."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]


def _worker() -> tuple:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardList(IterableDataset):
    """Shard URLs for one rank and loader worker, for the pass the shared position describes.

    Plain: every epoch a permutation seeded by (seed, epoch), identical on all ranks, dealt to ranks then workers,
    so each shard is read exactly once per epoch. Resampled: shards drawn with replacement by weight, seeded by
    (seed, epoch, segment, rank, worker) — endless; `limit_batches` ends the pass. In a loader worker the pass also
    reseeds python, numpy and torch from (seed, epoch, segment, rank, worker): the augmentations of a pass depend on
    where it is in the run, not on what the (persistent) worker drew before, so a resumed run draws what an
    uninterrupted one does.
    """

    def __init__(self, sources: Sequence[Sequence[str]], weights: Optional[Sequence[float]], resampled: bool,
                 seed: int, epoch: SharedEpoch, rank: int, world_size: int):
        self.urls: List[str] = []
        self.url_weights: List[float] = []
        weights = weights or [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights given for {len(sources)} shard sources")
        for urls, weight in zip(sources, weights):
            if not urls:
                raise ValueError("a shard source expands to no shards")
            self.urls += list(urls)
            self.url_weights += [weight / len(urls)] * len(urls)  # a source's weight shared by its shards
        self.resampled, self.seed, self.epoch = resampled, seed, epoch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Dict[str, str]]:
        epoch, segment = self.epoch.get(), self.epoch.segment
        worker, n_workers = _worker()
        if get_worker_info() is not None:
            seed_everything(_derived_seed(f"{self.seed}/{epoch}/{segment}/{self.rank}/{worker}/augment"))
        if self.resampled:
            rng = random.Random(f"{self.seed}/{epoch}/{segment}/{self.rank}/{worker}")
            while True:
                yield {"url": rng.choices(self.urls, weights=self.url_weights)[0]}
        urls = list(self.urls)
        random.Random(f"{self.seed}/{epoch}").shuffle(urls)
        for url in urls[self.rank::self.world_size][worker::n_workers]:
            yield {"url": url}


def _derived_seed(text: str) -> int:
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def seeded_shuffle(bufsize: int, seed: int, epoch: SharedEpoch, rank: int):
    """Shuffle buffer over raw samples (before decoding) with a seed from (seed, epoch, segment, rank, worker)."""
    def stage(src: Iterable[Dict[str, Any]]):
        if bufsize <= 1:
            yield from src
            return
        worker, _ = _worker()
        rng = random.Random(f"{seed}/{epoch.get()}/{epoch.segment}/{rank}/{worker}/shuffle")
        yield from _shuffle(src, bufsize=bufsize, initial=min(bufsize, 100), rng=rng)
    return stage


def limit_batches(epoch: SharedEpoch):
    """This worker's share of the batches the pass owes (ceil(owed / workers)): resampled shards never run out."""
    def stage(src: Iterable[Dict[str, Any]]):
        _, workers = _worker()
        yield from itertools.islice(src, math.ceil(epoch.batches / workers))
    return stage


def attach_sidecar(sidecar_dir: str, counter: CorruptCounter):
    """Add the arrays of a sidecar shard (same file name in `sidecar_dir`, same keys: e.g. the teacher cache's
    `clip_image.npy`, `clip_text.npy`) to each sample as sample["sidecar"]["clip_image"], ...; a sample without
    its sidecar entry is counted and dropped."""
    import numpy as np
    from pathlib import Path
    from data_tools.tars import read_tar

    def stage(src: Iterable[Dict[str, Any]]):
        current, arrays = None, {}
        for sample in src:
            url = sample.get("__url__")
            if url != current:
                current = url
                members, error = read_tar(Path(sidecar_dir) / shard_name(url))
                if error:
                    counter.add("bad_sidecar", f"{sidecar_dir}/{shard_name(url)}: {error}")
                arrays = {k: {ext.removesuffix(".npy"): np.load(io.BytesIO(b)) for ext, b in v.items()}
                          for k, v in members.items()}
            extra = arrays.get(sample["__key__"])
            if extra is None:
                counter.add("missing_sidecar", f"{url}:{sample['__key__']} not in {sidecar_dir}")
                continue
            sample["sidecar"] = extra
            yield sample
    return stage


def decode_samples(counter: CorruptCounter, image_format: str = "pil"):
    """Raw tar members -> {'__key__', '__url__', 'image', 'meta'}; unusable samples are dropped and counted.
    image_format: 'pil' (decoded RGB), 'lazy' (opened, decoded by the transform: data_tools.crops can then decode
    a JPEG at draft scale; broken data are counted there), 'torchvision' (uint8 CHW tensor) or 'frames' (a clip
    chunk of shard-frames: `frames`, its f0000.jpg ... members' bytes in order, decoded by the transform)."""
    import json
    from torchvision.io import ImageReadMode, decode_image

    def stage(src: Iterable[Dict[str, Any]]):
        for sample in src:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            if "json" not in sample:
                counter.add("missing_json", where)
                continue
            frames = sorted((k for k in sample if FRAME_MEMBER.fullmatch(k)), key=lambda k: int(k[1:-4])) \
                if image_format == "frames" else []
            if (image_format == "frames" and not frames) or (image_format != "frames" and "jpg" not in sample):
                counter.add("missing_image", where)
                continue
            try:
                meta = json.loads(sample["json"])
                if image_format == "frames":
                    image = [sample[k] for k in frames]
                elif image_format in ("pil", "lazy"):
                    image = Image.open(io.BytesIO(sample["jpg"]))  # the header only
                    if image_format == "pil":
                        image = load_rgb(image)
                else:
                    image = decode_image(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8),
                                         mode=ImageReadMode.RGB)
            except Exception as e:  # any undecodable member is a corrupt sample, never a crash
                counter.add("corrupt_sample", f"{where}: {type(e).__name__}: {e}")
                continue
            out = {"__key__": sample["__key__"], "__url__": sample.get("__url__"), "meta": meta,
                   ("frames" if image_format == "frames" else "image"): image}
            if "sidecar" in sample:
                out["sidecar"] = sample["sidecar"]
            yield out
    return stage


def transform_samples(transform: Callable[[Dict[str, Any]], Dict[str, Any]], counter: CorruptCounter):
    """The trainer's transform on each decoded sample; a sample it rejects (a record field of the wrong type or out
    of range, a box it cannot crop) is counted and dropped, one it returns None for is skipped uncounted.
    MAX_FAILED_SAMPLES rejections in a row are an error: the transform or the kind of shards is wrong, not one
    sample."""
    def stage(src: Iterable[Dict[str, Any]]):
        failed = 0
        for sample in src:
            try:
                out = transform(sample)
            except ImageError as e:  # a lazily decoded image whose data are broken: corrupt, like at decode
                counter.add("corrupt_sample", f"{sample.get('__url__')}:{sample.get('__key__')}: {e}")
                continue
            except Exception as e:
                counter.add("bad_sample", f"{sample.get('__url__')}:{sample.get('__key__')}: {type(e).__name__}: {e}")
                failed += 1
                if failed >= MAX_FAILED_SAMPLES:
                    raise RuntimeError(f"the transform rejected {failed} samples in a row, the last "
                                       f"{sample.get('__url__')}:{sample.get('__key__')} ({type(e).__name__}: {e}); "
                                       f"are these the right shards for this trainer?") from e
                continue
            failed = 0
            if out is not None:  # None: the transform skipped the sample on purpose (e.g. class balancing)
                yield out
    return stage


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Tensors stacked, numbers made tensors, anything else (keys, metadata) kept as lists."""
    batch: Dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(torch.is_tensor(v) for v in values):
            batch[key] = default_collate(values)  # in a loader worker: stacked straight into shared memory
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def batch_with_counts(batch_size: int, partial: bool, counter: CorruptCounter):
    """Batches of the transformed samples; each carries `corrupt`, the samples dropped since the last batch, and
    `worker_pid`, the process that made it.

    One batch is held back until the next is complete (or the stream ends), so samples dropped after the
    last full batch are still reported, on the final batch.
    """
    def stage(src: Iterable[Dict[str, Any]]):
        pid = os.getpid()
        held: Optional[Dict[str, Any]] = None
        buf: List[Dict[str, Any]] = []
        for sample in src:
            buf.append(sample)
            if len(buf) == batch_size:
                if held is not None:
                    yield {**held, "corrupt": counter.take(), "worker_pid": pid}
                held, buf = collate(buf), []
        if buf and partial:
            if held is not None:
                yield {**held, "corrupt": 0, "worker_pid": pid}
            held = collate(buf)
        if held is not None:
            yield {**held, "corrupt": counter.take(), "worker_pid": pid}
    return stage


def leave_stop_signals_to_main(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1/SIGINT: at preemption Slurm signals every process of the job, and
    Ctrl-C every process of the terminal's group; the training process must be able to read its next batch,
    checkpoint and exit by itself. They die with it."""
    import signal
    die_with_parent(signal.SIGKILL)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class ShardLoader(DataLoader):
    """A DataLoader over shards. Not persistent: each iteration, when it ends (exhausted, closed or dropped), shuts
    its workers down and waits for its queue-feeder threads to exit (a worker forked while another thread of the
    process is exiting can deadlock inside CPython's fork before it runs a line: seen when an evaluation loader
    forked just as the training loader's feeder threads were ending). Persistent: the same workers serve every
    pass, each pass reading the shared position (SharedEpoch) when it starts; `close()` shuts them down."""

    def __iter__(self):
        from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
        it = super().__iter__()
        try:
            yield from it
        finally:
            if not self.persistent_workers and isinstance(it, _MultiProcessingDataLoaderIter):
                _shut_down(it)

    def close(self) -> None:
        """Shut the persistent workers down (the trainer's stream does, when the run ends)."""
        if self.persistent_workers and self._iterator is not None:
            _shut_down(self._iterator)
            self._iterator = None

    @property
    def num_batches(self) -> Optional[int]:
        """Batches a pass of a resampled loader gives: the owed batches rounded up to a multiple of the workers."""
        if not self.resampled:
            return None
        workers = max(1, self.num_workers)
        return math.ceil(self.epoch.batches / workers) * workers


def _shut_down(it) -> None:
    it._shutdown_workers()
    for queue in getattr(it, "_index_queues", []):
        feeder = getattr(queue, "_thread", None)
        if feeder is not None:
            feeder.join(timeout=LOADER_JOIN_TIMEOUT_S)


def make_loader(urls: Union[str, Sequence[str], Sequence[Sequence[str]]], *, batch_size: int,
                transform: Callable[[Dict[str, Any]], Dict[str, Any]], num_workers: int = 2, seed: int = 0,
                epoch: Optional[SharedEpoch] = None, rank: int = 0, world_size: int = 1, resampled: bool = True,
                batches_per_epoch: Optional[int] = None, weights: Optional[Sequence[float]] = None,
                shuffle_buffer: int = 1000, image_format: str = "pil", drop_last: bool = True,
                sidecar_dir: Optional[str] = None, url_timeout_s: float = URL_TIMEOUT_S,
                persistent: bool = False) -> ShardLoader:
    """A DataLoader over shards. `urls`: a brace pattern, a list of shards, or a list of sources (lists) to mix
    by `weights` (resampled only). `epoch`: the shared position its passes read (epoch, segment, batches owed);
    `batches_per_epoch`, required when resampled, sets the batches owed (rounded up to a multiple of num_workers;
    the loader's `num_batches` says how many). `sidecar_dir`: a directory of sidecar shards merged by key
    (sample["sidecar"]). `persistent`: one set of workers for every pass (close() ends them). Shards are paths,
    http(s) URLs or `pipe:` commands; `url_timeout_s` bounds each connection and read."""
    if isinstance(urls, str) or (urls and isinstance(urls[0], str)):
        sources = [expand_urls(urls)]
    else:
        sources = [expand_urls(s) for s in urls]
    n_shards = sum(len(s) for s in sources)
    if n_shards == 0:
        raise ValueError(f"no shards match {urls!r}")
    if len(sources) > 1 and not resampled:
        raise ValueError("mixing several shard sources by weight needs resampled=True")
    if not resampled:
        check_enough_shards(n_shards, num_workers, world_size, f"{urls!r}" if isinstance(urls, str) else "the shards")
    if resampled and not batches_per_epoch:
        raise ValueError("resampled shards are endless: give batches_per_epoch")
    epoch = epoch or SharedEpoch()
    if resampled:
        epoch.set(epoch.get(), epoch.segment, batches_per_epoch)
    counter = CorruptCounter()
    stages = [ShardList(sources, weights, resampled, seed, epoch, rank, world_size),
              tar_samples(counter, url_timeout_s)]
    if sidecar_dir:
        stages.append(attach_sidecar(sidecar_dir, counter))
    stages += [seeded_shuffle(shuffle_buffer, seed, epoch, rank), decode_samples(counter, image_format),
               transform_samples(transform, counter), batch_with_counts(batch_size, not drop_last, counter)]
    if resampled:
        stages.append(limit_batches(epoch))
    # the loader's own generator: its per-pass seed draws must not move the trainer's global RNG (a resumed run
    # would then draw other masks than an uninterrupted one); the workers seed themselves per pass (ShardList)
    loader = ShardLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available(), persistent_workers=persistent and num_workers > 0,
                         worker_init_fn=leave_stop_signals_to_main, generator=torch.Generator(),
                         timeout=LOADER_TIMEOUT_S if num_workers else 0)
    loader.resampled = resampled
    loader.epoch = epoch
    loader.num_shards = n_shards
    loader.counter = counter  # the totals of this process's copy (all of them with num_workers=0)
    return loader
