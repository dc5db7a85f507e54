"""Shards over http(s) and pipe: — the same samples as from disk, sizes from the remote sizes.json, a faulty server's
losses counted with bounded waits, and a clear error when nothing can be read."""
import tarfile
import time

import numpy as np
import pytest
import torch

from data_tools.reader import make_loader
from data_tools.remote import open_shard
from data_tools.tar_stream import MAX_FAILED_OPENS
from pretrain.data import check_shards, count_samples

from conftest import run_torchrun
from image_data import toy_train_shards
from pretrain_fixtures import pretrain_args
from shard_server import serve


def key_only(sample):
    return {"key": sample["__key__"], "image": torch.from_numpy(np.array(sample["image"]))}


def keys_of(path):
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """60 images in 10 shards of 6, with sizes.json."""
    return toy_train_shards(tmp_path_factory.mktemp("remote"))


def read_keys(urls, **kw):
    loader = make_loader(urls, batch_size=2, transform=key_only, num_workers=2, resampled=False, drop_last=False,
                         **kw)
    batches = list(loader)
    return [k for b in batches for k in b["key"]], sum(int(b["corrupt"]) for b in batches)


def test_http_and_pipe_shards_give_the_samples_of_the_files(split):
    httpd, requests = serve(split)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        local, _ = read_keys(str(split / "{00000..00009}.tar"))
        remote, dropped = read_keys(f"{url}/{{00000..00009}}.tar")
        piped, _ = read_keys([f"pipe:cat {split / f'{i:05d}.tar'}" for i in range(10)])
        assert len(local) == 60 and sorted(remote) == sorted(local) == sorted(piped) and dropped == 0
        assert requests.count("sizes.json") == 2  # each loader worker read it once, for all its shards
        assert count_samples([f"{url}/{{00000..00009}}.tar"]) == count_samples([str(split / "{00000..00009}.tar")])
        assert requests.count("sizes.json") == 3  # and counting the samples, once for all shards of a directory
        assert check_shards([f"{url}/{{00000..00009}}.tar"])[0][3] == f"{url}/00003.tar"
        with pytest.raises(ValueError, match="does not list 00042.tar"):
            count_samples([f"{url}/00042.tar"])
        with pytest.raises(ValueError, match="pipe: shard.*data.samples_per_epoch"):
            count_samples([f"pipe:cat {split / '00000.tar'}"])
    finally:
        httpd.shutdown()


def test_a_faulty_server_costs_its_shards_counted_and_never_hangs(split):
    """404 and 500 (tried 3 times), a connection dropped mid-tar and a body that stalls: the other shards are read
    whole, each failure is counted, and the stall ends at the read timeout."""
    bad = {"00001.tar": "404", "00002.tar": "500", "00003.tar": "drop", "00004.tar": "stall"}
    httpd, requests = serve(split, fail={"00001.tar": 404, "00002.tar": 500}, drop=["00003.tar"],
                            stall=["00004.tar"])
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        t0 = time.time()
        keys, dropped = read_keys(f"{url}/{{00000..00009}}.tar", url_timeout_s=2)
        elapsed = time.time() - t0
        size = (split / "00003.tar").stat().st_size
        with pytest.raises(ConnectionError, match=f"00003.tar: connection closed after {size // 2} of {size} bytes"):
            stream = open_shard(f"{url}/00003.tar")
            while stream.read(4096):
                pass
    finally:
        httpd.shutdown()
    good = set().union(*(keys_of(split / f"{i:05d}.tar") for i in range(10) if f"{i:05d}.tar" not in bad))
    lost = set().union(*(keys_of(split / name) for name in ("00001.tar", "00002.tar")))
    partial = set().union(*(keys_of(split / name) for name in ("00003.tar", "00004.tar")))
    assert good <= set(keys) and not lost & set(keys) and set(keys) - good <= partial
    assert len(keys) == len(set(keys)) and len(partial & set(keys)) < len(partial)
    assert dropped >= 4, dropped
    assert requests.count("00002.tar") == 3 and requests.count("00001.tar") == 1  # 5xx retried, 4xx not
    assert elapsed < 30, elapsed


def test_nothing_readable_is_an_error(split):
    httpd, _ = serve(split, fail={f"{i:05d}.tar": 404 for i in range(10)})
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        loader = make_loader(f"{url}/{{00000..00009}}.tar", batch_size=2, transform=key_only, num_workers=1,
                             resampled=True, batches_per_epoch=4)
        with pytest.raises(RuntimeError, match=f"no shard could be read: the last {MAX_FAILED_OPENS} failed"):
            list(loader)
    finally:
        httpd.shutdown()


def test_pretraining_on_unreadable_http_shards_stops_with_a_clear_error(split, tmp_path):
    """Plain epochs: a pass that reads no batch is an error naming the shards (another pass would loop for ever)."""
    httpd, _ = serve(split, fail={f"{i:05d}.tar": 404 for i in range(10)})
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{{00000..00009}}.tar"
    try:
        t0 = time.time()
        done = run_torchrun(1, *pretrain_args(url, tmp_path / "run", "data.resampled=false", "data.num_workers=1",
                                             "data.url_timeout_s=2"), check=False, timeout=240)
    finally:
        httpd.shutdown()
    assert done.returncode != 0
    assert "a whole pass over its 10 shards" in done.stderr and "gave no batch" in done.stderr, done.stderr[-3000:]
    assert "unreadable_shard" in done.stderr and "HTTP Error 404" in done.stderr
    assert time.time() - t0 < 120
