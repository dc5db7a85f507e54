"""`python -m finetune.report RUN [RUN ...]`: the test metrics of fine-tuning runs side by side (markdown)."""
import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence


def report(runs: Sequence[str], labels: Optional[Sequence[str]] = None) -> str:
    rows: List[str] = ["| run | dataset | encoder | best epoch | val | test | test top-3 / macro-F1 |",
                       "|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs):
        path = Path(run) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: has the run finished?")
        m = json.loads(path.read_text())
        key = m["primary_metric"]
        extra = f"{m['test']['top3']:.4f} / {m['test']['macro_f1']:.4f}" if key == "top1" else "-"
        rows.append(f"| {labels[i] if labels else run} | {m['dataset']} | {m['encoder_source']} | "
                    f"{m.get('best_epoch', '-')} | {key} {m['val'][key]:.4f} | {key} {m['test'][key]:.4f} | {extra} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="fine-tuning run directories (with metrics.json)")
    parser.add_argument("--labels", nargs="+", help="a name per run")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    table = report(args.runs, args.labels)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
