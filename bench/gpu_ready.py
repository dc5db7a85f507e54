"""The figures that say the CUDA path is ready, measured on CPU: host syncs on quiet steps, FLOPs counted against the
analytic formula, the epoch-boundary gap and teacher-cache throughput before and after, persistent workers.

    python bench/gpu_ready.py [--before REV] [--out bench/results/gpu_ready.json]

- host_syncs_per_step: calls that would wait for a GPU (runtime/host_sync.py) per step that neither logs nor
  checkpoints, in 2-rank tiny pretraining (DDP, ZeRO-2) and fine-tuning; DeepSpeed's own, inside its step(), apart.
- teacher_gflops_*: open_clip ViT-B-16, one 224 px image + one 77-token text; counted under the rule the trainers use
  (runtime/flops.py), under torch's counter alone (the old count), and by the formula. mae_step_gflops_*: the MAE
  ViT-B/16 training step at mask 0.75 per image (3x the forward), counted and by the formula. vit_b16_live_step_*:
  the ViT-B/16 recipe's step with a live ViT-B-16 teacher, per image, by the old rule and the new one.
- epoch_gap_s_*: seconds the trainer waits for the first batch of an epoch (the last batch of the one before was
  taken a step earlier), mean over the boundaries of a 4-epoch tiny pretraining run with 2 loader workers on
  224 px photos, against the median wait of the other steps; `before` runs the code of REV from a git worktree.
- same_workers_every_epoch: the batches of every epoch of that run came from the same worker processes.
- cache_img_per_s_*: pretrain.cache_teacher on 1,024 web-size photos (2 loader workers after; before, decoding in
  the main process), the call alone timed, for a tiny open_clip teacher at 224 px (decoding dominates, as it does
  once the teacher is on a GPU) and for the offline classifier teacher (its CPU forward dominates).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402

BEFORE = "b1123f7"  # the last commit before the CUDA-path fixes
TINY_CLIP_224 = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def env_for(tree: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}


def run(cmd: list, tree: Path = REPO, **extra_env) -> str:
    done = subprocess.run(cmd, cwd=tree, env={**env_for(tree), **extra_env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-4000:]}")
    return done.stdout


def torchrun(nproc: int, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]


def make_data(root: Path) -> dict:
    """Web-size photos as shards at data_tools' default max side, and small ones as a labelled set."""
    from bench.photos import make_images, make_web_photos
    from data_tools.folder import shard_folder
    from data_tools.samples import ImageOptions
    make_web_photos(root / "web", 1024)
    shard_folder("bench", str(root / "web"), str(root / "web_shards"), generic=True, ratios=(1.0, 0.0, 0.0),
                 shard_size=64, min_shards=16, options=ImageOptions(detector="none"))
    make_images(root / "small", 240, classes=4)
    shard_folder("bench", str(root / "small"), str(root / "small_shards"), generic=True, ratios=(0.5, 0.25, 0.25),
                 shard_size=20, min_shards=4, options=ImageOptions(max_side=48, detector="none"))
    def pattern(split_dir: Path) -> str:
        return str(split_dir / f"{{00000..{len(list(split_dir.glob('*.tar'))) - 1:05d}}}.tar")
    return {"web": pattern(root / "web_shards" / "train"), "small_pretrain": pattern(root / "small_shards" / "train"),
            "small_root": str(root / "small_shards")}


def host_syncs(data: dict, root: Path) -> dict:
    """Per quiet step: the project's calls (goal 0) and DeepSpeed's, in each of three real 2-rank runs."""
    common = ["data.batch_size=8", "data.num_workers=1", "data.samples_per_epoch=160", "train.epochs=2",
              "run.log_every=5", "run.ckpt_every=10", "train.image_every=10", "debug.count_host_syncs=true"]
    runs = {
        "pretrain_ddp": ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml",
                         f"data.train=[{data['small_pretrain']}]", *common],
        "pretrain_zero2": ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml",
                           f"data.train=[{data['small_pretrain']}]", *common, "train.strategy=deepspeed",
                           "train.deepspeed_config=configs/deepspeed/zero2.json"],
        "finetune_ddp": ["finetune/main.py", "--config", "configs/finetune/tiny.yaml", "--dataset", "bench",
                         "--data", data["small_root"], "--from-scratch", "data.batch_size=8", "data.num_workers=1",
                         "train.epochs=3", "run.log_every=5", "debug.count_host_syncs=true"],
    }
    rows = {}
    for name, args in runs.items():
        out = root / f"syncs_{name}"
        run(torchrun(2, *args, f"run.output_dir={out}"))
        records = [json.loads(line) for path in sorted((out / "host_syncs").glob("rank*.jsonl"))
                   for line in path.read_text().splitlines()]
        quiet = [r for r in records if r["quiet"]]
        loud = [r for r in records if not r["quiet"]]
        rows[name] = {"quiet_steps": len(quiet),
                      "project_per_quiet_step": sum(r["project"] for r in quiet) / len(quiet),
                      "deepspeed_per_quiet_step": sum(r["deepspeed"] for r in quiet) / len(quiet),
                      "project_per_sync_step": sum(r["project"] for r in loud) / max(1, len(loud)),
                      "project_calls_on_quiet_steps": sorted({(c["call"], c["where"]) for r in quiet
                                                              for c in r["calls"] if c["owner"] == "project"})}
        print(f"host syncs, {name}: {rows[name]['project_per_quiet_step']:.2f} project / "
              f"{rows[name]['deepspeed_per_quiet_step']:.1f} DeepSpeed calls per quiet step "
              f"({len(quiet)} quiet steps)", flush=True)
    return rows


def flops() -> dict:
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from pretrain.config import LossConfig, ModelConfig
    from pretrain.mae import MaskedAutoencoderViT, get_arch, mae_forward_flops
    from pretrain.model import UniEmoXPretrainer
    from pretrain.teacher import CLIPTeacher, open_clip_flops
    from runtime.flops import count_flops, training_step_flops
    from runtime.precision import autocast

    def old_count(fn) -> int:  # what the trainers counted before: torch's counter alone
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    image, text = torch.randn(1, 3, 224, 224), open_clip.get_tokenizer("ViT-B-16")(["a photo of awe"])
    analytic = open_clip_flops("ViT-B-16")
    teacher_fwd = lambda: (clip.encode_image(image), clip.encode_text(text))  # noqa: E731
    mae = MaskedAutoencoderViT(get_arch("vit_b16"))
    images = torch.randn(2, 3, 224, 224)
    # the ViT-B/16 recipe's step with a live teacher (person at 112 px), per image, under bf16 autocast
    teacher = CLIPTeacher("ViT-B-16", "random")
    student = UniEmoXPretrainer(ModelConfig(preset="vit_b16", person_img_size=112), LossConfig(), teacher.embed_dim)
    batch = {"image": torch.randn(1, 3, 224, 224), "person": torch.randn(1, 3, 112, 112),
             "text": teacher.tokenize(["The overall emotion conveyed is awe."])}
    frozen = lambda: (teacher.encode_image(batch["image"]), teacher.encode_text(batch["text"]))  # noqa: E731
    bf16 = lambda: autocast("bf16", torch.device("cpu"))  # noqa: E731
    with bf16():
        batch["clip_image"], batch["clip_text"] = frozen()

    def old_step() -> int:  # the old forward held the teacher: counted in it under autocast, then subtracted
        with bf16():
            total = old_count(lambda: student(batch)) + old_count(frozen)
        return 3 * (total - old_count(frozen)) + old_count(frozen)
    result = {"teacher_gflops_counted": count_flops(teacher_fwd, bf16) / 1e9,
              "teacher_gflops_counted_old_rule": old_count(teacher_fwd) / 1e9,
              "teacher_gflops_analytic": (analytic["image"] + analytic["text"]) / 1e9,
              "teacher_image_gflops_counted": count_flops(lambda: clip.encode_image(image), bf16) / 1e9,
              "teacher_image_gflops_analytic": analytic["image"] / 1e9,
              "mae_step_gflops_counted": training_step_flops(lambda: mae(images, 0.75), context=bf16) / 2 / 1e9,
              "mae_step_gflops_analytic": 3 * mae_forward_flops(mae.arch, 0.75) / 1e9,
              "vit_b16_live_step_gflops_counted": training_step_flops(lambda: student(batch), frozen, bf16) / 1e9,
              "vit_b16_live_step_gflops_old_rule": old_step() / 1e9}
    result = {k: round(v, 2) for k, v in result.items()}
    for key in ("teacher", "mae_step"):
        result[f"{key}_counted_over_analytic"] = round(result[f"{key}_gflops_counted"] /
                                                       result[f"{key}_gflops_analytic"], 4)
    print("FLOPs:", json.dumps(result), flush=True)
    return result


def epoch_gaps(tree: Path, data: dict, out: Path, record: bool) -> dict:
    """A 4-epoch tiny run logging every step: the trainer's wait for the first batch of epochs 2-4 vs the rest."""
    steps_per_epoch, batch = 8, 32
    args = ["pretrain/main.py", "--config", "configs/pretrain/tiny.yaml", f"data.train=[{data['web']}]",
            f"run.output_dir={out}", f"data.batch_size={batch}", "data.num_workers=2", "data.shuffle_buffer=200",
            f"data.samples_per_epoch={steps_per_epoch * batch}", "train.epochs=4", "train.image_every=0",
            "run.log_every=1", "run.ckpt_every=1000", "optim.warmup_epochs=0"]
    if record:
        args.append("debug.record_keys=true")
    run([sys.executable, *args], tree)
    waits = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        window = json.loads(line)
        if "perf/img_per_s" in window and window["perf/img_per_s"] > 0:
            waits[window["step"]] = window["perf/data_wait_share"] * batch / window["perf/img_per_s"]
    boundaries = [e * steps_per_epoch + 1 for e in (1, 2, 3)]
    others = [w for step, w in waits.items() if step not in boundaries and step > 1]
    result = {"gaps_s": [round(waits[s], 4) for s in boundaries], "gap_s_mean": statistics.mean(waits[s] for s in
                                                                                               boundaries),
              "other_steps_wait_s_median": statistics.median(others)}
    if record:
        per_epoch = {}
        for line in (out / "keys" / "rank0.jsonl").read_text().splitlines():
            entry = json.loads(line)
            per_epoch.setdefault(entry["epoch"], set()).add(entry["worker_pid"])
        result["worker_pids_per_epoch"] = {e: sorted(p) for e, p in per_epoch.items()}
        result["same_workers_every_epoch"] = len({tuple(sorted(p)) for p in per_epoch.values()}) == 1 and \
            len(per_epoch) == 4
    return result


CACHE_DRIVER = """
import inspect, json, sys, time
from pretrain.cache_teacher import cache_teacher
from pretrain.config import TeacherConfig
from pretrain.teacher import make_teacher
spec = json.loads(sys.argv[1])
teacher = make_teacher(TeacherConfig(**spec["teacher"]))
kwargs = {"batch_size": 64, "device": "cpu"}
if "num_workers" in inspect.signature(cache_teacher).parameters:
    kwargs["num_workers"] = spec["workers"]
start = time.perf_counter()
stats = cache_teacher([spec["shards"]], teacher, spec["out"], **kwargs)
print(json.dumps({"samples": sum(s["samples"] for s in stats), "seconds": time.perf_counter() - start}))
"""


def cache_rate(tree: Path, data: dict, out: Path, teacher: dict, workers: int) -> float:
    spec = {"teacher": teacher, "shards": data["web"], "out": str(out), "workers": workers}
    last = run([sys.executable, "-c", CACHE_DRIVER, json.dumps(spec)], tree).strip().splitlines()[-1]
    done = json.loads(last)
    return done["samples"] / done["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="the revision whose code the `before` figures run")
    parser.add_argument("--out", default="bench/results/gpu_ready.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before = root / "before_tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            data = make_data(root)
            result = {"bench": "gpu_ready", "before": args.before, "cores": os.cpu_count()}
            result["host_syncs"] = host_syncs(data, root)
            result["host_syncs_per_step"] = max(r["project_per_quiet_step"] for r in result["host_syncs"].values())
            result["deepspeed_syncs_per_step"] = result["host_syncs"]["pretrain_zero2"]["deepspeed_per_quiet_step"]
            result.update(flops())
            gaps_before = epoch_gaps(before, data, root / "gap_before", record=False)
            gaps_after = epoch_gaps(REPO, data, root / "gap_after", record=True)
            result["epoch_gap"] = {"before": gaps_before, "after": gaps_after}
            result["epoch_gap_s_before"] = round(gaps_before["gap_s_mean"], 3)
            result["epoch_gap_s_after"] = round(gaps_after["gap_s_mean"], 3)
            result["same_workers_every_epoch"] = gaps_after["same_workers_every_epoch"]
            print(f"epoch gap: {result['epoch_gap_s_before']} s before, {result['epoch_gap_s_after']} s after "
                  f"(other steps wait {gaps_before['other_steps_wait_s_median']:.3f} / "
                  f"{gaps_after['other_steps_wait_s_median']:.3f} s)", flush=True)
            clip_config = root / "tiny-clip-224.json"
            clip_config.write_text(json.dumps(TINY_CLIP_224))
            teachers = {"tiny_clip_224": {"checkpoint": "random", "arch": str(clip_config)},
                        "classifier": {"checkpoint": "packaged", "backend": "classifier", "image_size": 112,
                                       "temperature": 10.0}}
            result["cache"] = {}
            for name, teacher in teachers.items():
                rates = {"before": cache_rate(before, data, root / f"cache_before_{name}", teacher, 0),
                         "after": cache_rate(REPO, data, root / f"cache_after_{name}", teacher, 2)}
                result["cache"][name] = {k: round(v, 1) for k, v in rates.items()}
                print(f"teacher cache, {name}: {rates['before']:.1f} img/s before, {rates['after']:.1f} after",
                      flush=True)
            result["cache_img_per_s_before"] = result["cache"]["tiny_clip_224"]["before"]
            result["cache_img_per_s_after"] = result["cache"]["tiny_clip_224"]["after"]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    result["command"] = " ".join(sys.argv)
    result["measured"] = time.strftime("%Y-%m-%d")
    atomic_write_json(REPO / args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
