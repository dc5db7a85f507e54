"""Shard fuzzing: 200 seeded corruptions of real shards (truncated, flipped bytes in JPEGs, JSON and tar headers, JSON
fields of the wrong type, empty files and archives, non-UTF-8 member names, a shard rewritten while it is read)
through the reader and `data_tools verify`: no crash, no hang, every lost sample either delivered or counted, and
`verify` names each bad shard."""
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from data_tools.reader import make_loader
from data_tools.verify import verify
from finetune.data import LabelledTransform

from conftest import REPO, clean_env
from image_data import emotion6_shards

CASES = 200
KINDS = ("truncate", "flip_jpg", "flip_json", "flip_header", "wrong_type", "empty_file", "empty_archive",
         "non_utf8_name", "rewritten_while_read")
WRONG_TYPES = [("label", "three"), ("label", 99), ("label", 2.5), ("label", None), ("label", True), ("text", 5),
               ("person_box", "abc"), ("person_box", [0.1, 0.2]), ("width", "wide"), (None, [1, 2, 3])]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Emotion6 shards: 6 classes x 8 images, 5 train shards of 6 samples, with stats (sha256) and sizes.json."""
    return emotion6_shards(tmp_path_factory.mktemp("fuzz"), per_class=8, shard_size=6, min_shards=4)


def members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]


def rewrite(path, items, encoding_errors="strict"):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors=encoding_errors) as tar:
        for info, data in items:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def data_offsets(path):
    """(member name, offset of its data, size) in the tar file."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def flip(path, rng, start, length, n):
    data = bytearray(path.read_bytes())
    for _ in range(n):
        data[start + rng.randrange(length)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def corrupt(kind, shard, rng):
    """Apply one corruption to `shard` in place (rewritten_while_read is applied during the read instead)."""
    if kind == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[:rng.randrange(1, len(data))])
    elif kind in ("flip_jpg", "flip_json"):
        name, offset, size = rng.choice([x for x in data_offsets(shard) if x[0].endswith(kind[5:])])
        flip(shard, rng, offset, size, rng.randint(1, 8))
    elif kind == "flip_header":
        name, offset, size = rng.choice(data_offsets(shard))
        flip(shard, rng, offset - 512, 512, rng.randint(1, 4))
    elif kind == "wrong_type":
        field, value = rng.choice(WRONG_TYPES)
        items = members(shard)
        i = rng.choice([k for k, (m, _) in enumerate(items) if m.name.endswith(".json")])
        record = json.loads(items[i][1])
        record = value if field is None else {**record, field: value}
        items[i] = (items[i][0], json.dumps(record).encode())
        rewrite(shard, items)
    elif kind == "empty_file":
        shard.write_bytes(b"")
    elif kind == "empty_archive":
        rewrite(shard, [])
    elif kind == "non_utf8_name":
        items = members(shard)
        i = rng.randrange(len(items))
        items[i][0].name = b"\xff\xfebad.".decode("utf-8", "surrogateescape") + items[i][0].name.split(".", 1)[1]
        rewrite(shard, items, encoding_errors="surrogateescape")


class Recorder:
    """LabelledTransform with a tiny image transform; remembers the keys it delivered; for rewritten_while_read,
    truncates the shard in place the first time it sees one of its samples."""

    def __init__(self, rewrite_target=None):
        def to_tensor(img):
            return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32))
        self.inner = LabelledTransform(to_tensor, "single_label", 6)
        self.keys, self.rewrite_target = [], rewrite_target

    def __call__(self, sample):
        out = self.inner(sample)
        if self.rewrite_target is not None and sample["__url__"] == str(self.rewrite_target):
            with open(self.rewrite_target, "r+b") as f:  # another writer rewrites the very file being read
                f.truncate(int(self.rewrite_target.stat().st_size * 0.4))
            self.rewrite_target = None
        self.keys.append(out["key"])
        return out


def test_two_hundred_corruptions(dataset, tmp_path):
    train = sorted((dataset / "train").glob("*.tar"))
    originals = {k for t in train for k in {m.name.split(".")[0] for m, _ in members(t)}}
    total = len(originals)
    assert total == sum(json.loads((dataset / "train" / "sizes.json").read_text()).values())
    tally = {kind: {"cases": 0, "dropped": 0, "delivered": 0} for kind in KINDS}
    t0 = time.time()
    for case in range(CASES):
        rng = random.Random(case)
        kind = KINDS[case % len(KINDS)]
        root = tmp_path / f"case{case:03d}"
        shutil.copytree(dataset, root)
        shard = root / "train" / train[rng.randrange(len(train))].name
        corrupt(kind, shard, rng)
        recorder = Recorder(shard if kind == "rewritten_while_read" else None)
        loader = make_loader([str(root / "train" / t.name) for t in train], batch_size=1, transform=recorder,
                             num_workers=0, resampled=False, drop_last=False, shuffle_buffer=0)
        started = time.time()
        dropped = sum(int(b["corrupt"]) for b in loader)
        assert time.time() - started < 30, (case, kind)
        delivered = set(recorder.keys)
        assert len(delivered) == len(recorder.keys) and delivered <= originals, (case, kind)
        assert len(delivered) + dropped >= total, (case, kind, len(delivered), dropped)  # nothing lost silently
        report = verify(str(root))
        assert any(p.startswith(str(shard)) for p in report["problems"]), (case, kind, report["problems"])
        clean = [t for t in (root / "train").glob("*.tar") if t != shard]
        assert not any(p.startswith(str(t)) for t in clean for p in report["problems"]), (case, kind)
        tally[kind]["cases"] += 1
        tally[kind]["dropped"] += dropped
        tally[kind]["delivered"] += len(delivered)
        shutil.rmtree(root)
    print(f"{CASES} corruptions in {time.time() - t0:.0f} s; per kind (cases, dropped, delivered of "
          f"{total} each): " + ", ".join(f"{k} {v['cases']}/{v['dropped']}/{v['delivered']}" for k, v in tally.items()))
    assert all(v["cases"] > 0 for v in tally.values())
    assert all(v["dropped"] > 0 for k, v in tally.items() if k != "flip_jpg")  # JPEGs often survive a flipped bit


def test_verify_cli_names_each_bad_shard(dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    bad = [root / "train" / "00000.tar", root / "train" / "00002.tar"]
    corrupt("truncate", bad[0], random.Random(1))
    corrupt("flip_jpg", bad[1], random.Random(2))
    done = subprocess.run([sys.executable, "-m", "data_tools", "verify", str(root)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    named = {line.split("PROBLEM ", 1)[1].split(":", 1)[0] for line in done.stdout.splitlines() if "PROBLEM" in line}
    assert named == {str(p) for p in bad}, done.stdout
