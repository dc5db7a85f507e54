"""EMOTIC as the seventh benchmark: Annotations.mat (and its CSV conversion) sharded one sample per annotated person
with its box, categories and V/A/D; fine-tuning scored by mAP against an independent AP formula."""
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main as data_main
from data_tools.crops import person_region
from data_tools.emotic import shard_emotic
from data_tools.registry import EMOTIC_CATEGORIES
from data_tools.splits import DatasetLayoutError
from finetune.main import main as finetune_main

from conftest import REPO
from emotic_data import make_emotic, write_csv_conversion


def records(root: Path, split: str):
    out = []
    for tar in sorted((root / split).glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            out.append(json.loads(s["json"]))
    return out


def identity(folder, filename, box, width, height):
    """What identifies one annotated person in a shard: its image and its box as fractions (clamped)."""
    x1, y1, x2, y2 = [min(max(v, 0), side) for v, side in zip(box, (width, height, width, height))]
    return f"{folder}/{filename}", tuple(round(v, 4) for v in (x1 / width, y1 / height, x2 / width, y2 / height))


@pytest.fixture(scope="module")
def emotic(tmp_path_factory):
    src = tmp_path_factory.mktemp("emotic")
    truth = make_emotic(src, {"train": 12, "val": 6, "test": 12})
    out = src.parent / (src.name + "_shards")
    assert data_main(["shard-emotic", str(src), "--out", str(out), "--min-shards", "2", "--workers", "1"]) == 0
    return src, out, truth


def test_each_annotated_person_is_one_sample_with_its_box_labels_and_vad(emotic):
    src, out, truth = emotic
    info = json.loads((out / "info.json").read_text())
    assert info["task"] == "multi_label" and info["classes"] == list(EMOTIC_CATEGORIES)
    assert info["continuous"] == ["valence", "arousal", "dominance"] and info["continuous_range"] == [1, 10]
    for split, persons in truth.items():
        got = {}
        for r in records(out, split):
            assert r["person_detector"] == "annotation" and r["split"] == split and r["label"] is None
            got[(r["source"], tuple(round(v, 4) for v in r["person_box"]))] = r
        assert len(got) == len(persons) == info["splits"][split]["samples"]  # the official split, person by person
        for p in persons:
            r = got[identity(p["folder"], p["filename"], p["box"], *p["size"])]
            assert [EMOTIC_CATEGORIES[i] for i, v in enumerate(r["labels"]) if v] == p["categories"]
            assert [r["valence"], r["arousal"], r["dominance"]] == p["continuous"]
            assert r["text"].startswith("The emotions of the person are ")
    # the pretraining person branch crops exactly the annotated box
    p = truth["train"][0]
    got_train = {(x["source"], tuple(round(v, 4) for v in x["person_box"])): x for x in records(out, "train")}
    r = got_train[identity(p["folder"], p["filename"], p["box"], *p["size"])]
    region = person_region((r["width"], r["height"]), r["person_box"])
    w, h = p["size"]
    assert [round(v) for v in region] == [max(p["box"][0], 0), max(p["box"][1], 0), min(p["box"][2], w),
                                          min(p["box"][3], h)]


def test_the_csv_conversion_gives_the_same_samples(emotic, tmp_path):
    src, out, truth = emotic
    write_csv_conversion(tmp_path / "emotic_pre", truth)
    csv_out = tmp_path / "csv_shards"
    shard_emotic(str(src), str(csv_out), annotations=str(tmp_path / "emotic_pre"), min_shards=1)

    def content(root, split):
        return sorted(json.dumps(r, sort_keys=True) for r in records(root, split))
    for split in truth:
        assert content(csv_out, split) == content(out, split)


def test_bad_annotations_are_named_or_counted(emotic, tmp_path):
    src, _, truth = emotic
    bad = {s: [dict(p) for p in persons] for s, persons in truth.items()}
    bad["train"][0]["categories"] = ["Joy"]  # not one of the 26
    write_csv_conversion(tmp_path / "bad", bad)
    info = shard_emotic(str(src), str(tmp_path / "out"), annotations=str(tmp_path / "bad"), min_shards=1)
    assert info["splits"]["train"]["failed"] == 1 and info["splits"]["train"]["failures"] == {"bad_annotation": 1}
    status = (tmp_path / "out" / "train" / "00000_status.jsonl").read_text()
    assert "categories ['Joy'] are not EMOTIC's 26" in status
    from scipy.io import loadmat, savemat
    mat = loadmat(str(src / "Annotations" / "Annotations.mat"))
    savemat(str(tmp_path / "Annotations.mat"), {"train": mat["train"], "test": mat["test"]})
    with pytest.raises(DatasetLayoutError, match=r"Annotations.mat: no variable 'val'"):
        shard_emotic(str(src), str(tmp_path / "out2"), annotations=str(tmp_path / "Annotations.mat"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no EMOTIC annotations"):
        shard_emotic(str(tmp_path / "empty"), str(tmp_path / "out3"))


def average_precision(scores, positives):
    """Non-interpolated AP written out: the mean over the positives of the precision among all samples scored at
    least as high as that positive (tied scores share one threshold)."""
    positives = positives.astype(bool)
    return np.mean([(positives & (scores >= s)).sum() / (scores >= s).sum() for s in scores[positives]])


def test_finetuning_on_emotic_reports_map_and_vad_error_as_written_out(emotic, tmp_path):
    _, out, _ = emotic
    run = tmp_path / "ft"
    assert finetune_main(["--config", str(REPO / "configs/finetune/tiny.yaml"), "--dataset", "EMOTIC", "--data",
                          str(out), "--from-scratch", f"run.output_dir={run}", "train.epochs=2", "data.batch_size=4",
                          "data.num_workers=0"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["primary_metric"] == "mAP" and m["continuous"] == ["valence", "arousal", "dominance"]
    p = np.load(run / "predictions_test.npz")
    scores, targets = p["outputs"], p["targets"]
    assert scores.shape == targets.shape == (m["test"]["n"], 29)
    ap = {c: average_precision(scores[:, j], targets[:, j]) for j, c in enumerate(EMOTIC_CATEGORIES)
          if targets[:, j].any()}
    assert m["test"]["per_class_ap"] == pytest.approx(ap, abs=1e-9)
    assert m["test"]["mAP"] == pytest.approx(np.mean(list(ap.values())), abs=1e-9)
    err = np.abs(scores[:, 26:] - targets[:, 26:]).mean(0)
    assert [m["test"][f"mae_{k}"] for k in ("valence", "arousal", "dominance")] == pytest.approx(err, abs=1e-6)
    assert m["test"]["vad_error"] == pytest.approx(err.mean(), abs=1e-6)
    assert ((targets[:, 26:] >= 1) & (targets[:, 26:] <= 10)).all()
    ev = tmp_path / "ev"
    assert finetune_main(["--eval", "--checkpoint", str(run), "--dataset", "EMOTIC", "--data", str(out),
                          f"run.output_dir={ev}", "data.batch_size=4", "data.num_workers=0"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["test"] == m["test"]
    # a head of the 26 categories alone (a linear probe) is scored on them alone
    probe, ev2 = tmp_path / "probe", tmp_path / "ev2"
    assert finetune_main(["--config", str(REPO / "configs/finetune/tiny.yaml"), "--dataset", "EMOTIC", "--data",
                          str(out), "--from-scratch", "--linear-probe", f"run.output_dir={probe}",
                          "train.probe_epochs=2", "data.num_workers=0"]) == 0
    assert finetune_main(["--eval", "--checkpoint", str(probe), "--dataset", "EMOTIC", "--data", str(out),
                          f"run.output_dir={ev2}", "data.num_workers=0", "encoder.preset=tiny"]) == 0
    probed, evaluated = (json.loads((d / "metrics.json").read_text()) for d in (probe, ev2))
    assert evaluated["continuous"] == [] and "vad_error" not in evaluated["test"]
    # the probe scores features @ W + b, the classifier runs its head: float rounding may reorder the near-tied
    # scores of a random encoder on these near-uniform images, so AP agrees to rounding, not bit for bit
    assert evaluated["test"]["mAP"] == pytest.approx(probed["test"]["mAP"], abs=5e-3)
    assert evaluated["val"]["n"] == probed["val"]["n"] and evaluated["test"]["n"] == probed["test"]["n"]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_follows_the_image_turned_upright_by_its_exif_orientation(orientation):
    import io
    from PIL import Image
    from data_tools.emotic import oriented_box
    from data_tools.images import decode_image
    w, h, box = 60, 40, (10, 5, 30, 25)  # stored pixels, as the annotation gives them
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)  # lossless, so the region's edges stay exact
    upright = np.asarray(decode_image(buf.getvalue()).convert("L"))
    ys, xs = np.nonzero(upright > 127)
    found = [xs.min() / upright.shape[1], ys.min() / upright.shape[0], (xs.max() + 1) / upright.shape[1],
             (ys.max() + 1) / upright.shape[0]]
    assert oriented_box([box[0] / w, box[1] / h, box[2] / w, box[3] / h], orientation) == pytest.approx(found)
