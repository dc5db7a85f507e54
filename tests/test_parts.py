"""One sharding job split into parts (--part I/N or a Slurm array task): the union of the parts is byte-identical
to one run over everything, sizes.json and info.json appear only when every planned shard is complete, and
merge-parts refuses an incomplete set naming the missing shards."""
import json
from pathlib import Path

import pytest

from data_tools.__main__ import main as cli
from data_tools.folder import shard_folder
from data_tools.registry import REGISTRY
from data_tools.samples import ImageOptions
from data_tools.writer import Part, merge_parts

from image_data import make_class_tree

NO_DETECT = ImageOptions(detector="none")
VOLATILE = ("created", "command")  # info.json's time and command line: the only bytes that may differ


def files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parts_union_equals_one_run_and_merge_waits_for_every_shard(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, REGISTRY["Emotion6"].classes, per_class=8, size=32)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    shard_folder("Emotion6", str(src), str(whole), shard_size=4, min_shards=2, options=NO_DETECT)
    assert shard_folder("Emotion6", str(src), str(parts), shard_size=4, min_shards=2, options=NO_DETECT,
                        part=Part(1, 3)) is None
    assert not (parts / "info.json").exists() and not (parts / "train" / "sizes.json").exists()
    assert all(int(p.stem) % 3 == 1 for p in parts.rglob("*.tar"))  # only its own shards
    with pytest.raises(ValueError, match=r"8 planned shard\(s\) are not complete: test/00000.tar, "
                                         r"test/00002.tar, train/00000.tar"):
        merge_parts(parts)
    assert cli(["merge-parts", str(parts)]) == 2  # the same refusal from the command line
    for index in (2, 0):  # the last part to finish writes sizes.json and info.json
        cli(["shard-folder", "Emotion6", str(src), "--out", str(parts), "--shard-size", "4", "--min-shards", "2",
             "--detector", "none", "--part", f"{index}/3"])
    got, want = files(parts), files(whole)
    assert sorted(got) == sorted(want)
    for name in want:
        if name != "info.json":
            assert got[name] == want[name], name  # shards, sizes.json, stats, status rows, split lists
    info_got, info_want = (json.loads(d[name]) for d, name in ((got, "info.json"), (want, "info.json")))
    assert {k: v for k, v in info_got.items() if k not in VOLATILE} == \
        {k: v for k, v in info_want.items() if k not in VOLATILE}
    assert merge_parts(parts)["splits"] == info_want["splits"]  # merge-parts on a complete set: the same info


def test_a_slurm_array_task_is_a_part():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert Part.parse(None, env) == Part(1, 3)
    assert Part.parse("2/4", env) == Part(2, 4)  # --part wins
    assert Part.parse(None, {}) is None
    with pytest.raises(ValueError, match=r"--part '3/3': I must be in 0..2"):
        Part.parse("3/3", {})
    with pytest.raises(ValueError, match="expected I/N"):
        Part.parse("half", {})
