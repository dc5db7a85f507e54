"""Exit codes of consecutive 2-rank runs: the runtime smoke run, pretraining with DDP and with DeepSpeed ZeRO-2.

    python bench/exit_codes.py [--runs 30] [--out bench/results/exit_codes.json]

Each kind runs `--runs` times, in turn (smoke, ddp, zero2, smoke, ...), under torchrun with 2 processes on CPU. A
run counts as clean when torchrun exits 0; any other exit is listed with the tail of its output, and runs whose
output says "terminate called" (the abort at exit the process-group fix removed) are counted apart.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.photos import make_shards  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402


def command(kind: str, shards: str, out: Path) -> list:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if kind == "smoke":
        return torchrun + ["-m", "runtime.smoke", "--config", "configs/smoke.yaml", f"run.output_dir={out}"]
    extra = [] if kind == "ddp" else ["train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"]
    return torchrun + ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml", f"data.train=[{shards}]",
                       f"run.output_dir={out}", "data.batch_size=8", "data.num_workers=2", "train.epochs=1",
                       "run.ckpt_every=5", "run.log_every=5", "train.image_every=0", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="runs of each kind")
    parser.add_argument("--kinds", nargs="+", default=["smoke", "ddp", "zero2"], choices=["smoke", "ddp", "zero2"])
    parser.add_argument("--out", default="bench/results/exit_codes.json")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", 160)
        for i in range(args.runs):
            for kind in args.kinds:
                out = Path(tmp) / f"{kind}_{i}"
                t0 = time.time()
                done = subprocess.run(command(kind, shards, out), cwd=REPO, env=env, capture_output=True, text=True)
                text = done.stdout + done.stderr
                rows.append({"run": i, "kind": kind, "rc": done.returncode, "seconds": round(time.time() - t0, 1),
                             "terminate_called": "terminate called" in text,
                             "errors": [line for line in text.splitlines() if "Error" in line or "terminate" in line
                                        ][-20:] if done.returncode else []})
                print(f"{i + 1}/{args.runs} {kind}: exit {done.returncode} ({rows[-1]['seconds']} s)", flush=True)
    per_kind = {k: {"runs": sum(r["kind"] == k for r in rows),
                    "exit_0": sum(r["kind"] == k and r["rc"] == 0 for r in rows),
                    "terminate_called": sum(r["kind"] == k and r["terminate_called"] for r in rows)}
                for k in args.kinds}
    result = {"bench": "exit_codes", "per_kind": per_kind, "all_clean": all(r["rc"] == 0 for r in rows),
              "seconds": round(time.time() - start), "cores": os.cpu_count(), "failures": [r for r in rows if r["rc"]],
              "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(json.dumps(per_kind), f"-> {args.out}")


if __name__ == "__main__":
    main()
