"""shard-folder / shard-emoset / verify on small real-image trees, including every kind of bad input."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main as cli
from data_tools.emoset import shard_emoset
from data_tools.folder import shard_folder
from data_tools.registry import REGISTRY, UnknownDatasetError
from data_tools.samples import ImageOptions
from data_tools.splits import DatasetLayoutError
from data_tools.text import describe
from data_tools.verify import verify

from image_data import alpha_png, bad_files, cmyk_jpeg, make_class_tree, photo_crop, jpeg_bytes

E6 = REGISTRY["Emotion6"].classes
NO_DETECT = ImageOptions(detector="none", max_pixels=4_000_000)


def read_shards(split_dir):
    samples = {}
    for tar_path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture
def emotion6_tree(tmp_path):
    src = tmp_path / "Emotion6"
    make_class_tree(src, E6, per_class=10)
    for name, data in bad_files().items():
        (src / "anger" / name).write_bytes(data)
    (src / "joy" / "alpha.png").write_bytes(alpha_png())
    (src / "joy" / "cmyk.jpg").write_bytes(cmyk_jpeg())
    (src / "joy" / "notes.txt").write_text("not an image, ignored by extension")
    return src


def test_shard_folder_counts_splits_and_failures(emotion6_tree, tmp_path):
    out = tmp_path / "out"
    info = shard_folder("Emotion6", str(emotion6_tree), str(out), shard_size=5, min_shards=2, options=NO_DETECT)
    # per class 70/10/20 of 10 images (+ the extra files in anger and joy)
    split_lists = {s: (out / "splits" / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert sum(len(v) for v in split_lists.values()) == 6 * 10 + 4 + 2
    for split, lines in split_lists.items():
        classes = [line.split("\t")[1] for line in lines]
        assert classes.count("sadness") == {"train": 7, "val": 1, "test": 2}[split]
    totals = {s: info["splits"][s] for s in info["splits"]}
    assert sum(t["failed"] for t in totals.values()) == 4
    failures = {}
    for t in totals.values():
        for k, v in t["failures"].items():
            failures[k] = failures.get(k, 0) + v
    assert failures == {"decode_error": 1, "empty": 1, "not_an_image": 1, "too_many_pixels": 1}
    assert sum(t["samples"] for t in totals.values()) == 62
    assert info["classes"] == list(E6) and info["split_rule"] == "per_class"
    on_disk = json.loads((out / "info.json").read_text())
    assert on_disk["splits"] == info["splits"] and "shard-folder" in on_disk["command"] or on_disk["command"]
    # shard files: stats marker, sizes.json, status rows with the reason of each failure
    for split in ("train", "val", "test"):
        sizes = json.loads((out / split / "sizes.json").read_text())
        samples = read_shards(out / split)
        assert sum(sizes.values()) == len(samples) == info["splits"][split]["samples"]
        for key, files in samples.items():
            assert set(files) == {"jpg", "json"} and key.startswith(split + "_")
            record = json.loads(files["json"])
            assert record["split"] == split and record["dataset"] == "Emotion6"
            assert record["emotion"] == E6[record["label"]]
            assert record["text"] == f"The overall emotion conveyed is {record['emotion']}."
    statuses = [json.loads(line) for p in out.rglob("*_status.jsonl") for line in p.read_text().splitlines()]
    failed = {r["source"].split("/")[-1]: r["reason"] for r in statuses if r["status"] == "failed"}
    assert failed == {"truncated.jpg": "decode_error", "empty.jpg": "empty", "page.jpg": "not_an_image",
                      "huge.png": "too_many_pixels"}
    assert verify(str(out))["problems"] == []


def test_alpha_and_cmyk_become_rgb(emotion6_tree, tmp_path):
    out = tmp_path / "out"
    shard_folder("Emotion6", str(emotion6_tree), str(out), options=NO_DETECT)
    by_source = {}
    for split in ("train", "val", "test"):
        for files in read_shards(out / split).values():
            by_source[json.loads(files["json"])["source"]] = files["jpg"]
    alpha = np.asarray(Image.open(io.BytesIO(by_source["joy/alpha.png"])))
    assert alpha.shape == (40, 40, 3)
    assert alpha[:, :15].mean(axis=(0, 1)) == pytest.approx([255, 255, 255], abs=3)  # transparent -> white
    assert alpha[:, 25:].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=6)
    cmyk = Image.open(io.BytesIO(by_source["joy/cmyk.jpg"]))
    assert cmyk.mode == "RGB"
    reference = np.asarray(photo_crop(3, 48), dtype=np.float32)
    assert np.abs(np.asarray(cmyk, dtype=np.float32) - reference).mean() < 12  # colours survive the CMYK trip


def test_max_side_resizes(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, E6, per_class=2, size=200)
    out = tmp_path / "out"
    shard_folder("Emotion6", str(src), str(out), options=ImageOptions(detector="none", max_side=50))
    records = [json.loads(f["json"]) for s in ("train", "val", "test") for f in read_shards(out / s).values()]
    assert records and all((r["width"], r["height"]) == (50, 50) for r in records)


def test_splits_are_reproducible_from_the_seed(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, E6, per_class=12, size=32)
    lists = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        shard_folder("Emotion6", str(src), str(tmp_path / run), seed=seed, options=NO_DETECT)
        lists[run] = [(tmp_path / run / "splits" / f"{s}.txt").read_text() for s in ("train", "val", "test")]
    assert lists["a"] == lists["b"]
    assert lists["a"] != lists["c"]
    # same input and seed -> byte-identical shards; plain ustar members (no PAX header per member for the reader)
    for split in ("train", "val", "test"):
        tars_a, tars_b = sorted((tmp_path / "a" / split).glob("*.tar")), sorted((tmp_path / "b" / split).glob("*.tar"))
        assert tars_a and [t.read_bytes() for t in tars_a] == [t.read_bytes() for t in tars_b]
    with tarfile.open(tars_a[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and isinstance(m.mtime, int) for m in members)
    # the split files written by one run are honoured by another
    shard_folder("Emotion6", str(src), str(tmp_path / "d"), seed=99, split_files=str(tmp_path / "a" / "splits"),
                 options=NO_DETECT)
    assert [(tmp_path / "d" / "splits" / f"{s}.txt").read_text() for s in ("train", "val", "test")] == lists["a"]


def test_rerun_skips_complete_shards_and_redoes_incomplete(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, E6, per_class=6, size=32)
    out = tmp_path / "out"
    shard_folder("Emotion6", str(src), str(out), shard_size=4, min_shards=1, options=NO_DETECT)
    tars = sorted((out / "train").glob("*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in tars}
    os.unlink(out / "train" / "00001_stats.json")          # as if the job died after writing the tar
    (out / "train" / ".00002.tar.partial").write_bytes(b"junk from a crash")
    shard_folder("Emotion6", str(src), str(out), shard_size=4, min_shards=1, options=NO_DETECT)
    assert (out / "train" / "00000.tar").stat().st_mtime_ns == mtimes[out / "train" / "00000.tar"]
    assert (out / "train" / "00001.tar").stat().st_mtime_ns != mtimes[out / "train" / "00001.tar"]
    assert (out / "train" / "00001_stats.json").is_file()
    assert verify(str(out))["problems"] == []


def test_existing_split_folders_and_caer_rule(tmp_path):
    caer = REGISTRY["CAER-S"].classes
    src = tmp_path / "CAER-S"
    make_class_tree(src / "train", caer, per_class=4, size=32)
    make_class_tree(src / "test", caer, per_class=10, size=32, offset=500)
    info = shard_folder("CAER-S", str(src), str(tmp_path / "out"), options=NO_DETECT)
    assert info["splits"]["train"]["samples"] == 7 * 4
    assert info["splits"]["test"]["samples"] == 7 * round(10 * 0.66)
    assert info["splits"]["val"]["samples"] == 7 * (10 - round(10 * 0.66))
    test_sources = (tmp_path / "out" / "splits" / "test.txt").read_text()
    assert "train/" not in test_sources and test_sources.count("test/") == 7 * 7


def test_ube_splits_within_each_subfolder(tmp_path):
    ube = REGISTRY["UBE"].classes
    src = tmp_path / "UBE"
    for sub in ("animal", "people"):
        for c, name in enumerate(ube):
            (src / name / sub).mkdir(parents=True)
            for n in range(10):
                (src / name / sub / f"{n}.jpg").write_bytes(jpeg_bytes(photo_crop(c * 50 + n, 24)))
    shard_folder("UBE", str(src), str(tmp_path / "out"), options=NO_DETECT)
    test_lines = (tmp_path / "out" / "splits" / "test.txt").read_text().splitlines()
    for name in ube:
        for sub in ("animal", "people"):
            assert sum(line.startswith(f"{name}/{sub}/") for line in test_lines) == 2  # 20% of each group


def test_bad_layouts_are_clear_errors(tmp_path, capsys):
    src = tmp_path / "src"
    make_class_tree(src, ["anger", "joy", "boredom"], per_class=1, size=16)
    with pytest.raises(DatasetLayoutError, match=r"class folder 'boredom' is not a class of Emotion6 "
                                                  r"\(expected one of: anger, disgust"):
        shard_folder("Emotion6", str(src), str(tmp_path / "out"), options=NO_DETECT)
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'FJ'; registered: FI, Emotion6, UBE"):
        shard_folder("FJ", str(src), str(tmp_path / "out"), options=NO_DETECT)
    with pytest.raises(DatasetLayoutError, match="Emo8 uses the authors' split files: pass --split-files"):
        shard_folder("Emo8", str(src), str(tmp_path / "out"), options=NO_DETECT)
    assert cli(["shard-folder", "FJ", str(src), "--out", str(tmp_path / "o2"), "--detector", "none"]) == 2
    assert "unknown dataset 'FJ'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown detector 'yolo'; choose one of hog, face, hog\\+face"):
        shard_folder("Emotion6", str(src), str(tmp_path / "out"), options=ImageOptions(detector="yolo"))


def test_generic_tree_via_cli(tmp_path):
    src = tmp_path / "fashion"
    make_class_tree(src, ["boot", "coat", "shirt"], per_class=10, size=28)
    out = tmp_path / "out"
    assert cli(["shard-folder", "fashion", str(src), "--generic", "--out", str(out), "--detector", "none",
                "--ratios", "0.6", "0.2", "0.2", "--workers", "2", "--min-shards", "2", "--shard-size", "100"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["boot", "coat", "shirt"]
    assert {s: v["samples"] for s, v in info["splits"].items()} == {"train": 18, "val": 6, "test": 6}
    assert info["splits"]["train"]["shards"] == 2


def test_emoset_layout_builds_attribute_text(tmp_path):
    src = tmp_path / "EmoSet"
    entries = {"train": [], "val": []}
    annotations = [
        {"emotion": "awe", "scene": "mountain", "object": ["sky", "cloud", "rock"], "brightness": 0.6,
         "colorfulness": 0.4, "facial_expression": None, "human_action": None},
        {"emotion": "amusement", "scene": "amusement park", "object": ["person"], "brightness": 0.8,
         "colorfulness": 0.9, "facial_expression": "happy", "human_action": "riding"},
        {"emotion": "fear"},
    ]
    for n, ann in enumerate(annotations * 2):
        emotion = ann["emotion"]
        img_rel, ann_rel = f"image/{emotion}/{emotion}_{n:05d}.jpg", f"annotation/{emotion}/{emotion}_{n:05d}.json"
        (src / img_rel).parent.mkdir(parents=True, exist_ok=True)
        (src / ann_rel).parent.mkdir(parents=True, exist_ok=True)
        (src / img_rel).write_bytes(jpeg_bytes(photo_crop(n, 40)))
        (src / ann_rel).write_text(json.dumps(ann))
        entries["train" if n < 3 else "val"].append([emotion, img_rel, ann_rel])
    for split, rows in entries.items():
        (src / f"{split}.json").write_text(json.dumps(rows))
    info = shard_emoset(str(src), str(tmp_path / "out"), options=NO_DETECT)
    assert info["splits"]["train"]["samples"] == 3 and info["splits"]["val"]["samples"] == 3
    texts = {json.loads(f["json"])["emotion"]: json.loads(f["json"])
             for f in read_shards(tmp_path / "out" / "train").values()}
    assert texts["awe"]["text"] == ("The scene type of this photo is mountain. The main subjects are sky, cloud and "
                                    "rock. The image has a brightness of 0.6 and color saturation of 0.4. "
                                    "The overall emotion conveyed is awe.")
    assert texts["amusement"]["text"] == describe("amusement", texts["amusement"]["attributes"])
    assert "Human facial expression is happy. The action being performed is riding." in texts["amusement"]["text"]
    assert texts["fear"]["text"] == "The overall emotion conveyed is fear." and texts["fear"]["attributes"] == {}


def test_verify_reports_corruption(tmp_path):
    src = tmp_path / "src"
    make_class_tree(src, E6, per_class=5, size=32)
    out = tmp_path / "out"
    shard_folder("Emotion6", str(src), str(out), shard_size=100, min_shards=1, options=NO_DETECT)
    report = verify(str(out))
    assert report["problems"] == [] and report["samples"] == 30
    assert report["counts"]["train"] == {c: 3 for c in E6}  # 5 per class: 1 test (20%), 1 val (10% rounds up)
    tar_path = out / "train" / "00000.tar"
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])
    os.unlink(out / "val" / "00000_stats.json")
    problems = verify(str(out))["problems"]
    assert any("train/00000.tar" in p and "says" in p for p in problems)
    assert any("val/00000.tar: no 00000_stats.json" in p for p in problems)
