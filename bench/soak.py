"""Kill-and-resume soak: a 2-rank pretraining run SIGKILLed at random moments (some while a checkpoint is being
written) and resumed each time, for DDP and DeepSpeed ZeRO-2.

    python bench/soak.py [--kills 10] [--strategies ddp zero2] [--seed 0] [--out bench/results/soak.json]

Per strategy: an uninterrupted reference run, then the same run killed `--kills` times (torchrun and every process
under it, 0.5-6 s after training resumed, or the moment a `.partial-*` checkpoint directory appears) and rerun
until it reaches its last step. Checkpoints fall on epoch boundaries (run.ckpt_every = steps per epoch), so a
resumed run reads exactly the data an uninterrupted one does and its final weights can be compared bit for bit.
Reported: runs that reached the final step, steps lost per kill (the last step a rank started minus the step
resumed from; at most run.ckpt_every), checkpoints that failed to load (every committed one is loaded after each
kill), and the largest difference between the final weights and the reference run's, and between their EMAs
(train.ema_decay, a registered checkpoint part), beside the difference between two uninterrupted runs (the floor:
what floating-point nondeterminism alone gives).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.photos import make_shards  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402
from runtime.checkpoint import CheckpointStore, load_checkpoint  # noqa: E402

STEPS_PER_EPOCH = 5  # 160 samples / (batch 16 x 2 ranks)
EMA_DECAY = 0.99     # the EMA of the weights is a registered checkpoint part: it must come back bit for bit too


def command(strategy: str, shards: str, out: Path, epochs: int) -> list:
    extra = [] if strategy == "ddp" else ["train.strategy=deepspeed", "train.deepspeed_config=configs/deepspeed/zero2.json"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain/main.py",
            "--config", "configs/pretrain/tiny.yaml", f"data.train=[{shards}]", f"run.output_dir={out}",
            "data.batch_size=16", "data.num_workers=1", "data.resampled=false", f"train.epochs={epochs}",
            f"run.ckpt_every={STEPS_PER_EPOCH}", "run.log_every=5", "train.image_every=0", "debug.record_keys=true",
            "debug.step_sleep_s=0.2", f"train.ema_decay={EMA_DECAY}", *extra]


def kill_tree(proc: subprocess.Popen) -> None:
    procs = [psutil.Process(proc.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def last_step_started(out: Path) -> int:
    steps = [json.loads(line)["step"] for log in (out / "keys").glob("rank*.jsonl")
             for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def run_with_kill(cmd: list, out: Path, env: dict, rng: random.Random, during_checkpoint: bool) -> str:
    """Start the run and SIGKILL it at a random moment (or as a checkpoint is being written); returns how it was
    killed, or 'finished' if it ended first."""
    started_from = last_step_started(out) if (out / "keys").is_dir() else 0
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = out / "checkpoints"
    if not during_checkpoint:  # a random moment once training has resumed (start-up is not what is tested)
        while proc.poll() is None and (not (out / "keys").is_dir() or last_step_started(out) <= started_from):
            time.sleep(0.05)
    deadline = time.time() + (180 if during_checkpoint else rng.uniform(0.5, 6))
    while time.time() < deadline and proc.poll() is None:
        if during_checkpoint and ckpt_dir.is_dir() and any(p.name.startswith(".partial-") for p in ckpt_dir.iterdir()):
            kill_tree(proc)
            return "during_checkpoint_write"
        time.sleep(0.005)
    if proc.poll() is not None:
        return "finished"
    kill_tree(proc)
    return "random_moment"


def soak(strategy: str, shards: str, root: Path, kills: int, epochs: int, env: dict, rng: random.Random) -> dict:
    total = epochs * STEPS_PER_EPOCH
    references = []
    for repeat in range(2):  # twice: the difference between two uninterrupted runs is the floor to compare with
        references.append(root / f"{strategy}_reference{repeat}")
        subprocess.run(command(strategy, shards, references[-1], epochs), cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = root / f"{strategy}_soak"
    cmd = command(strategy, shards, out, epochs)
    events, failed_loads, attempt = [], 0, 0
    while len([e for e in events if e["how"] != "finished"]) < kills and attempt < 3 * kills:
        attempt += 1
        during = len(events) % 3 == 1  # every third kill aims at a checkpoint being written
        store = CheckpointStore(out / "checkpoints")
        resumed_from = load_checkpoint(store.latest())["step"] if store.latest() else 0
        how = run_with_kill(cmd, out, env, rng, during)
        if how == "finished":
            break
        loads = []
        for step, path in store.checkpoints():
            try:
                loads.append(load_checkpoint(path)["step"] == step)
            except Exception:
                loads.append(False)
        failed_loads += loads.count(False)
        latest = load_checkpoint(store.latest())["step"] if store.latest() else 0
        reached = last_step_started(out)
        events.append({"kill": len(events) + 1, "how": how, "started_from": resumed_from,
                       "last_step_started": reached, "resume_point": latest, "steps_lost": max(0, reached - latest),
                       "checkpoints_loaded": len(loads)})
        print(f"{strategy} kill {len(events)}: {how}, reached step {reached}, resume point {latest}", flush=True)
    final = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    return {"strategy": strategy, "total_steps": total, "final_exit": final.returncode,
            "reached_final_step": result.get("final_step") == total, "kills_done": len(events), "kills": events,
            "max_steps_lost": max((e["steps_lost"] for e in events), default=0), "ckpt_every": STEPS_PER_EPOCH,
            "checkpoints_failed_to_load": failed_loads,
            "weights_max_abs_diff_vs_uninterrupted": max_abs_diff(references[0], out),
            "weights_max_abs_diff_two_uninterrupted_runs": max_abs_diff(references[0], references[1]),
            "ema_max_abs_diff_vs_uninterrupted": max_abs_diff(references[0], out, ema=True),
            "ema_max_abs_diff_two_uninterrupted_runs": max_abs_diff(references[0], references[1], ema=True)}


def max_abs_diff(run_a: Path, run_b: Path, ema: bool = False) -> float:
    """The largest difference between two runs' final weights (the last checkpoint's), or their EMAs (the exported
    weights.safetensors holds the EMA)."""
    if ema:
        a, b = load_file(str(run_a / "weights.safetensors")), load_file(str(run_b / "weights.safetensors"))
    else:
        a, b = load_checkpoint(run_a)["model"], load_checkpoint(run_b)["model"]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "zero2"], choices=["ddp", "zero2"])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng, start, rows = random.Random(args.seed), time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "data", 160)
        for strategy in args.strategies:
            rows.append(soak(strategy, shards, Path(tmp), args.kills, args.epochs, env, rng))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "kills"}), flush=True)
    result = {"bench": "soak", "seed": args.seed, "rows": rows, "seconds": round(time.time() - start),
              "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
