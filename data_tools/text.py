"""Text descriptions of a photo from its attributes (docs/method.md §4), in the order the method fixes."""
from typing import Any, Dict, Optional, Sequence


def label_text(label: str) -> str:
    """A class name as words, in shard texts and zero-shot prompts alike: folder names such as 'ankle_boot' read
    'ankle boot'."""
    return label.replace("_", " ")


def join_list(items: Sequence[str]) -> str:
    items = [str(i) for i in items if str(i).strip()]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(emotion: Optional[str], attributes: Optional[Dict[str, Any]] = None) -> str:
    """'The scene type of this photo is ... The overall emotion conveyed is {emotion}.' skipping absent attributes."""
    a = attributes or {}
    parts = []
    if a.get("scene"):
        parts.append(f"The scene type of this photo is {a['scene']}.")
    objects = a.get("object") or a.get("objects")
    if objects:
        objects = [objects] if isinstance(objects, str) else list(objects)
        parts.append(f"The main subjects are {join_list(objects)}.")
    if a.get("brightness") is not None and a.get("colorfulness") is not None:
        parts.append(f"The image has a brightness of {a['brightness']} and color saturation of {a['colorfulness']}.")
    if a.get("facial_expression"):
        parts.append(f"Human facial expression is {a['facial_expression']}.")
    if a.get("human_action"):
        parts.append(f"The action being performed is {a['human_action']}.")
    if emotion:
        parts.append(f"The overall emotion conveyed is {label_text(emotion)}.")
    return " ".join(parts)
