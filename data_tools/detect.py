"""Person boxes at shard time: OpenCV HOG people detector, Haar face fallback, or a torchvision detector from a file."""
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# (box as [x0, y0, x1, y1] fractions of width/height, score)
Detection = Tuple[List[float], float]
DETECT_MAX_SIDE = 512  # detectors run on a copy no larger than this


def _to_bgr(img: Image.Image, max_side: int = DETECT_MAX_SIDE) -> np.ndarray:
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"))[..., ::-1])


def _fractions(x: float, y: float, w: float, h: float, width: int, height: int) -> List[float]:
    x0, y0 = max(0.0, x / width), max(0.0, y / height)
    x1, y1 = min(1.0, (x + w) / width), min(1.0, (y + h) / height)
    return [float(x0), float(y0), float(x1), float(y1)]


class HOGPeopleDetector:
    """OpenCV's default HOG + linear SVM pedestrian detector; best window above `min_score` (SVM margin)."""
    name = "hog"

    def __init__(self, min_score: float = 1.0):
        self.min_score = min_score
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def __call__(self, img: Image.Image) -> Optional[Detection]:
        bgr = _to_bgr(img)
        if bgr.shape[0] < 128 or bgr.shape[1] < 64:  # smaller than one detection window
            return None
        rects, weights = self.hog.detectMultiScale(bgr, winStride=(8, 8), padding=(8, 8), scale=1.05)
        if len(rects) == 0:
            return None
        best = int(np.argmax(weights))
        score = float(np.ravel(weights)[best])
        if score < self.min_score:
            return None
        x, y, w, h = rects[best]
        return _fractions(x, y, w, h, bgr.shape[1], bgr.shape[0]), score


class HaarFaceDetector:
    """Largest-confidence frontal face (Haar cascade), widened to the upper body it belongs to."""
    name = "face"

    def __init__(self, min_neighbors: int = 5):
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.min_neighbors = min_neighbors

    def __call__(self, img: Image.Image) -> Optional[Detection]:
        gray = cv2.cvtColor(_to_bgr(img), cv2.COLOR_BGR2GRAY)
        rects, _, weights = self.cascade.detectMultiScale3(gray, 1.1, self.min_neighbors, minSize=(24, 24),
                                                           outputRejectLevels=True)
        if len(rects) == 0:
            return None
        best = int(np.argmax(weights))
        x, y, w, h = rects[best]
        # head-and-shoulders: one face width either side, half a face above, five faces down
        return _fractions(x - w, y - 0.5 * h, 3 * w, 5.5 * h, gray.shape[1], gray.shape[0]), float(
            np.ravel(weights)[best])


class FirstOf:
    """Try detectors in order; the first that finds a person wins and is recorded as the box's detector."""

    def __init__(self, *detectors):
        self.detectors = detectors
        self.name = "+".join(d.name for d in detectors)

    def __call__(self, img: Image.Image) -> Optional[Tuple[List[float], float, str]]:
        for d in self.detectors:
            found = d(img)
            if found is not None:
                return found[0], found[1], d.name
        return None


class TorchvisionDetector:
    """A torchvision detection model (COCO labels, person = 1) with weights from a local file; never downloads."""

    def __init__(self, arch: str, weights_path: str, min_score: float = 0.5):
        import torchvision

        from runtime.checkpoint import safe_torch_load
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"detector weights not found: {weights_path} (give a local .pth state dict)")
        self.model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=91)
        state = safe_torch_load(weights_path)
        self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self.model.eval()
        self.min_score = min_score
        self.name = f"torchvision:{arch}"

    def __call__(self, img: Image.Image) -> Optional[Detection]:
        import torch
        from torchvision.transforms.functional import to_tensor
        with torch.inference_mode():
            out = self.model([to_tensor(img.convert("RGB"))])[0]
        keep = (out["labels"] == 1) & (out["scores"] >= self.min_score)
        if not keep.any():
            return None
        best = int(torch.argmax(torch.where(keep, out["scores"], torch.full_like(out["scores"], -1))))
        x0, y0, x1, y1 = out["boxes"][best].tolist()
        return _fractions(x0, y0, x1 - x0, y1 - y0, img.width, img.height), float(out["scores"][best])


DETECTORS: Dict[str, Callable[[], object]] = {
    "hog": HOGPeopleDetector,
    "face": HaarFaceDetector,
    "hog+face": lambda: FirstOf(HOGPeopleDetector(), HaarFaceDetector()),
}


def make_detector(spec: str):
    """'hog', 'face', 'hog+face' (default), 'none', or 'torchvision:ARCH:/path/weights.pth'."""
    if spec == "none":
        return None
    if spec.startswith("torchvision:"):
        _, arch, path = spec.split(":", 2)
        return TorchvisionDetector(arch, path)
    if spec not in DETECTORS:
        raise ValueError(f"unknown detector {spec!r}; choose one of {', '.join(DETECTORS)}, none, "
                         f"or torchvision:ARCH:/path/to/weights.pth")
    return DETECTORS[spec]()


def detect_person(detector, img: Image.Image) -> Tuple[Optional[List[float]], Optional[str], Optional[float]]:
    """(box, detector name, score) for the top person, or (None, None, None) — the trainer then uses the whole image."""
    if detector is None:
        return None, None, None
    found = detector(img)
    if found is None:
        return None, None, None
    if len(found) == 3:
        return found[0], found[2], found[1]
    return found[0], detector.name, found[1]
