"""The shard reader: exactly-once plain epochs across ranks and workers, seeded resampling, corrupt samples."""
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.images import load_rgb
from data_tools.reader import SharedEpoch, make_loader

from conftest import run_torchrun
from image_data import jpeg_bytes, photo_crop, toy_train_shards


def key_label(sample):
    img = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1)
    return {"key": sample["__key__"], "label": sample["meta"]["label"], "image": img}


def all_keys(split_dir):
    keys = []
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar})
    return keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return toy_train_shards(tmp_path_factory.mktemp("reader"))


def test_plain_epoch_reads_every_sample_once(shards):
    expected = all_keys(shards)
    assert len(expected) == 60 and len(list(shards.glob("*.tar"))) == 10
    loader = make_loader(str(shards / "{00000..00009}.tar"), batch_size=7, transform=key_label, num_workers=2,
                         resampled=False, drop_last=False)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(expected)
    assert batches[0]["image"].shape[1:] == (3, 24, 24) and batches[0]["label"].dtype == torch.int64
    assert sum(int(b["corrupt"]) for b in batches) == 0


def test_too_few_shards_for_workers_and_ranks(shards):
    with pytest.raises(ValueError, match=r"10 shard\(s\) cannot feed 4 loader worker\(s\) x 3 rank\(s\)"):
        make_loader(str(shards / "{00000..00009}.tar"), batch_size=4, transform=key_label, num_workers=4,
                    world_size=3, resampled=False)
    with pytest.raises(ValueError, match="no shards match"):
        make_loader([], batch_size=4, transform=key_label)


def test_resampled_epochs_are_fixed_length_and_seeded(shards):
    def keys_of(seed, epoch_number):
        epoch = SharedEpoch(epoch_number)
        loader = make_loader(str(shards / "{00000..00009}.tar"), batch_size=4, transform=key_label,
                             num_workers=2, seed=seed, epoch=epoch, batches_per_epoch=5, shuffle_buffer=20)
        batches = list(loader)
        assert len(batches) == loader.num_batches == 6  # 5 rounded up to a multiple of 2 workers
        return [k for b in batches for k in b["key"]]
    assert keys_of(1, 0) == keys_of(1, 0)
    assert keys_of(1, 0) != keys_of(1, 1)
    assert keys_of(1, 0) != keys_of(2, 0)


def test_weighted_sources(shards):
    a = [str(shards / f"{i:05d}.tar") for i in range(5)]
    b = [str(shards / f"{i:05d}.tar") for i in range(5, 10)]
    source_of = {k: "a" for p in a for k in all_keys_of_tar(p)} | {k: "b" for p in b for k in all_keys_of_tar(p)}
    loader = make_loader([a, b], weights=[0.8, 0.2], batch_size=10, transform=key_label, num_workers=0,
                         batches_per_epoch=60, shuffle_buffer=1)
    counts = Counter(source_of[k] for batch in loader for k in batch["key"])
    assert counts["a"] / (counts["a"] + counts["b"]) == pytest.approx(0.8, abs=0.07)
    with pytest.raises(ValueError, match="needs resampled=True"):
        make_loader([a, b], batch_size=4, transform=key_label, resampled=False)


def all_keys_of_tar(path):
    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar}


def lazy_key_label(sample):
    return key_label({**sample, "image": load_rgb(sample["image"])})


@pytest.mark.parametrize("image_format", ["pil", "lazy"])
def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path, image_format):
    good = jpeg_bytes(photo_crop(1, 24))
    meta = json.dumps({"label": 0}).encode()
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        w.write({"__key__": "ok1", "jpg": good, "json": meta})
        w.write({"__key__": "nojson", "jpg": good})
        w.write({"__key__": "badjpg", "jpg": b"\xff\xd8 not really a jpeg", "json": meta})
        # a sound header on a cut body: 'lazy' opens it and the transform's decode fails, still a corrupt sample
        w.write({"__key__": "cutjpg", "jpg": jpeg_bytes(photo_crop(2, 64))[:300], "json": meta})
        w.write({"__key__": "ok2", "jpg": good, "json": meta})
    with wds.TarWriter(str(tmp_path / "00001.tar")) as w:
        for n in range(4):
            w.write({"__key__": f"t{n}", "jpg": good, "json": meta})
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: int(len(data) * 0.6)])  # truncated mid-member
    loader = make_loader(str(tmp_path / "{00000..00001}.tar"), batch_size=1,
                         transform=key_label if image_format == "pil" else lazy_key_label, num_workers=0,
                         resampled=False, drop_last=False, image_format=image_format)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    # the cut falls after t2.jpg: t0 and t1 survive, t2 lacks its json, the tar's end is unreadable
    assert sorted(keys) == ["ok1", "ok2", "t0", "t1"]
    # missing json (nojson, t2) + undecodable jpegs (badjpg, cutjpg) + the broken tar: counted, never fatal
    assert sum(int(b["corrupt"]) for b in batches) == 5
    added = loader.counter.total  # num_workers=0: this process's copy saw every drop
    assert added.get("corrupt_sample") == 2 and "bad_sample" not in added, added


@pytest.mark.parametrize("mode", ["plain", "resampled"])
def test_two_ranks_two_workers(shards, tmp_path, mode):
    out = tmp_path / "keys.json"
    run_torchrun(2, "tests.reader_worker", str(shards / "{00000..00009}.tar"), str(out), mode)
    result = json.loads(out.read_text())
    expected = sorted(all_keys(shards))
    for epoch, per_rank in result["epochs"].items():
        if mode == "plain":
            assert sorted(per_rank[0] + per_rank[1]) == expected  # every sample exactly once per epoch
            assert not set(per_rank[0]) & set(per_rank[1])
        else:
            assert len(per_rank[0]) == len(per_rank[1]) == 6 * 4  # the same fixed number of batches per rank
            assert per_rank[0] != per_rank[1]
    if mode == "plain":
        assert result["epochs"]["0"][0] != result["epochs"]["1"][0]  # the shard order changes with the epoch


def test_a_finished_loader_leaves_no_thread_behind(shards):
    """Its workers are shut down and its feeder threads joined before the next loader forks workers (a fork while
    a thread exits can deadlock the new worker inside CPython)."""
    import threading

    def feeders():
        return [t for t in threading.enumerate() if t.name == "QueueFeederThread" and t.is_alive()]
    pattern = sorted(str(p) for p in shards.glob("*.tar"))
    loader = make_loader(pattern, batch_size=4, transform=key_label, num_workers=2, resampled=False, drop_last=False)
    assert sum(len(b["key"]) for b in loader) == len(all_keys(shards)) and not feeders()
    stream = iter(make_loader(pattern, batch_size=4, transform=key_label, num_workers=2, resampled=True,
                              batches_per_epoch=40))
    next(stream)
    assert feeders()  # the workers' index queues are fed while it runs ...
    stream.close()    # ... and a consumer that stops early ends them too
    assert not feeders()


def test_the_epoch_stream_owes_each_epoch_its_batches_and_refuses_an_empty_pass():
    from runtime.epochs import epoch_stream
    calls, epochs = [], SharedEpoch()

    class PlainLoader:  # a loader of plain shards that holds only 5 batches per pass
        closed = False

        def __iter__(self):
            calls.append((epochs.get(), epochs.batches, epochs.segment))
            return iter([{"epoch": epochs.get(), "segment": epochs.segment}] * 5)

        def close(self):
            self.closed = True
    loader = PlainLoader()
    stream = epoch_stream(loader, steps_per_epoch=4, accum=2, start_step=6, epoch=epochs,
                          no_batch=lambda loader: "nothing read")
    batches = [next(stream) for _ in range(18)]
    assert not loader.closed
    stream.close()
    assert loader.closed  # the stream owns its loader: closing one ends the other's workers
    # resumed at step 6 of 4-step epochs: epoch 1 owes 2 steps x 2 micro-batches; epochs 2 and 3 owe 8 each, which
    # 5-batch passes deliver in two, the second pass on its own seeded segment
    assert calls == [(1, 4, 2), (2, 8, 0), (2, 3, 1_000_003), (3, 8, 0), (3, 3, 1_000_003)]
    assert [b["epoch"] for b in batches] == [1] * 4 + [2] * 8 + [3] * 6
    empty = epoch_stream([], 4, 1, 0, SharedEpoch(), lambda loader: "nothing read")
    with pytest.raises(RuntimeError, match="nothing read"):
        next(empty)


def pid_and_key(sample):
    import os
    return {"key": sample["__key__"], "pid": os.getpid()}


@pytest.mark.parametrize("mode", ["plain", "resampled"])
def test_one_persistent_loader_serves_every_epoch_with_the_same_workers(shards, mode):
    """epoch_stream over one persistent loader: the same two worker processes make every batch of every epoch (the
    batches say so, and so does each sample's transform); plain epochs still read each sample exactly once, in a
    new order each epoch; resampled epochs owe their fixed number of batches."""
    from runtime.epochs import epoch_stream
    epoch = SharedEpoch()
    plain = mode == "plain"
    loader = make_loader(str(shards / "{00000..00009}.tar"), batch_size=4, transform=pid_and_key, num_workers=2,
                         seed=3, epoch=epoch, resampled=not plain, batches_per_epoch=None if plain else 6,
                         drop_last=False, persistent=True)
    steps = 16 if plain else 6  # 2 workers x 30 samples in batches of 4: 7 full and 1 of 2 each
    stream = epoch_stream(loader, steps_per_epoch=steps, accum=1, start_step=0, epoch=epoch,
                          no_batch=lambda loader: "nothing read")
    per_epoch = [[next(stream) for _ in range(steps)] for _ in range(3)]
    stream.close()
    pids = [{b["worker_pid"] for b in batches} for batches in per_epoch]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]
    assert all({int(p) for b in batches for p in b["pid"]} == pids[0] for batches in per_epoch)
    keys = [[k for b in batches for k in b["key"]] for batches in per_epoch]
    if plain:
        assert all(sorted(k) == sorted(all_keys(shards)) for k in keys) and keys[0] != keys[1]
    else:
        assert all(len(k) == 6 * 4 for k in keys) and keys[0] != keys[1]
    assert loader._iterator is None  # closed with the stream: no worker left
