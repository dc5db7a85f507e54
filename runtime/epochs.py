"""Where a run is in its data: the position loader workers read when a pass starts, and the endless
epoch-by-epoch stream of micro-batches a trainer draws from one loader."""
import multiprocessing as mp
from typing import Any, Callable, Dict, Iterable, Iterator, Optional


class SharedEpoch:
    """Where the run is in its data, set by the main process and read by the loader's workers (forked, and kept
    across passes) when a pass starts: the epoch, the segment (a run resumed part-way through an epoch, or a rank's
    extra pass over plain shards, reads its own seeded stream) and the batches the pass owes this rank (resampled
    shards are endless; 0: until the shards run out). Shared memory, so a running worker sees each new value."""

    def __init__(self, epoch: int = 0, segment: int = 0, batches: int = 0):
        self._values = mp.Array("q", [epoch, segment, batches])

    def set(self, epoch: int, segment: int = 0, batches: Optional[int] = None) -> None:
        self._values[0], self._values[1] = epoch, segment
        if batches is not None:
            self._values[2] = batches

    def get(self) -> int:
        return self._values[0]

    @property
    def segment(self) -> int:
        return self._values[1]

    @property
    def batches(self) -> int:
        return self._values[2]


def epoch_stream(loader: Iterable[Dict[str, Any]], steps_per_epoch: int, accum: int, start_step: int,
                 epoch: SharedEpoch, no_batch: Callable[[Any], str]) -> Iterator[Dict[str, Any]]:
    """A trainer's micro-batches from step `start_step` on, epoch after epoch, endlessly, from one loader. Before
    each pass the shared position is set (epoch; segment: where in the epoch the pass starts, so a resumed epoch
    reads a fresh seeded stream; the micro-batches the epoch still owes) and the loader's workers pick it up. A pass
    that runs short (plain shards) is followed by another on its own segment, so every rank yields the same number;
    one that yields nothing is an error (`no_batch(loader)` says what was read) rather than an endless loop. The
    loader is closed when the stream is."""
    current, in_epoch = divmod(start_step, steps_per_epoch)
    try:
        while True:
            needed, segment = (steps_per_epoch - in_epoch) * accum, in_epoch
            while needed > 0:
                epoch.set(current, segment, needed)
                got, batches = 0, iter(loader)
                try:
                    for batch in batches:
                        got += 1
                        yield batch
                        needed -= 1
                        if needed == 0:
                            break
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:  # a loader that is not persistent shuts its workers down now
                        close()
                if got == 0:
                    raise RuntimeError(no_batch(loader))
                segment += 1_000_003  # this rank's plain shards ran out: another pass, so ranks stay in step
            current, in_epoch = current + 1, 0
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
