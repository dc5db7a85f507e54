"""Clips with per-frame valence/arousal to shards: AFEW-VA in its real JSON shape and Aff-Wild2's annotation files
round-trip (scales, validity, missing frames counted), subject splits are disjoint and reproducible, and a malformed
annotation is an error naming its file."""
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main as data_main
from data_tools.frames import shard_frames
from data_tools.splits import DatasetLayoutError


def frame(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(path)


def make_afew_va(root: Path, actors=("anne", "bob", "cyd", "dan"), clips_per_actor=2, frames=10):
    """SRC/<clip>/<clip>.json ({actor, video_id, frames: {"00000": {valence, arousal, landmarks}}}) + 00000.png ..."""
    truth, n = {}, 0
    rng = np.random.default_rng(0)
    for actor in actors:
        for _ in range(clips_per_actor):
            n += 1
            clip = f"{n:03d}"
            values = {f"{i:05d}": {"valence": int(rng.integers(-10, 11)), "arousal": int(rng.integers(-10, 11)),
                                   "landmarks": [[1.0, 2.0]] * 68} for i in range(frames)}
            for i in range(frames):
                frame(root / clip / f"{i:05d}.png", 10 * i)
            (root / clip / f"{clip}.json").write_text(json.dumps({"actor": actor, "video_id": clip,
                                                                  "frames": values}))
            truth[clip] = (actor, values)
    return truth


def make_affwild2(root: Path):
    """annotations/VA_Estimation_Challenge/{Train_Set,Validation_Set}/<video>.txt + cropped_aligned/<video>/..."""
    ann = root / "annotations" / "VA_Estimation_Challenge"
    videos = {"Train_Set": ["1-30-1280x720", "2-30-640x360", "3-25-1920x1080_left", "3-25-1920x1080_right",
                            "4-30-640x480"], "Validation_Set": ["5-60-1920x1080"]}
    for folder, names in videos.items():
        for k, video in enumerate(names):
            lines = ["valence,arousal"]
            for i in range(1, 9):
                lines.append("-5,-5" if i == 3 else f"{0.1 * i:.2f},{-0.05 * i:.2f}")
                if not (folder == "Train_Set" and k == 0 and i == 6):  # one image missing (a failed face crop)
                    frame(root / "cropped_aligned" / video / f"{i:05d}.jpg", 20 * i)
            (ann / folder).mkdir(parents=True, exist_ok=True)
            (ann / folder / f"{video}.txt").write_text("\n".join(lines) + "\n")
    return videos


def records(root: Path, split: str):
    out = []
    for tar in sorted((root / split).glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            frames = sorted(k for k in sample if k.startswith("f") and k.endswith(".jpg"))
            out.append((json.loads(sample["json"]), frames))
    return out


def test_afew_va_round_trips_with_its_scale_and_a_subject_disjoint_split(tmp_path):
    truth = make_afew_va(tmp_path / "src")
    out = tmp_path / "out"
    assert data_main(["shard-frames", "afew", str(tmp_path / "src"), "--format", "afew-va", "--out", str(out),
                      "--max-frames", "4", "--ratios", "0.5", "0.25", "0.25", "--min-shards", "1",
                      "--workers", "1"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["scale"] == 10.0 and info["split_rule"] == "subject-disjoint"
    subjects = {}
    for split in ("train", "val", "test"):
        for r, frames in records(out, split):
            actor, values = truth[r["clip"]]
            ids = r["frames"]
            assert len(frames) == len(ids) <= 4 and ids == sorted(values)[r["start"]:r["start"] + len(ids)]
            assert r["valence"] == [values[i]["valence"] / 10 for i in ids]
            assert r["arousal"] == [values[i]["arousal"] / 10 for i in ids] and all(r["valid"])
            subjects.setdefault(split, set()).add(r["subject"])
    assert sum(s["samples"] for s in info["splits"].values()) == 8 * 3  # 10 frames -> chunks of 4, 4, 2
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["val"] & subjects["test"]) and len(subjects["test"]) == 1
    again = shard_frames("afew", str(tmp_path / "src"), str(tmp_path / "again"), fmt="afew-va", max_frames=4,
                         ratios=(0.5, 0.25, 0.25), min_shards=1)
    assert (tmp_path / "again" / "splits" / "test.txt").read_text() == (out / "splits" / "test.txt").read_text()
    assert again["frames"] == info["frames"]


def test_affwild2_keeps_unannotated_frames_as_invalid_and_counts_missing_images(tmp_path):
    videos = make_affwild2(tmp_path / "src")
    info = shard_frames("aw2", str(tmp_path / "src"), str(tmp_path / "out"), fmt="affwild2", max_frames=16,
                        min_shards=1)
    assert info["split_rule"] == "official; val from train by subject"
    assert info["frames"]["train"]["frames_not_annotated"] + info["frames"]["val"]["frames_not_annotated"] == 5
    assert info["frames"]["train"]["frames_missing_image"] + info["frames"]["val"]["frames_missing_image"] == 1
    test = records(tmp_path / "out", "test")
    assert {r["clip"] for r, _ in test} == set(videos["Validation_Set"])
    r, frames = test[0]
    assert r["valid"] == [True, True, False] + [True] * 5 and len(frames) == 8
    assert r["valence"][:2] == [0.1, 0.2] and r["arousal"][3] == pytest.approx(-0.2) and r["valence"][2] == 0.0
    split_of = {c: s for s in ("train", "val") for c in
                (tmp_path / "out" / "splits" / f"{s}.txt").read_text().split()[::2]}
    assert split_of["3-25-1920x1080_left"] == split_of["3-25-1920x1080_right"]  # one subject, one split
    first = [r for s in ("train", "val") for r, _ in records(tmp_path / "out", s) if r["clip"] == "1-30-1280x720"]
    assert sorted(len(r["frames"]) for r in first) == [2, 5]  # the missing frame 6 cuts the clip in two


def test_a_malformed_annotation_names_its_file(tmp_path):
    make_afew_va(tmp_path / "src", actors=("anne",), clips_per_actor=1, frames=3)
    (tmp_path / "src" / "001" / "001.json").write_text(json.dumps({"frames": {"00000": {"valence": 3}}}))
    with pytest.raises(DatasetLayoutError, match=r"001\.json: not an AFEW-VA annotation \(KeyError"):
        shard_frames("x", str(tmp_path / "src"), str(tmp_path / "out"), fmt="afew-va")
    (tmp_path / "src" / "001" / "001.json").write_text(json.dumps(
        {"frames": {"00000": {"valence": 30, "arousal": 0}}}))
    with pytest.raises(DatasetLayoutError, match="outside -10..10"):
        shard_frames("x", str(tmp_path / "src"), str(tmp_path / "out"), fmt="afew-va")
