"""One sample from image bytes and labels: validated, re-encoded JPEG plus its schema record (box, text)."""
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from data_tools.detect import detect_person, make_detector
from data_tools.images import DEFAULT_MAX_PIXELS, reencode
from data_tools.schema import make_record
from data_tools.text import describe


@dataclass
class ImageOptions:
    max_side: int = 512            # longer side after re-encoding (smaller images are kept as they are)
    quality: int = 90              # JPEG quality
    max_pixels: int = DEFAULT_MAX_PIXELS
    detector: str = "hog+face"     # see data_tools.detect.make_detector


class SampleBuilder:
    """Shared by every source (folders, EmoSet, crawls). The detector is built lazily, once per process."""

    def __init__(self, dataset: str, classes: Sequence[str], options: ImageOptions):
        self.dataset = dataset
        self.classes = list(classes)
        self.options = options
        self._local = threading.local()
        make_detector(options.detector)  # fail fast on a bad detector spec, in the parent process

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}  # OpenCV objects do not pickle

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local())

    @property
    def detector(self):
        """One detector per thread (OpenCV's detectors are not thread-safe), built on first use."""
        if not hasattr(self._local, "detector"):
            self._local.detector = make_detector(self.options.detector)
        return self._local.detector

    def build(self, data: bytes, *, split: str, source: str, label: Optional[int] = None,
              attributes: Optional[Dict[str, Any]] = None, text: Optional[str] = None,
              person_box: Optional[Sequence[float]] = None, **optional: Any) -> Tuple[bytes, Dict[str, Any]]:
        """`person_box`: an annotated box (fractions of the image), used instead of the detector."""
        jpeg, img = reencode(data, self.options.max_side, self.options.quality, self.options.max_pixels)
        if person_box is not None:
            box, detector_name, score = list(person_box), "annotation", None
        else:
            box, detector_name, score = detect_person(self.detector, img)
        emotion = self.classes[label] if label is not None else None
        record = make_record(dataset=self.dataset, split=split, source=source, width=img.width, height=img.height,
                             label=label, emotion=emotion, attributes=attributes,
                             text=text if text is not None else describe(emotion, attributes),
                             person_box=box, person_detector=detector_name, person_score=score, **optional)
        return jpeg, record
