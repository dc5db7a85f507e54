"""Data-wait share of real pretraining steps: the trainer on JPEG shards with 2 loader workers, as a user runs it.

    python bench/data_wait.py [--presets tiny vit_b16] [--workers 2] [--threads 0 1] [--out bench/results/data_wait.json]

Each preset runs `pretrain/main.py` (1 process, live random-weight teacher, shards of 512 web-size photos of
400-640 x 300-427 px written at data_tools' default max side, no stored person boxes so the person view is the
whole image, at the preset config's person size) for a fixed number of steps, then reads
back what the trainer logged to TensorBoard: `perf/data_wait_share` (time the training loop waited for its next
batch / wall time) and `perf/img_per_s`. The first logging window (worker start-up, shuffle buffer filling) is
reported apart from the steady-state windows after it. Each preset runs with torch's default intra-op threads and
with OMP_NUM_THREADS=1 (the loader workers then have the other cores to themselves).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.photos import make_web_photos  # noqa: E402
from data_tools.folder import shard_folder  # noqa: E402
from data_tools.samples import ImageOptions  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402

SETTINGS = {  # preset -> (config, batch, steps, log_every)
    "tiny": ("configs/pretrain/tiny.yaml", 32, 60, 10),
    "vit_b16": ("configs/pretrain/vit_b16.yaml", 8, 8, 2),
}


def run_pretraining(preset: str, shards: Path, out: Path, workers: int, threads: int) -> dict:
    config, batch, steps, log_every = SETTINGS[preset]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "pretrain/main.py",
           "--config", config, f"data.train=[{shards}/train/{{00000..00007}}.tar]", f"run.output_dir={out}",
           f"data.batch_size={batch}", f"data.num_workers={workers}", f"data.samples_per_epoch={batch * steps}",
           "data.shuffle_buffer=200", "train.epochs=1", "train.image_every=0", f"run.log_every={log_every}",
           f"run.ckpt_every={steps * 10}", "teacher.checkpoint=random", "optim.warmup_epochs=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}")
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    wait = [e.value for e in acc.Scalars("perf/data_wait_share")]
    img_s = [e.value for e in acc.Scalars("perf/img_per_s")]
    return {"preset": preset, "batch": batch, "steps": steps, "workers": workers, "threads": threads or "default",
            "log_every": log_every,
            "first_window": {"data_wait_share": wait[0], "img_per_s": img_s[0]},
            "steady": {"data_wait_share": statistics.mean(wait[1:]), "img_per_s": statistics.mean(img_s[1:]),
                       "windows": len(wait) - 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                        help="OMP_NUM_THREADS of the training process, one run each (0: torch's default)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--out", default="bench/results/data_wait.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        make_web_photos(folder, args.images)
        shard_folder("bench", str(folder), str(shards), generic=True, ratios=(1.0, 0.0, 0.0), shard_size=64,
                     min_shards=8, options=ImageOptions(detector="none", quality=90))  # default max side
        for preset in args.presets:
            for threads in args.threads:
                row = run_pretraining(preset, shards, Path(tmp) / f"run_{preset}_{threads}", args.workers, threads)
                rows.append(row)
                print(f"{preset} ({threads or 'default'} threads): data wait {row['steady']['data_wait_share']:.1%} "
                      f"of wall time at {row['steady']['img_per_s']:.1f} img/s ({args.workers} workers, batch "
                      f"{row['batch']}; first window {row['first_window']['data_wait_share']:.1%})", flush=True)
    result = {"bench": "data_wait", "images": args.images, "cores": os.cpu_count(), "rows": rows,
              "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
