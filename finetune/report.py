"""`python -m finetune.report RUN [RUN ...]`: finished runs side by side — fine-tuning, linear probe, pixel
baseline (metrics.json) and zero-shot (zeroshot.json) — as a markdown table and, with --json, one row per run."""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from runtime.atomic import atomic_write_text
from runtime.cli import HelpFormatter

RESULT_FILES = ("metrics.json", "zeroshot.json")


def read_result(run: str) -> Dict[str, Any]:
    for name in RESULT_FILES:
        path = Path(run) / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{run}: neither {' nor '.join(RESULT_FILES)} found: has the run finished?")


def result_rows(runs: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One row per run: name, its primary metric on val and test (e.g. val_top1, test_top1), and what it is."""
    if labels and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    rows = []
    for i, run in enumerate(runs):
        m = read_result(run)
        key = m["primary_metric"]
        rows.append({"name": labels[i] if labels else run, f"test_{key}": m["test"][key],
                     f"val_{key}": m["val"][key] if "val" in m else None, "dataset": m["dataset"],
                     "source": m["encoder_source"], "best_epoch": m.get("best_epoch"), "run": str(run),
                     **({"test_top3": m["test"].get("top3"), "test_macro_f1": m["test"].get("macro_f1")}
                        if key == "top1" else {})})
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| run | dataset | source | best epoch | val | test | test top-3 / macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        key = next(k[5:] for k in r if k.startswith("test_") and k not in ("test_top3", "test_macro_f1"))
        val = "-" if r[f"val_{key}"] is None else f"{key} {r[f'val_{key}']:.4f}"
        extra = f"{r['test_top3']:.4f} / {r['test_macro_f1']:.4f}" if r.get("test_top3") is not None else "-"
        epoch = "-" if r["best_epoch"] is None else r["best_epoch"]
        lines.append(f"| {r['name']} | {r['dataset']} | {r['source']} | {epoch} | {val} | "
                     f"{key} {r[f'test_{key}']:.4f} | {extra} |")
    return "\n".join(lines)


def report(runs: Sequence[str], labels: Optional[Sequence[str]] = None) -> str:
    return markdown(result_rows(runs, labels))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.json or zeroshot.json)")
    parser.add_argument("--labels", nargs="+", help="a name per run")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--json", help="also write {'runs': [one row per run]} to this file")
    args = parser.parse_args(argv)
    rows = result_rows(args.runs, args.labels)
    table = markdown(rows)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    if args.json:
        atomic_write_text(args.json, json.dumps({"runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
