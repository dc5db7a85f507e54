"""Shard URLs -> raw tar samples, every loss counted: shards that cannot be opened or break off, samples dropped."""
import logging
from typing import Dict, Iterable, List, Optional

from data_tools.remote import URL_TIMEOUT_S, is_pipe, open_shard, read_sizes, shard_name, sizes_location

log = logging.getLogger(__name__)

MAX_FAILED_OPENS = 50      # shards in a row that cannot be opened: the source is unreadable, an error


class CorruptCounter:
    """Samples a loader's pipeline dropped, by reason (each loader makes one and hands it to its stages; every
    loader worker holds its own copy); warnings are rate-limited. A shard that cannot be opened or breaks off counts
    the samples it lost, known from the sizes.json beside it (1 without)."""

    def __init__(self):
        self.pending = 0
        self.total: Dict[str, int] = {}

    def add(self, reason: str, detail: str, n: int = 1) -> None:
        self.pending += n
        self.total[reason] = self.total.get(reason, 0) + n
        events = sum(self.total.values())
        if events - n < 5 or events // 1000 != (events - n) // 1000:
            log.warning("dropped %d (%s, %d so far in this worker): %s", n, reason, events, detail)

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n


def _expected_samples(url: str, sizes_cache: Dict[str, dict], timeout_s: float) -> Optional[int]:
    """The shard's sample count from the sizes.json beside it, or None where there is none to read."""
    if is_pipe(url):
        return None
    try:
        return read_sizes(url, timeout_s, sizes_cache).get(shard_name(url))
    except ValueError:
        sizes_cache[sizes_location(url)] = {}  # none to read: not asked again
        return None


def tar_samples(counter: CorruptCounter, timeout_s: float = URL_TIMEOUT_S):
    """Shard URLs -> raw samples (webdataset's tar expansion and grouping by key). A shard that cannot be opened
    (missing, 404/500, refused) or breaks off mid-tar (truncated, corrupt header, connection dropped, read timeout)
    is logged and its lost samples counted, and reading goes on; MAX_FAILED_OPENS failed opens in a row are an
    error naming the last shard."""
    from contextlib import closing
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def members(src: Iterable[Dict[str, str]]):
        failed, sizes_cache = 0, {}
        for item in src:
            url = item["url"]
            try:
                stream = open_shard(url, timeout_s)
            except Exception as e:
                expected = _expected_samples(url, sizes_cache, timeout_s)
                counter.add("unreadable_shard", f"{url}: {type(e).__name__}: {e}", expected or 1)
                failed += 1
                if failed >= MAX_FAILED_OPENS:
                    raise RuntimeError(f"no shard could be read: the last {failed} failed to open, the last "
                                       f"being {url} ({type(e).__name__}: {e})") from e
                continue
            failed = 0
            errors: List[Exception] = []
            keys = set()
            try:
                with closing(stream):
                    for member in tar_file_expander([{"url": url, "stream": stream}],
                                                    handler=lambda e: errors.append(e) or True):
                        if "fname" in member:
                            keys.add(member["fname"].split(".", 1)[0])
                        yield member
            except Exception as e:  # e.g. a pipe: command that exited non-zero, noticed when closed
                errors.append(e)
            # a sample cut short was seen and is dropped (and counted) later; the ones never seen are counted here.
            # tarfile ends an archive quietly at a corrupt header, so a shard shorter than its sizes.json is a loss
            expected = _expected_samples(url, sizes_cache, timeout_s)
            missing = expected - len(keys) if expected is not None else None
            if errors:
                counter.add("bad_tar", f"{url}: {type(errors[0]).__name__}: {errors[0]}",
                            max(0, missing) if missing is not None else 1)
            elif missing:
                counter.add("short_shard", f"{url}: {len(keys)} samples, its sizes.json says {expected}",
                            max(0, missing))

    def stage(src: Iterable[Dict[str, str]]):
        def count_tar_error(exn: Exception) -> bool:  # a broken tar is counted, and reading goes on
            counter.add("bad_tar", repr(exn))
            return True
        return group_by_keys(members(src), handler=count_tar_error)
    return stage
