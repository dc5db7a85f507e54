"""`verify`: re-read every shard of a dataset directory, check schema and stats, count classes and splits."""
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List

from PIL import Image

from data_tools.schema import SchemaError, validate_record
from data_tools.tars import read_tar
from runtime.atomic import file_sha256


def verify(root: str) -> Dict[str, Any]:
    """A report: per split and class counts, and every problem found (each names the shard and sample)."""
    root_path = Path(root)
    problems: List[str] = []
    counts: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    skipped: Dict[str, Any] = {"inputs": 0, "reasons": defaultdict(int), "listed_in": []}
    if not (root_path / "info.json").is_file():
        problems.append(f"{root_path}: no info.json (was the dataset written by data_tools?)")
    tars = sorted(root_path.rglob("*.tar"))
    if not tars:
        problems.append(f"{root_path}: no shards (*.tar)")
    for tar_path in tars:
        stats_file = tar_path.with_name(tar_path.stem + "_stats.json")
        members, error = read_tar(tar_path)
        if error:
            problems.append(f"{tar_path}: unreadable tar ({error})")
        good = 0
        for key, files in sorted(members.items()):
            where = f"{tar_path}:{key}"
            if "json" not in files or "jpg" not in files:
                problems.append(f"{where}: has {sorted(files)}, expected jpg and json")
                continue
            try:
                record = json.loads(files["json"])
                validate_record(record, where)
                with Image.open(io.BytesIO(files["jpg"])) as img:
                    img.load()
                    if img.size != (record["width"], record["height"]):
                        raise SchemaError(f"{where}: image is {img.size}, record says "
                                          f"{(record['width'], record['height'])}")
            except Exception as e:  # any unreadable record or image is a problem to report, never a crash
                problems.append(f"{where}: corrupt sample ({type(e).__name__}: {e})")
                continue
            good += 1
            counts[record["split"]][record["emotion"] or "<unlabelled>"] += 1
        if not stats_file.is_file():
            problems.append(f"{tar_path}: no {stats_file.name} (shard incomplete?)")
        else:
            stats = json.loads(stats_file.read_text())
            if stats.get("failed"):  # inputs the shard job could not use: not a problem of the shards
                skipped["inputs"] += stats["failed"]
                for reason, n in (stats.get("failures") or {}).items():
                    skipped["reasons"][reason] += n
                skipped["listed_in"].append(str(tar_path.with_name(tar_path.stem + "_status.jsonl")))
            if stats["samples"] != good:
                problems.append(f"{tar_path}: {good} good samples, {stats_file.name} says {stats['samples']}")
            if stats.get("sha256") and stats["sha256"] != file_sha256(tar_path):
                problems.append(f"{tar_path}: its bytes changed since it was written (sha256 differs from "
                                f"{stats_file.name})")
    return {"root": str(root_path), "shards": len(tars),
            "samples": sum(sum(c.values()) for c in counts.values()),
            "counts": {split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
            "skipped_inputs": {**skipped, "reasons": dict(sorted(skipped["reasons"].items()))}, "problems": problems}


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"{report['root']}: {report['shards']} shards, {report['samples']} good samples"]
    for split, classes in report["counts"].items():
        lines.append(f"  {split}: {sum(classes.values())} — " + ", ".join(f"{k} {v}" for k, v in classes.items()))
    lines += [f"  PROBLEM {p}" for p in report["problems"]] or ["  no problems found in the shards"]
    skipped = report.get("skipped_inputs") or {}
    if skipped.get("inputs"):
        files = skipped["listed_in"]
        lines.append(f"  {skipped['inputs']} input(s) were skipped when the shards were written ("
                     + ", ".join(f"{k} {v}" for k, v in skipped["reasons"].items()) + "); each is listed with its "
                     f"reason (status \"failed\") in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    return "\n".join(lines)
