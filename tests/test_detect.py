"""Person boxes at shard time: the real astronaut photo (scikit-image), the fallback order, stored boxes."""
import json
import tarfile

import pytest
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from data_tools.detect import HaarFaceDetector, HOGPeopleDetector, detect_person, make_detector
from data_tools.folder import shard_folder
from data_tools.samples import ImageOptions

ASTRONAUT = Image.fromarray(skdata.astronaut())  # 512x512, Eileen Collins, head and shoulders


def test_face_fallback_finds_the_astronaut():
    # her face spans about x 177-272, y 66-161 in the 512 px photo
    box, name, score = detect_person(make_detector("hog+face"), ASTRONAUT)
    assert name == "face" and score > 0
    x0, y0, x1, y1 = box
    assert x0 < 177 / 512 and x1 > 272 / 512 and y0 < 66 / 512 and y1 == 1.0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert 0.3 < cx < 0.6 and cy > 0.3
    assert HOGPeopleDetector()(ASTRONAUT) is None  # no full standing body: HOG alone finds nobody above its margin


def test_no_person_in_a_flat_image():
    assert detect_person(make_detector("hog+face"), Image.new("RGB", (300, 300), (90, 120, 200))) == (None, None, None)
    assert detect_person(make_detector("none"), ASTRONAUT) == (None, None, None)


def test_boxes_are_stored_in_shards(tmp_path):
    (tmp_path / "src" / "joy").mkdir(parents=True)
    ASTRONAUT.save(tmp_path / "src" / "joy" / "astronaut.jpg", quality=92)
    Image.new("RGB", (200, 200), (10, 10, 10)).save(tmp_path / "src" / "joy" / "dark.jpg")
    shard_folder("toy", str(tmp_path / "src"), str(tmp_path / "out"), generic=True, ratios=(1.0, 0.0, 0.0),
                 options=ImageOptions(detector="hog+face", max_side=256))
    records = {}
    for tar_path in (tmp_path / "out" / "train").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    record = json.loads(tar.extractfile(m).read())
                    records[record["source"]] = record
    astro = records["joy/astronaut.jpg"]
    assert astro["person_detector"] == "face" and (astro["width"], astro["height"]) == (256, 256)
    direct, _, _ = detect_person(HaarFaceDetector(), ASTRONAUT.resize((256, 256), Image.BICUBIC))
    assert astro["person_box"] == pytest.approx(direct, abs=0.03)  # same box, found on the re-encoded image
    assert records["joy/dark.jpg"]["person_box"] is None and records["joy/dark.jpg"]["person_detector"] is None


def test_torchvision_detector_from_local_file(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                         weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), tmp_path / "det.pth")
    detector = make_detector(f"torchvision:fasterrcnn_mobilenet_v3_large_320_fpn:{tmp_path / 'det.pth'}")
    detector.min_score = 0.0
    model.eval()
    with torch.inference_mode():
        expected = model([torchvision.transforms.functional.to_tensor(ASTRONAUT)])[0]
    found = detector(ASTRONAUT)
    people = expected["labels"] == 1
    if people.any():  # the loaded weights give the same top person box as the model itself
        top = expected["boxes"][people][expected["scores"][people].argmax()] / 512
        assert found[0] == pytest.approx(top.clamp(0, 1).tolist(), abs=1e-4)
    else:
        assert found is None
    with pytest.raises(FileNotFoundError, match="detector weights not found: .*nope.pth"):
        make_detector(f"torchvision:fasterrcnn_mobilenet_v3_large_320_fpn:{tmp_path / 'nope.pth'}")
