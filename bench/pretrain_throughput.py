"""Pretraining step throughput (img/s) and peak memory: students, live vs cached teacher, 1 vs 2 processes,
DDP vs DeepSpeed ZeRO-1/2.

    python bench/pretrain_throughput.py [--presets tiny vit_b16] [--procs 1 2] [--teachers live cached]
        [--strategies ddp zero1 zero2] [--threads-per-rank N] [--out bench/results/pretrain_throughput.json]

Weak scaling, one core per rank (`--procs 1 2 --threads-per-rank 1`): efficiency = (2-rank img/s) / (2 x 1-rank
img/s), each rank with one intra-op thread, so the 2-rank run has twice the cores of the 1-rank one and the figure
measures the system (gradient exchange, ZeRO partitioning), not two ranks sharing the same cores.

Each configuration runs under torchrun (DDP, gloo on CPU / NCCL on GPU) on synthetic batches of the model's input
size, so the figure is the model step alone (forward of both branches, teacher, losses, backward, AdamW step);
data loading is measured by bench/loader.py. Teachers have random weights of the real architecture (tiny-clip for
the tiny student, open_clip ViT-B-16 for ViT-B/16). Reported: median img/s over the timed steps, summed over
ranks, and each rank's peak resident memory (ru_maxrss: model, optimizer state, activations, libraries).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402

SETTINGS = {  # preset -> (teacher arch, batch per rank, timed steps)
    "tiny": ("configs/teacher/tiny-clip.json", 32, 30),
    "vit_b16": ("ViT-B-16", 4, 3),
    "vit_l16": ("ViT-B-16", 2, 2),
}
STRATEGIES = {"ddp": ("ddp", None), "zero1": ("deepspeed", "configs/deepspeed/zero1.json"),
              "zero2": ("deepspeed", "configs/deepspeed/zero2.json")}


def worker(spec: dict, out: str) -> None:
    import torch
    from pretrain.config import LossConfig, ModelConfig
    from pretrain.model import UniEmoXPretrainer
    from pretrain.teacher import CLIPTeacher
    from runtime import distributed
    from runtime.precision import autocast, resolve_precision
    from runtime.entry import init_distributed_for
    from runtime.strategy import make_strategy

    name, ds_config = STRATEGIES[spec["strategy"]]
    env = init_distributed_for(name)
    device = distributed.default_device(env)
    precision = resolve_precision("auto", device)
    arch, _, _ = SETTINGS[spec["preset"]]
    batch, cached = spec["batch"], spec["cached"]
    torch.manual_seed(0)
    teacher = CLIPTeacher(arch, "random").to(device)
    model = UniEmoXPretrainer(ModelConfig(preset=spec["preset"]), LossConfig(), teacher.embed_dim)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    strategy = make_strategy(name, model, optim, device, deepspeed_config=ds_config and str(REPO / ds_config),
                             batch_per_rank=batch, precision=precision)
    size = model.mae.arch.img_size
    batch_data = {"image": torch.randn(batch, 3, size, size, device=device),
                  "person": torch.randn(batch, 3, *(model.person_img_size,) * 2, device=device),
                  "text": teacher.tokenize(["The overall emotion conveyed is awe."] * batch).to(device)}
    if cached:
        batch_data["clip_image"] = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1).to(device)
        batch_data["clip_text"] = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1).to(device)
    times = []
    for i in range(spec["steps"] + 1):  # the first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(precision, device):
            if not cached:  # the teacher's embeddings first, then the student
                with torch.no_grad():
                    batch_data.update(clip_image=teacher.encode_image(batch_data["image"]),
                                      clip_text=teacher.encode_text(batch_data["text"]))
            step_out = strategy.model(batch_data)
        strategy.backward(step_out.loss)
        strategy.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gathered = distributed.all_gather_object((statistics.median(batch / t for t in times), rss_mib))
    if env.is_main:
        Path(out).write_text(json.dumps({
            "img_per_s": sum(g[0] for g in gathered), "per_rank": [g[0] for g in gathered],
            "peak_rss_mib_per_rank": [round(g[1]) for g in gathered], "step_s_median": statistics.median(times),
            "device": str(device), "precision": precision, "threads": torch.get_num_threads()}))
    distributed.shutdown(wait_for_peers=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b16"], choices=SETTINGS)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--teachers", nargs="+", default=["live", "cached"], choices=["live", "cached"])
    parser.add_argument("--strategies", nargs="+", default=["ddp"], choices=STRATEGIES)
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="intra-op threads of each rank (0: the machine's cores shared by the ranks)")
    parser.add_argument("--out", default="bench/results/pretrain_throughput.json")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC_JSON", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cores = os.cpu_count() or 1
    for preset in args.presets:
        _, batch, steps = SETTINGS[preset]
        for teacher in args.teachers:
            for strategy in args.strategies:
                for nproc in args.procs:
                    spec = {"preset": preset, "cached": teacher == "cached", "batch": batch, "steps": steps,
                            "strategy": strategy}
                    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", __file__, "--worker", json.dumps(spec), tmp.name]
                        threads = args.threads_per_rank or max(1, cores // nproc)  # default: same cores in both
                        run_env = {**env, "OMP_NUM_THREADS": str(threads)}
                        done = subprocess.run(cmd, env=run_env, cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)
                        if done.returncode:
                            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}")
                        row = {"preset": preset, "teacher": teacher, "strategy": strategy, "procs": nproc,
                               "batch_per_rank": batch, **json.loads(Path(tmp.name).read_text())}
                    rows.append(row)
                    print(f"{preset:8s} {teacher:6s} {strategy:5s} {nproc} proc: {row['img_per_s']:.2f} img/s "
                          f"({row['step_s_median']:.3f} s/step, {row['threads']} threads/rank, peak RSS "
                          f"{max(row['peak_rss_mib_per_rank'])} MiB/rank, {row['device']})", flush=True)
    result = {"bench": "pretrain_throughput", "rows": rows, "cores": cores, "weak_scaling": weak_scaling(rows),
              "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


def weak_scaling(rows: list) -> list:
    """(2-rank img/s) / (2 x 1-rank img/s) for each preset, teacher and strategy measured at both sizes with the same
    threads per rank."""
    out = []
    for two in (r for r in rows if r["procs"] == 2):
        one = next((r for r in rows if r["procs"] == 1 and r["threads"] == two["threads"]
                    and all(r[k] == two[k] for k in ("preset", "teacher", "strategy"))), None)
        if one:
            out.append({k: two[k] for k in ("preset", "teacher", "strategy", "threads")} |
                       {"efficiency": round(two["img_per_s"] / (2 * one["img_per_s"]), 3)})
    return out


if __name__ == "__main__":
    main()
