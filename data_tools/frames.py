"""`shard-frames`: clips with per-frame valence/arousal (AFEW-VA, Aff-Wild2, or frame folders + a CSV) -> shards of
clip chunks: the frames as JPEGs (f0000.jpg ...) and one record with the clip, its subject, the per-frame values on
[-1, 1] and their validity."""
import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data_tools.images import read_file, reencode
from data_tools.splits import SPLITS, DatasetLayoutError
from data_tools.writer import finalize_split, plan_shards, run_shard_tasks, write_info
from runtime.atomic import atomic_write_text

log = logging.getLogger(__name__)
FORMATS = ("afew-va", "affwild2", "generic")
AFEW_SCALE = 10.0          # AFEW-VA's integers run -10..10
AFFWILD_NOT_ANNOTATED = -5  # Aff-Wild2 marks frames without a label so


@dataclass
class ClipSource:
    clip: str
    frames: List[Optional[str]]        # image path relative to the source root per frame (None: image missing)
    valence: List[float]               # on [-1, 1]
    arousal: List[float]
    valid: List[bool]
    subject: Optional[str] = None
    split: Optional[str] = None        # the dataset's own split, where it has one
    fps: Optional[float] = None
    frame_ids: List[str] = field(default_factory=list)


def _frame_file(folder: Path, stem: str) -> Optional[Path]:
    for ext in (".png", ".jpg", ".jpeg"):
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    return None


def read_afew_va(src: Path) -> List[ClipSource]:
    """AFEW-VA as distributed: SRC/<clip>/<clip>.json {actor, video_id, frames: {"00000": {valence, arousal,
    landmarks}}} beside SRC/<clip>/00000.png ...; values -10..10 rescaled to [-1, 1]."""
    clips = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        ann = folder / f"{folder.name}.json"
        if not ann.is_file():
            continue
        try:
            raw = json.loads(ann.read_text())
            frames = raw["frames"]
            items = sorted(frames.items(), key=lambda kv: int(kv[0]))
            values = [(float(v["valence"]), float(v["arousal"])) for _, v in items]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetLayoutError(f"{ann}: not an AFEW-VA annotation ({type(e).__name__}: {e}); expected "
                                     f"{{'frames': {{'00000': {{'valence': int, 'arousal': int, ...}}}}}}") from None
        bad = [(fid, va) for (fid, _), va in zip(items, values) if not all(-AFEW_SCALE <= x <= AFEW_SCALE for x in va)]
        if bad:
            raise DatasetLayoutError(f"{ann}: frame {bad[0][0]} has valence/arousal {bad[0][1]}, outside -10..10")
        paths = [_frame_file(folder, fid) for fid, _ in items]
        clips.append(ClipSource(folder.name, [str(p.relative_to(src)) if p else None for p in paths],
                                [v / AFEW_SCALE for v, _ in values], [a / AFEW_SCALE for _, a in values],
                                [True] * len(items), subject=str(raw.get("actor")) if raw.get("actor") else None,
                                frame_ids=[fid for fid, _ in items]))
    if not clips:
        raise DatasetLayoutError(f"{src}: no AFEW-VA clip folders (SRC/<clip>/<clip>.json beside its frames)")
    return clips


def read_affwild2(src: Path) -> List[ClipSource]:
    """Aff-Wild2's VA annotations: SRC/annotations/VA_Estimation_Challenge/{Train_Set,Validation_Set}/<video>.txt
    ('valence,arousal' then one line per frame; -5: not annotated, kept as invalid) and the frames
    SRC/cropped_aligned/<video>/00001.jpg ... (line i is frame i). Train_Set is train, Validation_Set the test
    split (the challenge's test labels are not public); val is drawn from train by subject."""
    ann_root = next((p for p in (src / "annotations" / "VA_Estimation_Challenge", src / "VA_Estimation_Challenge", src)
                     if (p / "Train_Set").is_dir()), None)
    if ann_root is None:
        raise DatasetLayoutError(f"{src}: no Aff-Wild2 VA annotations (annotations/VA_Estimation_Challenge/Train_Set)")
    frames_root = src / "cropped_aligned"
    clips = []
    for folder, split in (("Train_Set", "train"), ("Validation_Set", "test")):
        for txt in sorted((ann_root / folder).glob("*.txt")) if (ann_root / folder).is_dir() else []:
            lines = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
            if not lines or lines[0].replace(" ", "").lower() != "valence,arousal":
                raise DatasetLayoutError(f"{txt}: expected a 'valence,arousal' header line, got {lines[:1]}")
            values = []
            for n, line in enumerate(lines[1:], start=2):
                try:
                    v, a = (float(x) for x in line.split(","))
                except ValueError:
                    raise DatasetLayoutError(f"{txt}:{n}: {line!r} is not 'valence,arousal'") from None
                valid = v != AFFWILD_NOT_ANNOTATED and a != AFFWILD_NOT_ANNOTATED
                if valid and not (-1 <= v <= 1 and -1 <= a <= 1):
                    raise DatasetLayoutError(f"{txt}:{n}: valence/arousal {v}, {a} outside [-1, 1] (and not -5)")
                values.append((v, a, valid))
            video = txt.stem
            ids = [f"{i:05d}" for i in range(1, len(values) + 1)]
            paths = [_frame_file(frames_root / video, fid) for fid in ids]
            # the subject: Aff-Wild2 names a video's second person '<video>_left/_right'
            subject = video.rsplit("_", 1)[0] if video.endswith(("_left", "_right")) else video
            clips.append(ClipSource(video, [str(p.relative_to(src)) if p else None for p in paths],
                                    [v if ok else 0.0 for v, _, ok in values], [a if ok else 0.0 for _, a, ok in values],
                                    [ok for _, _, ok in values], subject=subject, split=split, frame_ids=ids))
    return clips


def read_generic(src: Path, annotations: Optional[str] = None) -> List[ClipSource]:
    """Frame folders SRC/frames/<clip>/<frame>.jpg and a CSV (SRC/annotations.csv) with columns clip, frame,
    valence, arousal on [-1, 1] and optionally subject, split, valid."""
    table = Path(annotations) if annotations else src / "annotations.csv"
    if not table.is_file():
        raise DatasetLayoutError(f"{table}: no annotations CSV (columns clip, frame, valence, arousal[, subject, "
                                 f"split, valid])")
    rows: Dict[str, List[Dict[str, str]]] = {}
    with open(table, newline="") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            missing = [k for k in ("clip", "frame", "valence", "arousal") if not row.get(k)]
            if missing:
                raise DatasetLayoutError(f"{table}:{n}: columns {missing} are empty or missing")
            rows.setdefault(row["clip"], []).append({**row, "line": str(n)})
    clips = []
    for clip, frames in sorted(rows.items()):
        frames.sort(key=lambda r: (len(r["frame"]), r["frame"]))
        try:
            values = [(float(r["valence"]), float(r["arousal"])) for r in frames]
        except ValueError:
            raise DatasetLayoutError(f"{table}: clip {clip}: valence/arousal are not numbers") from None
        valid = [r.get("valid", "1") not in ("0", "false", "False") for r in frames]
        paths = [_frame_file(src / "frames" / clip, Path(r["frame"]).stem) for r in frames]
        split = frames[0].get("split") or None
        if split is not None and split not in SPLITS:
            raise DatasetLayoutError(f"{table}: clip {clip}: split {split!r} is not one of {SPLITS}")
        clips.append(ClipSource(clip, [str(p.relative_to(src)) if p else None for p in paths],
                                [v for v, _ in values], [a for _, a in values], valid,
                                subject=frames[0].get("subject") or None, split=split,
                                frame_ids=[r["frame"] for r in frames]))
    return clips


def assign_splits(clips: Sequence[ClipSource], seed: int, ratios: Tuple[float, float, float]
                  ) -> Tuple[Dict[str, List[ClipSource]], str]:
    """The dataset's own split where every clip has one (val drawn from train by subject when it has none);
    else subject-disjoint seeded ratios where subjects are known; else consecutive clip-id ranges (flagged)."""
    out: Dict[str, List[ClipSource]] = {s: [] for s in SPLITS}
    own = all(c.split for c in clips)
    if own:
        for c in clips:
            out[c.split].append(c)
        if out["val"]:
            return out, "official"
        pool, rule = out["train"], "official; val from train by subject"
        out["train"] = []
        ratios = (1 - ratios[1], ratios[1], 0.0)
    else:
        pool, rule = list(clips), "subject-disjoint"
    if all(c.subject for c in pool):
        subjects = sorted({c.subject for c in pool})
        random.Random(f"{seed}/subjects").shuffle(subjects)
        n_test = round(ratios[2] * len(subjects))
        n_val = round(ratios[1] * len(subjects))
        chosen = {s: "test" for s in subjects[:n_test]}
        chosen.update({s: "val" for s in subjects[n_test:n_test + n_val]})
        for c in pool:
            out[chosen.get(c.subject, "train")].append(c)
        return out, rule
    ordered = sorted(pool, key=lambda c: c.clip)  # no subjects: clip-id ranges, as some AFEW-VA papers split
    a, b = round(ratios[0] * len(ordered)), round((ratios[0] + ratios[1]) * len(ordered))
    for split, part in zip(SPLITS, (ordered[:a], ordered[a:b], ordered[b:])):
        out[split] += part
    return out, ("official; " if own else "") + "clip-id ranges (no subjects known): not subject-disjoint"


def chunks(clip: ClipSource, max_frames: int) -> List[Dict[str, Any]]:
    """Consecutive pieces of at most max_frames frames whose images exist (a missing image ends a piece)."""
    out, start = [], None
    for i, path in enumerate(clip.frames + [None]):
        if path is not None and start is None:
            start = i
        if start is not None and (path is None or i - start == max_frames):
            out.append({"clip": clip.clip, "subject": clip.subject, "fps": clip.fps, "start": start,
                        "paths": clip.frames[start:i], "frame_ids": clip.frame_ids[start:i],
                        "valence": clip.valence[start:i], "arousal": clip.arousal[start:i],
                        "valid": clip.valid[start:i], "source": f"{clip.clip}@{start}"})
            start = i if path is not None else None
    return out


class ChunkSample:
    """Picklable shard job body: one clip chunk -> its frames re-encoded and the chunk's record."""

    def __init__(self, src: Path, dataset: str, max_side: int, quality: int, scale: float):
        self.src, self.dataset, self.max_side, self.quality, self.scale = Path(src), dataset, max_side, quality, scale

    def __call__(self, item: Dict[str, Any]):
        members, size = {}, None
        for i, rel in enumerate(item["paths"]):
            jpeg, img = reencode(read_file(self.src / rel), self.max_side, self.quality)
            members[f"f{i:04d}.jpg"] = jpeg
            size = size or img.size
        record = {"dataset": self.dataset, "split": item["split"], "clip": item["clip"], "subject": item["subject"],
                  "start": item["start"], "fps": item["fps"], "frames": item["frame_ids"],
                  "valence": item["valence"], "arousal": item["arousal"], "valid": item["valid"],
                  "scale": self.scale, "width": size[0], "height": size[1]}
        return members, record


def target_mean(clips: Sequence[ClipSource]) -> Optional[List[float]]:
    """Mean valence and arousal over the annotated frames that have an image (the train-mean reference)."""
    values = [(v, a) for c in clips for p, v, a, ok in zip(c.frames, c.valence, c.arousal, c.valid)
              if p is not None and ok]
    return [sum(v for v, _ in values) / len(values), sum(a for _, a in values) / len(values)] if values else None


def shard_frames(name: str, src: str, out: str, *, fmt: str, max_frames: int = 64, seed: int = 0,
                 ratios: Tuple[float, float, float] = (0.7, 0.15, 0.15), annotations: Optional[str] = None,
                 shard_size: int = 100, min_shards: int = 4, workers: int = 1, max_side: int = 256,
                 quality: int = 90) -> Dict[str, Any]:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {FORMATS}")
    src_path, out_path = Path(src), Path(out)
    clips = {"afew-va": read_afew_va, "affwild2": read_affwild2}.get(fmt, lambda p: read_generic(p, annotations))(
        src_path)
    splits, rule = assign_splits(clips, seed, ratios)
    scale = AFEW_SCALE if fmt == "afew-va" else 1.0
    maker = ChunkSample(src_path, name, max_side, quality, scale)
    summary, counts = {}, {}
    for split in SPLITS:
        atomic_write_text(out_path / "splits" / f"{split}.txt",
                          "".join(f"{c.clip}\t{c.subject or ''}\n" for c in splits[split]))
        items = [{**ch, "split": split} for c in splits[split] for ch in chunks(c, max_frames)]
        random.Random(f"{seed}/{split}/shards").shuffle(items)
        tasks = plan_shards(out_path / split, split, items, shard_size, min_shards)
        summary[split] = finalize_split(out_path / split, run_shard_tasks(tasks, maker, workers, f"{name}/{split}"))
        clips_of = splits[split]
        counts[split] = {"clips": len(clips_of), "frames": sum(len(c.frames) for c in clips_of),
                         "frames_not_annotated": sum(not v for c in clips_of for v in c.valid),
                         "frames_missing_image": sum(p is None for c in clips_of for p in c.frames),
                         "subjects": len({c.subject for c in clips_of if c.subject}),
                         "target_mean": target_mean(clips_of)}
    info = {"dataset": name, "task": "temporal_regression", "kind": "frames", "format": fmt,
            "targets": ["valence", "arousal"], "scale": scale, "split_rule": rule, "seed": seed,
            "max_frames": max_frames, "splits": summary, "frames": counts, "source": str(src_path.resolve()),
            "image": {"max_side": max_side, "quality": quality}}
    write_info(out_path, info)
    return info
