"""The shard format: one `{key}.jpg` + `{key}.json` per sample; the JSON record's fields, keys and checks."""
import json
from typing import Any, Dict, List, Optional, Sequence

SCHEMA_VERSION = 1
MAX_PER_SHARD = 10_000  # keys hold the index in 4 digits

# field -> (required, allowed types)
FIELDS = {
    "label": (True, (int, type(None))),           # class index in info.json's classes; None when unlabelled
    "emotion": (True, (str, type(None))),         # class name
    "dataset": (True, (str,)),
    "split": (True, (str,)),
    "source": (True, (str,)),                     # relative path in the source tree, or the URL
    "person_box": (True, (list, type(None))),     # [x0, y0, x1, y1] as fractions of width/height, or None
    "person_detector": (True, (str, type(None))),  # or "annotation": the dataset's own box (EMOTIC)
    "attributes": (True, (dict,)),
    "text": (True, (str,)),
    "width": (True, (int,)),
    "height": (True, (int,)),
    "valence": (False, (int, float, type(None))),
    "arousal": (False, (int, float, type(None))),
    "dominance": (False, (int, float, type(None))),
    "labels": (False, (list, type(None))),        # multi-hot vector for multi-label sets
    "person_score": (False, (int, float, type(None))),
    "caption": (False, (str, type(None))),
}


class SchemaError(ValueError):
    """A sample record that does not follow the shard schema."""


def sample_key(split: str, shard: int, index: int) -> str:
    """Stable, unique within a dataset: split, shard number and position in the shard ('train_000030007')."""
    if not 0 <= index < MAX_PER_SHARD:
        raise ValueError(f"sample index {index} out of range for a shard of at most {MAX_PER_SHARD}")
    return f"{split}_{shard:05d}{index:04d}"


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def make_record(*, dataset: str, split: str, source: str, width: int, height: int,
                label: Optional[int] = None, emotion: Optional[str] = None, text: str = "",
                attributes: Optional[Dict[str, Any]] = None, person_box: Optional[Sequence[float]] = None,
                person_detector: Optional[str] = None, **optional: Any) -> Dict[str, Any]:
    record = {"label": label, "emotion": emotion, "dataset": dataset, "split": split, "source": source,
              "person_box": [round(float(v), 5) for v in person_box] if person_box is not None else None,
              "person_detector": person_detector, "attributes": attributes or {}, "text": text,
              "width": width, "height": height}
    record.update({k: v for k, v in optional.items() if v is not None})
    validate_record(record, where=source)
    return record


def validate_record(record: Any, where: str = "sample") -> None:
    """Raise SchemaError naming the sample and the field that is missing, unknown or of the wrong type."""
    if not isinstance(record, dict):
        raise SchemaError(f"{where}: record is {type(record).__name__}, expected a JSON object")
    for name, (required, types) in FIELDS.items():
        if name not in record:
            if required:
                raise SchemaError(f"{where}: field '{name}' is missing")
            continue
        if not isinstance(record[name], types) or isinstance(record[name], bool):
            raise SchemaError(f"{where}: field '{name}' is {record[name]!r}, expected "
                              + " or ".join(t.__name__ for t in types))
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise SchemaError(f"{where}: unknown fields {unknown}")
    box = record["person_box"]
    if box is not None and (len(box) != 4 or not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1):
        raise SchemaError(f"{where}: person_box {box} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1")


def encode_record(record: Dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")


def class_counts(records: List[Dict[str, Any]]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in records:
        name = r.get("emotion") or "<unlabelled>"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
