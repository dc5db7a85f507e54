"""The headline speed ratios of the last `make bench`, read from its JSON files, into bench/results/summary.json.

    python bench/summary.py [--results bench/results]

Each ratio comes from one script's run, where its two sides ran in alternation on the same machine:
full_over_mae_only (mae_step.py, ViT-B/16, the person branch at the size configs/pretrain/vit_b16.yaml sets),
reader_over_imagefolder (loader.py, 2 workers), data_wait_share_* (data_wait.py, 2 workers, torch's default
threads), weak_scaling_* (pretrain_throughput.py --threads-per-rank 1, ViT-B/16, cached teacher),
mae_only_over_reference (mae_step.py, ViT-B/16), crawl_over_img2dataset (crawl.py, 2 processes x 16 threads, the
median of its alternating pairs). A figure whose script has not run is null.
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402


def read(results: Path, name: str, pick: Callable[[dict], Any]) -> Optional[Any]:
    path = results / name
    if not path.is_file():
        return None
    try:
        return pick(json.loads(path.read_text()))
    except (KeyError, StopIteration, TypeError, ValueError) as e:
        raise SystemExit(f"{path}: not the layout bench/summary.py expects ({type(e).__name__}: {e}); rerun its script")


def vit_b16_row(result: dict) -> dict:
    return next(r for r in result["rows"] if r["preset"] == "vit_b16")


def full_over_mae_only(result: dict) -> float:
    row = vit_b16_row(result)
    config = yaml.safe_load((REPO / "configs/pretrain/vit_b16.yaml").read_text())
    small = (config.get("model") or {}).get("person_img_size")
    variant = "ours_full_cached_small_person" if small and small == row.get("small_person_img_size") \
        else "ours_full_cached"
    return row["img_per_s"][variant] / row["img_per_s"]["ours_mae_only"]


def data_wait(preset: str) -> Callable[[dict], float]:
    return lambda result: next(r["steady"]["data_wait_share"] for r in result["rows"]
                               if r["preset"] == preset and r["threads"] == "default")


def weak_scaling(strategy: str) -> Callable[[dict], float]:
    return lambda result: next(r["efficiency"] for r in result["weak_scaling"]
                               if r["preset"] == "vit_b16" and r["strategy"] == strategy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "bench/results"))
    args = parser.parse_args()
    results = Path(args.results)
    summary = {
        "full_over_mae_only": read(results, "mae_step.json", full_over_mae_only),
        "reader_over_imagefolder": read(results, "loader.json", lambda r: next(
            row["ours_over_imagefolder"] for row in r["rows"] if row["workers"] == 2)),
        "data_wait_share_vit_b16": read(results, "data_wait.json", data_wait("vit_b16")),
        "data_wait_share_tiny": read(results, "data_wait.json", data_wait("tiny")),
        "weak_scaling_ddp": read(results, "weak_scaling.json", weak_scaling("ddp")),
        "weak_scaling_zero2": read(results, "weak_scaling.json", weak_scaling("zero2")),
        "mae_only_over_reference": read(results, "mae_step.json", lambda r: (
            vit_b16_row(r)["img_per_s"]["ours_mae_only"] / vit_b16_row(r)["img_per_s"]["reference_mae"])),
        "crawl_over_img2dataset": read(results, "crawl.json", lambda r: r["headline"]["ratio_images_per_s"]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
    }
    atomic_write_json(results / "summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
