"""`crawl`: URL lists (CSV/TSV/parquet/JSONL, FindingEmo annotations) -> downloaded, validated images in shards."""
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlparse

import pandas as pd
import requests
import urllib3

from data_tools.address_guard import AddressPolicy, BlockedAddress, guarded_session
from data_tools.images import ImageError
from data_tools.registry import SINGLE_LABEL, UNLABELLED
from data_tools.samples import ImageOptions, SampleBuilder
from data_tools.writer import Part, plan_shards, write_splits

log = logging.getLogger(__name__)
URL_COLUMNS = ("url", "URL", "image_url", "img_url")
LABEL_COLUMNS = ("label", "emotion", "class")
CAPTION_COLUMNS = ("caption", "text", "description")
USER_AGENT = "uniemox-crawler/0.1 (research; image dataset builder)"
MAX_REDIRECTS = 5


class DownloadError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class AnnotationError(ValueError):
    """An annotation file that cannot be read as a URL list."""


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    sep = "\t" if suffix == ".tsv" else ","
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)  # FindingEmo's .ann is CSV too


def _pick(columns: Sequence[str], wanted: Sequence[str], given: Optional[str], path: Path, what: str) -> Optional[str]:
    if given:
        if given not in columns:
            raise AnnotationError(f"{path}: no column {given!r} for {what} (columns: {', '.join(columns)})")
        return given
    return next((c for c in wanted if c in columns), None)


def _url_map(path: Path) -> Dict[str, List[str]]:
    """FindingEmo's dataset_urls_exploded.json: [{rel_path, idx_url, url}, ...] -> rel_path: urls in idx order."""
    rows = json.loads(Path(path).read_text())
    out: Dict[str, List[tuple]] = {}
    for row in rows:
        out.setdefault(row["rel_path"], []).append((row.get("idx_url", 0), row["url"]))
    return {k: [u for _, u in sorted(v)] for k, v in out.items()}


def read_annotations(path: str, url_column: Optional[str] = None, label_column: Optional[str] = None,
                     caption_column: Optional[str] = None, url_map: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows as crawl items: {'urls': [...], 'source', 'label_name', 'caption', 'valence', 'arousal'}."""
    path = Path(path)
    table = read_table(path)
    columns = [str(c) for c in table.columns]
    url_col = _pick(columns, URL_COLUMNS, url_column, path, "URLs")
    mapping = _url_map(Path(url_map)) if url_map else None
    if url_col is None and "image_path" in columns:
        url_col = "image_path"  # FindingEmo: a relative path, looked up in the URL map (or itself a URL)
    if url_col is None:
        raise AnnotationError(f"{path}: no URL column (looked for {', '.join(URL_COLUMNS)} or image_path; "
                              f"columns: {', '.join(columns)}); name it with --url-column")
    label_col = _pick(columns, LABEL_COLUMNS, label_column, path, "labels")
    caption_col = _pick(columns, CAPTION_COLUMNS, caption_column, path, "captions")
    items = []
    for row in table.to_dict("records"):
        ref = str(row.get(url_col) or "").strip()
        urls = mapping.get(ref, []) if mapping is not None and not ref.startswith(("http://", "https://")) else \
            ([ref] if ref else [])
        item = {"urls": urls, "source": ref or "<missing url>",
                "label_name": str(row[label_col]).strip() if label_col and str(row[label_col]).strip() else None,
                "caption": str(row[caption_col]) if caption_col and str(row[caption_col]).strip() else None}
        for key in ("valence", "arousal"):
            if key in row and str(row[key]).strip() not in ("", "nan"):
                item[key] = float(row[key])
        items.append(item)
    return items


def fetch(url: str, timeout: float = 10.0, retries: int = 2, max_bytes: int = 20_000_000,
          session: Optional[requests.Session] = None, max_seconds: float = 60.0,
          policy: Optional[AddressPolicy] = None) -> bytes:
    """GET an image over http(s) with a byte cap and a time cap (`timeout` per connection or read, `max_seconds`
    for a whole answer, so a server that trickles bytes cannot hold a thread); transient failures (timeouts, 5xx,
    429) are retried. Redirects are followed up to MAX_REDIRECTS, to http(s) only. Every connection, the
    redirects' too, goes only where `policy` allows (default: public addresses; data_tools.address_guard); a
    `session` given must be made by guarded_session."""
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError("bad_scheme", f"{url}: only http and https URLs are fetched")
    if session is None:
        session = guarded_session(policy or AddressPolicy(), MAX_REDIRECTS)
    last: Optional[DownloadError] = None
    for _ in range(retries + 1):
        try:
            with session.get(url, timeout=timeout, stream=True, headers={"User-Agent": USER_AGENT}) as r:
                if r.status_code != 200:
                    last = DownloadError(f"http_{r.status_code}", f"{url}: HTTP {r.status_code}")
                    if r.status_code in (429, 500, 502, 503, 504):
                        continue
                    raise last
                ctype = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if ctype in ("text/html", "application/xhtml+xml"):
                    raise DownloadError("not_an_image", f"{url}: server returned {ctype}, not an image")
                declared = r.headers.get("Content-Length") or "0"
                if not declared.isdigit() or int(declared) > max_bytes:
                    raise DownloadError("too_large", f"{url}: Content-Length {declared[:40]} > {max_bytes} bytes")
                return _read_body(r, url, max_bytes, max_seconds)
        except BlockedAddress as e:
            raise DownloadError("blocked_address", f"{url}: {e}") from None
        except requests.TooManyRedirects:
            raise DownloadError("redirect_loop", f"{url}: more than {MAX_REDIRECTS} redirects") from None
        except requests.exceptions.InvalidSchema as e:
            raise DownloadError("bad_redirect", f"{url}: redirected to a URL that is not http(s) ({e})") from None
        except requests.Timeout:
            last = DownloadError("timeout", f"{url}: no answer within {timeout} s")
        except requests.ConnectionError as e:
            last = DownloadError("connection_error", f"{url}: {type(e).__name__}")
        except requests.RequestException as e:
            raise DownloadError("request_error", f"{url}: {e}") from None
    raise last


def _read_body(response, url: str, max_bytes: int, max_seconds: float) -> bytes:
    """The body, read as it arrives (read1: whatever the socket has), within the byte and time caps."""
    chunks, size, deadline = [], 0, time.monotonic() + max_seconds
    while True:
        try:
            chunk = response.raw.read1(64 * 1024, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError:
            raise requests.Timeout() from None  # read straight from urllib3: its errors are not requests' yet
        except urllib3.exceptions.HTTPError as e:
            raise requests.ConnectionError(str(e)) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise DownloadError("too_large", f"{url}: more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise DownloadError("too_slow", f"{url}: {size} bytes after {max_seconds} s (limit max_seconds)")
        chunks.append(chunk)


class CrawlSample:
    """Picklable shard job body: download an item (its URLs tried in order) and build its sample. Each download
    thread keeps one session, so connections to a host stay open from one image to the next (keep-alive)."""

    def __init__(self, builder: SampleBuilder, split: str, timeout: float, retries: int, max_bytes: int,
                 max_seconds: float = 60.0, policy: Optional[AddressPolicy] = None):
        self.builder, self.split, self.policy = builder, split, policy or AddressPolicy()
        self.timeout, self.retries, self.max_bytes, self.max_seconds = timeout, retries, max_bytes, max_seconds
        self._local = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}  # sessions stay in their process

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local())

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = guarded_session(self.policy, MAX_REDIRECTS)
        return self._local.session

    def __call__(self, item: Dict[str, Any]):
        if not item["urls"]:
            raise DownloadError("missing_url", f"row {item['source']!r} has no URL")
        label = None
        if item["label_name"] is not None:
            if item["label_name"] not in self.builder.classes:
                raise DownloadError("unknown_label", f"label {item['label_name']!r} not in the class list")
            label = self.builder.classes.index(item["label_name"])
        error: Exception = DownloadError("missing_url", "no URL")
        for url in item["urls"]:
            try:
                data = fetch(url, self.timeout, self.retries, self.max_bytes, session=self.session,
                             max_seconds=self.max_seconds)
                return self.builder.build(data, split=self.split, source=url, label=label, text=item["caption"],
                                          caption=item["caption"], valence=item.get("valence"),
                                          arousal=item.get("arousal"))
            except (DownloadError, ImageError) as e:
                error = e  # try the item's next URL
        raise error


def crawl(annotations: str, out: str, *, name: str = "web", split: str = "train", shard_size: int = 1000,
          min_shards: int = 1, workers: int = 1, threads: int = 16, timeout: float = 10.0, retries: int = 2,
          max_bytes: int = 20_000_000, max_seconds: float = 60.0, classes: Optional[Sequence[str]] = None,
          url_column: Optional[str] = None,
          label_column: Optional[str] = None, caption_column: Optional[str] = None, url_map: Optional[str] = None,
          options: Optional[ImageOptions] = None, allow_private: bool = False,
          allow_cidrs: Sequence[str] = (), part: Optional[Part] = None) -> Optional[Dict[str, Any]]:
    """Download every row's image into out/NNNNN.tar (+ _stats.json, _status.jsonl); finished shards are skipped.
    Only public addresses are connected to unless `allow_private` or `allow_cidrs` say otherwise; a refused URL is
    a `blocked_address` failure."""
    options = options or ImageOptions()
    policy = AddressPolicy.from_args(allow_private, allow_cidrs)
    items = read_annotations(annotations, url_column, label_column, caption_column, url_map)
    if classes is None:
        classes = sorted({i["label_name"] for i in items if i["label_name"] is not None})
    builder = SampleBuilder(name, classes, options)
    out_path = Path(out)
    tasks = plan_shards(out_path, split, items, shard_size, min_shards, options)
    info = {"dataset": name, "task": SINGLE_LABEL if classes else UNLABELLED, "classes": list(classes),
            "source": str(annotations), "image": {"max_side": options.max_side, "quality": options.quality,
                                                  "max_pixels": options.max_pixels}, "detector": options.detector}
    info = write_splits(out_path, {split: tasks}, CrawlSample(builder, split, timeout, retries, max_bytes,
                                                              max_seconds, policy), info, workers,
                        f"crawl {name}", threads, part)
    if info is None:
        return None
    summary = info["splits"][split]
    log.info("crawl %s: %d of %d rows downloaded, failures: %s", name, summary["samples"], len(items),
             summary["failures"])
    return summary
