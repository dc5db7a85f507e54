"""`python -m finetune.report RUN [RUN ...]`: finished runs side by side — fine-tuning, eval, linear probe, pixel
baseline (metrics.json) and zero-shot (zeroshot.json) — as a markdown table and, with --json, one row per run.

`--table`: the paper's table instead — methods as rows, datasets as columns, the test metric (top-1 %, mAP % for
multi-label sets) as mean +- sd over the runs (seeds) of each method, with their number; a run that failed or is
missing shows as such, never as a number. A method is the run directory's name less a seed suffix (`_s1`,
`_seed1`), or `NAME=RUN`."""
import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from data_tools.registry import UnknownDatasetError, get_dataset
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


SEED_SUFFIX = re.compile(r"[_-]s(?:eed)?\d+$")


def run_config(run: Path) -> Dict[str, Any]:
    import yaml
    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def table_entry(spec: str) -> Dict[str, Any]:
    """One run for the table: its method, dataset, seed and test metric, or why it has none."""
    method, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    run = Path(path)
    method = method or SEED_SUFFIX.sub("", run.resolve().name)
    cfg = run_config(run)
    dataset = (cfg.get("data") or {}).get("dataset")
    try:  # a registered benchmark under its registry spelling, as metrics.json records it
        dataset = get_dataset(dataset).name if dataset else None
    except UnknownDatasetError:
        pass
    entry = {"method": method, "run": str(run), "seed": (cfg.get("run") or {}).get("seed"),
             "dataset": dataset, "value": None, "status": "ok"}
    try:
        m = read_result(str(run))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return {**entry, "status": "failed", "reason": str(e)}
    entry["dataset"] = m.get("dataset", entry["dataset"])
    key = m.get("primary_metric")
    value = (m.get("test") or {}).get(key)
    if m.get("stopped") or not isinstance(value, (int, float)) or not math.isfinite(value):
        return {**entry, "status": "failed", "reason": "stopped before its test" if m.get("stopped") else
                f"no finite test {key}"}
    return {**entry, "metric": key, "value": float(value)}


def paper_table(specs: Sequence[str]) -> Dict[str, Any]:
    """Cells per method and dataset: mean and sd (n - 1) of the test metric over the runs that finished."""
    seen, entries = set(), []
    for spec in specs:  # a run given twice (a glob and a link to it) counts once
        entry = table_entry(spec)
        if Path(entry["run"]).resolve() not in seen:
            seen.add(Path(entry["run"]).resolve())
            entries.append(entry)
    methods = list(dict.fromkeys(e["method"] for e in entries))
    datasets = list(dict.fromkeys(e["dataset"] for e in entries if e["dataset"]))
    cells: Dict[str, Dict[str, Any]] = {}
    for method in methods:
        for dataset in datasets:
            runs = [e for e in entries if e["method"] == method and e["dataset"] == dataset]
            values = [e["value"] for e in runs if e["status"] == "ok"]
            cell = {"n": len(values), "failed": len(runs) - len(values), "seeds": [e["seed"] for e in runs
                                                                                   if e["status"] == "ok"],
                    "runs": [e["run"] for e in runs], "metric": next((e["metric"] for e in runs if "metric" in e),
                                                                     None)}
            if values:
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
                cell.update(mean=mean, sd=sd)
            cells.setdefault(method, {})[dataset] = cell
    unplaced = [e for e in entries if not e["dataset"]]
    return {"methods": methods, "datasets": datasets, "cells": cells, "unplaced": unplaced,
            "failed": [e for e in entries if e["status"] != "ok"]}


def _percent(metric: Optional[str]) -> bool:
    return metric in ("top1", "mAP")


def format_cell(cell: Dict[str, Any]) -> str:
    if not cell["n"] and not cell["failed"]:
        return "missing"
    if not cell["n"]:
        return f"failed ({cell['failed']})"
    scale, digits = (100, 1) if _percent(cell["metric"]) else (1, 3)
    text = f"{cell['mean'] * scale:.{digits}f}"
    text += f" ± {cell['sd'] * scale:.{digits}f}" if cell["sd"] is not None else ""
    text += f" (n={cell['n']}" + (f", {cell['failed']} failed)" if cell["failed"] else ")")
    return text


def table_markdown(table: Dict[str, Any]) -> str:
    metrics = {d: next((table["cells"][m][d]["metric"] for m in table["methods"] if table["cells"][m][d]["metric"]),
                       None) for d in table["datasets"]}
    names = {"top1": "top-1 %", "mAP": "mAP %", "ccc": "CCC"}
    head = [f"{d} ({names.get(metrics[d], metrics[d] or '-')})" for d in table["datasets"]]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines += [f"| {m} | " + " | ".join(format_cell(table["cells"][m][d]) for d in table["datasets"]) + " |"
              for m in table["methods"]]
    notes = [f"- {e['run']}: {e['status']} ({e.get('reason', '')})" for e in table["failed"]]
    notes += [f"- {e['run']}: no dataset recorded, left out" for e in table["unplaced"] if e["status"] == "ok"]
    return "\n".join(lines + ([""] + notes if notes else []))


def table_plot(table: Dict[str, Any], path: str) -> None:
    """Grouped bars: a group per dataset, a bar per method, sd as error bars; a missing or failed cell has none."""
    from finetune.analysis import figure_png, pyplot
    from runtime.atomic import atomic_write_bytes
    plt = pyplot()
    methods, datasets = table["methods"], table["datasets"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(datasets) * max(1, len(methods)) * 0.5 + 2), 4), dpi=90)
    for i, method in enumerate(methods):
        cells = [table["cells"][method][d] for d in datasets]
        scale = [100 if _percent(c["metric"]) else 1 for c in cells]
        ax.bar([j + i * width for j in range(len(datasets))],  # no bar where nothing finished
               [c.get("mean", math.nan) * s for c, s in zip(cells, scale)], width,
               yerr=[(c.get("sd") or 0) * s for c, s in zip(cells, scale)], label=method, capsize=3)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(datasets))], datasets)
    ax.set_ylabel("test metric (top-1 / mAP %)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.json or zeroshot.json); with "
                                                 "--table also METHOD=RUN")
    parser.add_argument("--labels", nargs="+", help="a name per run")
    parser.add_argument("--table", action="store_true", help="the paper's table: methods x datasets, mean +- sd")
    parser.add_argument("--plot", help="--table: also a bar plot PNG")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--json", help="also write {'runs': [one row per run]} (--table: the cells) to this file")
    args = parser.parse_args(argv)
    if args.table:
        table = paper_table(args.runs)
        text = table_markdown(table)
        print(text)
        if args.out:
            atomic_write_text(args.out, text + "\n")
        if args.json:
            atomic_write_text(args.json, json.dumps(table, indent=1) + "\n")
        if args.plot:
            table_plot(table, args.plot)
        return 0
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
