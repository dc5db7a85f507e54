"""`video-to-frames`: videos -> frame folders (OUT/<video>/00000.jpg ... and frames.json with each frame's index,
time and crop box), decoded with PyAV (OpenCV as the fallback), optionally cropped per frame to the person or face
the existing detectors find; a folder appears only once its video is done, so a rerun skips finished videos."""
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from data_tools.crops import person_region
from data_tools.detect import detect_person, make_detector
from data_tools.images import encode_jpeg, resize_max_side

log = logging.getLogger(__name__)
BACKENDS = ("auto", "pyav", "opencv")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class VideoError(ValueError):
    """A video that cannot be opened or decoded."""


def _pyav_frames(path: Path) -> Tuple[float, Iterator[Tuple[float, Image.Image]]]:
    import av
    container = av.open(str(path))
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0

    def frames():
        try:
            for frame in container.decode(stream):
                yield (float(frame.time) if frame.time is not None else None), frame.to_image()
        finally:
            container.close()
    return fps, frames()


def _opencv_frames(path: Path) -> Tuple[float, Iterator[Tuple[float, Image.Image]]]:
    import cv2
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it")
    fps = float(capture.get(cv2.CAP_PROP_FPS)) or 25.0

    def frames():
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0, Image.fromarray(bgr[..., ::-1].copy())
        finally:
            capture.release()
    return fps, frames()


def open_video(path: Path, backend: str = "auto") -> Tuple[str, float, Iterator[Tuple[float, Image.Image]]]:
    """(backend used, frames per second, an iterator of (time in s, RGB frame)); 'auto' is PyAV, else OpenCV."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {BACKENDS}")
    errors = []
    for name, opener in (("pyav", _pyav_frames), ("opencv", _opencv_frames)):
        if backend not in ("auto", name):
            continue
        try:
            fps, frames = opener(path)
            return name, fps, frames
        except ImportError as e:
            errors.append(f"{name}: not installed ({e})")
        except Exception as e:  # the next backend may read what this one cannot
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise VideoError(f"{path}: cannot decode it ({'; '.join(errors)})")


def cropped_frames(frames: Iterator[Tuple[float, Image.Image]], detector=None, every: int = 1
                   ) -> Iterator[Dict[str, Any]]:
    """Every `every`-th frame as {'frame', 'time', 'image', 'box', 'box_from'}: cropped to the detector's person or
    face box, the previous frame's box kept where it finds none (the whole frame until a first box)."""
    box = None
    for index, (time_s, img) in enumerate(frames):
        if index % every:
            continue
        source = "none"
        if detector is not None:
            found, name, _ = detect_person(detector, img)
            if found is not None:
                box, source = found, name
            elif box is not None:
                source = "previous frame"
        region = person_region(img.size, box)
        yield {"frame": index, "time": time_s, "image": img.crop(region) if region else img, "box": box,
               "box_from": source}


def video_to_frames(video: Path, out: Path, *, every: int = 1, detector=None, max_side: int = 256,
                    quality: int = 90, backend: str = "auto", max_frames: Optional[int] = None) -> Dict[str, Any]:
    """One video -> out/<stem>/: every `every`-th frame (cropped as `cropped_frames` does), at most `max_frames`;
    written into a hidden folder renamed when complete."""
    final = out / video.stem
    if (final / "frames.json").is_file():
        return json.loads((final / "frames.json").read_text())
    partial = out / f".{video.stem}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    used, fps, frames = open_video(video, backend)
    records: List[Dict[str, Any]] = []
    for item in cropped_frames(frames, detector, every):
        if max_frames is not None and len(records) >= max_frames:
            break
        img = item.pop("image")
        (partial / f"{len(records):05d}.jpg").write_bytes(encode_jpeg(resize_max_side(img, max_side), quality))
        records.append({**item, "time": item["time"] if item["time"] is not None else item["frame"] / fps})
    if not records:
        shutil.rmtree(partial)
        raise VideoError(f"{video}: no frame could be decoded")
    summary = {"video": str(video.resolve()), "backend": used, "fps": fps / every, "source_fps": fps,
               "every": every, "frames": records,
               "detected": sum(r["box_from"] not in ("none", "previous frame") for r in records),
               "size": list(Image.open(partial / "00000.jpg").size)}
    (partial / "frames.json").write_text(json.dumps(summary, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return summary


def videos_to_frames(sources: Sequence[str], out: str, *, every: int = 1, detect: str = "none", max_side: int = 256,
                     quality: int = 90, backend: str = "auto", max_frames: Optional[int] = None) -> Dict[str, Any]:
    """Every video named (or found in a named folder) -> a frame folder under `out`; names must be unique."""
    videos: List[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            videos += sorted(v for v in p.iterdir() if v.suffix.lower() in VIDEO_SUFFIXES)
        elif p.is_file():
            videos.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such video or folder")
    stems = [v.stem for v in videos]
    if len(set(stems)) != len(stems):
        raise ValueError(f"two videos share a name ({sorted(s for s in stems if stems.count(s) > 1)[0]}): each "
                         f"becomes the folder OUT/<name>")
    detector = make_detector(detect)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    done = {}
    for v in videos:
        summary = video_to_frames(v, out_path, every=every, detector=detector, max_side=max_side, quality=quality,
                                  backend=backend, max_frames=max_frames)
        done[v.stem] = {"frames": len(summary["frames"]), "fps": summary["fps"], "backend": summary["backend"],
                        "detected": summary["detected"]}
        log.info("%s: %d frames (%s, %.1f fps)", v.name, len(summary["frames"]), summary["backend"], summary["fps"])
    return done
