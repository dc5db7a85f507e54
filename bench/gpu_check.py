"""The device check for a machine with a GPU (bench/gpu_check.sh, `make gpu-check`): one prepared call, at most
8 minutes, results in bench/results/gpu_check.json (each part's figures, or why it was skipped or failed).

    python bench/gpu_check.py --data .gl [--budget-s 470] [--out bench/results/gpu_check.json]
    python bench/gpu_check.py --cpu --data .gl       # the same parts at tiny scale on the CPU (a rehearsal)
    python bench/gpu_check.py --prepare-data .gl     # (before) photos as shards, to carry to the GPU machine

Parts, most important first, each skipped when the time left cannot hold it:
1. gpu_step: bench/gpu_step.py on the shipped recipes (vit_b16, vit_l16 from their YAML), bf16, compile off.
2. teacher_cache: `pretrain.cache_teacher` of the carried shards with a (random) ViT-B-16 teacher on the GPU.
3. pretrain_300: 300 steps of `pretrain/main.py` with the ViT-B/16 recipe on those shards through the real loader
   and the cached teacher: img/s, data-wait share, MFU, peak memory from its log windows, and CUDA's own sync
   detector on every step (debug.cuda_sync_debug): syncs on steps that do not log.
4. deepspeed: the same recipe for 40 steps as a DeepSpeed ZeRO-2 world of one in bf16 (skipped without DeepSpeed).
5. kill_resume: a run SIGKILLed after its step-20 checkpoint and resumed to step 60.
6. gpu_step_compiled: part 1 under per-block torch.compile.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECIPES = ["configs/pretrain/vit_b16.yaml", "configs/pretrain/vit_l16.yaml"]


class Check:
    """The parts' results, written to the JSON after each part (a timeout keeps what was measured)."""

    def __init__(self, out: Path, budget_s: float, cpu: bool):
        self.out, self.deadline, self.cpu = out, time.monotonic() + budget_s, cpu
        self.result = {"bench": "gpu_check", "cpu_rehearsal": cpu, "parts": {}, "started": time.strftime("%F %T")}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, needs_s: float, fn) -> None:
        start = time.monotonic()
        if self.left() < needs_s:
            entry = {"status": "skipped", "why": f"{self.left():.0f} s left, {needs_s:.0f} s needed"}
        else:
            try:
                entry = {"status": "ok", **fn()}
            except Skip as e:
                entry = {"status": "skipped", "why": str(e)}
            except Exception as e:  # a part that fails must not lose the others
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.monotonic() - start, 1)
        self.result["parts"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']} s) "
              f"{json.dumps({k: v for k, v in entry.items() if k not in ('traceback', 'rows')})[:600]}", flush=True)
        self.write()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.out)


class Skip(Exception):
    """A part that cannot run here (a package the machine lacks), said so in the JSON."""


def run(cmd, timeout: float, **env) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {done.stderr[-2500:]}")
    return done


def shards(data: Path) -> str:
    split = data / "shards" / "train"
    count = len(list(split.glob("*.tar")))
    if not count:
        raise Skip(f"no shards in {split}: run `python bench/gpu_check.py --prepare-data {data}` where the "
                   f"photos can be made, and carry the folder")
    return str(split / f"{{00000..{count - 1:05d}}}.tar")


def part_gpu_step(check: Check, compiled: bool) -> dict:
    import torch
    from bench.gpu_step import measure
    from runtime.flops import device_peak_tflops
    device = "cpu" if check.cpu else "cuda"
    recipes = ["configs/pretrain/tiny.yaml"] if check.cpu else RECIPES
    peak = None if check.cpu else device_peak_tflops(torch.device("cuda"), None)
    rows = []
    for recipe in recipes:
        # the GPU recipes run with teacher.cache, tiny.yaml with its teacher live
        rows.append(measure(recipe, 3 if check.cpu else 20, compiled, peak, device, cached=not check.cpu))
        if not check.cpu:
            torch.cuda.empty_cache()
    return {"rows": rows, "summary": {Path(r["recipe"]).stem: {k: r[k] for k in ("img_per_s", "mfu",
                                                                                  "peak_memory_gib", "batch")}
                                      for r in rows}}


def part_cache(check: Check, data: Path, work: Path) -> dict:
    arch = str(REPO / "configs/teacher/tiny-clip.json") if check.cpu else "ViT-B-16"
    start = time.monotonic()
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "pretrain.cache_teacher", "--shards", shards(data), "--teacher-arch", arch, "--teacher-checkpoint",
                "random", "--out", work / "teacher_cache", "--batch-size", 256], timeout=check.left())
    line = next(l for l in (done.stdout + done.stderr).splitlines() if "teacher cache: rank 0" in l)
    return {"log": line.split("pretrain.cache_teacher: ")[-1], "img_per_s": float(line.rsplit("(", 1)[1].split()[0]),
            "wall_s": round(time.monotonic() - start, 1)}


def pretrain_args(check: Check, data: Path, out: Path, steps: int, batch: int, *extra) -> list:
    recipe = "configs/pretrain/tiny.yaml" if check.cpu else "configs/pretrain/vit_b16.yaml"
    teacher = [f"teacher.arch={REPO / 'configs/teacher/tiny-clip.json'}"] if check.cpu else []
    return [sys.executable, "pretrain/main.py", "--config", recipe, f"data.train=[{shards(data)}]",
            f"run.output_dir={out}", "teacher.checkpoint=random", f"teacher.cache={out.parent / 'teacher_cache'}",
            *teacher, f"data.batch_size={batch}", f"data.samples_per_epoch={steps * batch}", "train.epochs=1",
            "train.image_every=0", "optim.warmup_epochs=0.05", *extra]


def windows(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def part_pretrain(check: Check, data: Path, work: Path) -> dict:
    import statistics
    steps, batch = (60, 32) if check.cpu else (300, 256)
    out = work / "pretrain_300"
    run(pretrain_args(check, data, out, steps, batch, "run.log_every=20", "run.ckpt_every=100000",
                      "debug.cuda_sync_debug=true", "data.num_workers=auto"), timeout=check.left())
    steady = windows(out)[1:]  # the first window holds start-up (workers, compilation of nothing, allocator)

    def mean(key):
        values = [w[key] for w in steady if key in w]
        return round(statistics.mean(values), 4) if values else None
    records = [json.loads(line) for line in (out / "host_syncs" / "rank0.jsonl").read_text().splitlines()]
    quiet = [r for r in records if r["quiet"]]
    result = json.loads((out / "result.json").read_text())
    return {"steps": result["final_step"], "batch": batch, "img_per_s": mean("perf/img_per_s"),
            "data_wait_share": mean("perf/data_wait_share"), "mfu": mean("perf/mfu"),
            "peak_memory_gib": max((w["perf/peak_memory_gib"] for w in steady if "perf/peak_memory_gib" in w),
                                   default=None),
            "cuda_syncs_per_quiet_step": (sum(r.get("cuda_syncs", 0) for r in quiet) / len(quiet)) if quiet else None,
            "cuda_sync_sites_on_quiet_steps": sorted({s for r in quiet for s in r.get("cuda_sync_sites", [])}),
            "cuda_sync_detector": not check.cpu, "loader_workers": _workers(out)}


def _workers(out: Path):
    import yaml
    return yaml.safe_load((out / "config.yaml").read_text())["data"]["num_workers"]


def part_deepspeed(check: Check, data: Path, work: Path) -> dict:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # the GPU image may lack it, and no wheel could be carried
        raise Skip(f"deepspeed not importable here ({type(e).__name__}: {e})")
    steps, batch = (20, 16) if check.cpu else (40, 128)
    out = work / "deepspeed"
    precision = ["train.precision=bf16", "run.device=cpu"] if check.cpu else ["train.precision=bf16"]
    run(pretrain_args(check, data, out, steps, batch, "train.strategy=deepspeed",
                      "train.deepspeed_config=configs/deepspeed/zero2.json", "run.log_every=10",
                      "run.ckpt_every=100000", *precision), timeout=check.left())
    steady = windows(out)[1:]
    result = json.loads((out / "result.json").read_text())
    return {"steps": result["final_step"], "strategy": result["strategy"], "batch": batch,
            "img_per_s": round(sum(w["perf/img_per_s"] for w in steady) / max(1, len(steady)), 1),
            "last_loss": steady[-1].get("train/loss") if steady else None}


def part_kill_resume(check: Check, data: Path, work: Path) -> dict:
    from runtime.checkpoint import CheckpointStore, load_checkpoint
    import psutil
    batch = 16 if check.cpu else 64
    out = work / "kill_resume"
    args = pretrain_args(check, data, out, 60, batch, "run.log_every=10", "run.ckpt_every=20")
    proc = subprocess.Popen(args + ["debug.step_sleep_s=0.05"], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    store = CheckpointStore(out / "checkpoints")
    deadline = time.monotonic() + min(240, check.left())
    while time.monotonic() < deadline and proc.poll() is None:
        latest = store.latest()
        if latest is not None and load_checkpoint(latest)["step"] >= 20:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended before it was killed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out)["step"]
    run(args, timeout=check.left())
    result = json.loads((out / "result.json").read_text())
    ok = result["resumed_from_step"] == killed_at and result["final_step"] == 60
    if not ok:
        raise RuntimeError(f"resumed from {result['resumed_from_step']} (killed at {killed_at}), "
                           f"ended at {result['final_step']}")
    return {"killed_after_checkpoint_step": killed_at, "resumed_from_step": result["resumed_from_step"],
            "final_step": result["final_step"]}


def prepare_data(root: Path, photos: int = 1024) -> None:
    """Web-size photos (scikit-learn's two bundled ones, cropped) as shards at max side 320: small enough to carry
    (about 25 MB), large enough that decoding costs what it costs."""
    import tempfile
    from bench.photos import make_web_photos
    from data_tools.folder import shard_folder
    from data_tools.samples import ImageOptions
    with tempfile.TemporaryDirectory() as tmp:
        make_web_photos(Path(tmp), photos)
        shard_folder("bench", tmp, str(root / "shards"), generic=True, ratios=(1.0, 0.0, 0.0), shard_size=64,
                     min_shards=16, options=ImageOptions(max_side=320, detector="none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".gl", help="the carried folder (shards/train/*.tar)")
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=470.0)
    parser.add_argument("--cpu", action="store_true", help="rehearse every part at tiny scale on the CPU")
    parser.add_argument("--prepare-data", metavar="DIR", help="make the shards to carry, then exit")
    args = parser.parse_args()
    if args.prepare_data:
        prepare_data(Path(args.prepare_data))
        return
    import tempfile
    import torch
    check = Check(Path(args.out), args.budget_s, args.cpu)
    if not args.cpu and not torch.cuda.is_available():
        check.result["skipped"] = "no CUDA device (use --cpu for a rehearsal)"
        check.write()
        print(check.result["skipped"])
        return
    versions = {}
    for name in ("open_clip_torch", "webdataset", "deepspeed", "timm", "submitit"):
        try:
            import importlib.metadata
            versions[name] = importlib.metadata.version(name)
        except Exception:
            versions[name] = None
    check.result["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                                   "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                   "cpus": len(os.sched_getaffinity(0)), "packages": versions}
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scale = 0.3 if args.cpu else 1.0
        check.part("gpu_step", 60 * scale, lambda: part_gpu_step(check, compiled=False))
        check.part("teacher_cache", 30 * scale, lambda: part_cache(check, data, work))
        check.part("pretrain_300", 90 * scale, lambda: part_pretrain(check, data, work))
        check.part("deepspeed", 60 * scale, lambda: part_deepspeed(check, data, work))
        check.part("kill_resume", 90 * scale, lambda: part_kill_resume(check, data, work))
        check.part("gpu_step_compiled", 120 * scale, lambda: part_gpu_step(check, compiled=True))
    check.result["finished"] = time.strftime("%F %T")
    check.write()
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
