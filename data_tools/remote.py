"""Shards by path, http(s) URL or webdataset `pipe:` command: opened with bounded timeouts, sizes.json read beside them."""
import json
import posixpath
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Dict, Optional

from data_tools.shard_errors import ShardError

URL_TIMEOUT_S = 60.0     # connect, and each read: a server that stops sending is an error, never a hang
OPEN_ATTEMPTS = 3        # a refused connection or a 5xx is tried again (like curl --retry); a 4xx is not
RETRY_DELAY_S = 1.0


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def is_remote(url: str) -> bool:
    """Not a local path: nothing can be checked about it before it is read."""
    return is_http(url) or is_pipe(url)


def shard_name(url: str) -> str:
    """The shard's file name, the key of sizes.json and of the teacher cache's sidecar shards."""
    return posixpath.basename(url.split("?", 1)[0]) if is_http(url) else Path(url).name


def _urlopen(url: str, timeout_s: float):
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return urllib.request.urlopen(url, timeout=timeout_s)
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == OPEN_ATTEMPTS - 1:
                raise
        except urllib.error.URLError:
            if attempt == OPEN_ATTEMPTS - 1:
                raise
        time.sleep(RETRY_DELAY_S * (attempt + 1))
    raise AssertionError("unreachable")


class CheckedBody:
    """An HTTP response body that raises at its end if the server sent fewer bytes than its Content-Length said
    (http.client reports a dropped connection as a plain end of data, and tarfile reads that as a short archive)."""

    def __init__(self, response, url: str):
        self.response, self.url = response, url
        length = response.headers.get("Content-Length")
        self.expected = int(length) if length and length.isdigit() else None
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        data = self.response.read(size)
        self.received += len(data)
        if (not data or size is None or size < 0) and self.expected is not None and self.received < self.expected:
            raise ConnectionError(f"{self.url}: connection closed after {self.received} of {self.expected} bytes")
        return data

    def close(self) -> None:
        self.response.close()


def open_shard(url: str, timeout_s: float = URL_TIMEOUT_S) -> BinaryIO:
    """A readable binary stream of the shard. http(s): urllib with `timeout_s` on the connection and on every
    read (webdataset's curl opener has none, so a stalled server would hang the loader); pipe: webdataset's
    opener (the command's exit status is checked when the stream is closed); anything else: a local file."""
    if is_http(url):
        return CheckedBody(_urlopen(url, timeout_s), url)
    if is_pipe(url):
        from webdataset.gopen import gopen
        return gopen(url)
    return open(url, "rb")


def sizes_location(shard_url: str) -> str:
    """Where data_tools wrote the sizes.json of this shard's split: beside it."""
    if is_http(shard_url):
        return shard_url.split("?", 1)[0].rsplit("/", 1)[0] + "/sizes.json"
    return str(Path(shard_url).parent / "sizes.json")


def read_sizes(shard_url: str, timeout_s: float = URL_TIMEOUT_S, cache: Optional[Dict[str, dict]] = None) -> dict:
    """The sizes.json ({shard name: samples}) written by data_tools beside a shard, local or over http(s)."""
    if is_pipe(shard_url):
        raise ShardError(f"{shard_url}: the size of a pipe: shard cannot be looked up; set data.samples_per_epoch")
    where = sizes_location(shard_url)
    if cache is not None and where in cache:
        return cache[where]
    try:
        if is_http(where):
            with _urlopen(where, timeout_s) as response:
                sizes = json.loads(response.read())
        else:
            sizes = json.loads(Path(where).read_text())
    except (OSError, urllib.error.URLError) as e:
        raise ShardError(f"{where} could not be read ({e}): set data.samples_per_epoch "
                         f"(shards not made by data_tools?)") from e
    except json.JSONDecodeError as e:
        raise ShardError(f"{where} is not valid JSON ({e})") from e
    if cache is not None:
        cache[where] = sizes
    return sizes
