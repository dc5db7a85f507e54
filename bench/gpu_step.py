"""The pretraining step of the shipped recipes on a CUDA GPU: img/s, MFU and peak memory, compile off and on.

    python bench/gpu_step.py [--recipes configs/pretrain/vit_b16.yaml ...] [--batch N] [--steps 20] [--compile]
        [--teacher cached|live] [--out bench/results/gpu_step.json]
    python bench/gpu_step.py --cpu-check --recipes configs/pretrain/tiny.yaml    # the same code on the CPU

Each recipe is read from its YAML (model section, batch per GPU, precision): UniEmoXPretrainer with both branches
and both distillation losses, the teacher cached as the GPU recipes run it with teacher.cache (random embeddings
of the teacher's width) or, with --teacher live, live (a random-weight teacher of the recipe's architecture run in
the step before the student), the trainers' strategy step (fused AdamW, the non-finite skip on the device),
autocast at the recipe's precision (auto: bf16 on GPUs >= 8.0), and with --compile also per-block torch.compile
(train.compile). FLOPs per image are counted once under the trainers' rule (runtime/flops.py); MFU = FLOPs/img x
img/s / the device's dense bf16 peak (runtime/flops.py's table, or --peak-tflops). Steps are timed between two
device synchronisations, after warm-up (and compilation).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402

DEFAULT_RECIPES = ["configs/pretrain/vit_b16.yaml", "configs/pretrain/vit_l16.yaml"]


def build(recipe: str, device, batch_override=None):
    """Model, optimizer step and a batch from a recipe's YAML, as pretraining builds them."""
    import torch
    import torch.nn.functional as F
    from pretrain.config import LossConfig, ModelConfig, TeacherConfig
    from pretrain.model import UniEmoXPretrainer
    from pretrain.teacher import make_teacher
    from runtime.config import OptimConfig, config_from_dict
    from runtime.optim import adamw
    cfg = yaml.safe_load((REPO / recipe).read_text())
    model_cfg = config_from_dict(ModelConfig, cfg.get("model") or {}, source=recipe)
    teacher_raw = {**(cfg.get("teacher") or {}), "checkpoint": "random"}
    if str(teacher_raw.get("arch", "")).endswith(".json"):
        teacher_raw["arch"] = str(REPO / teacher_raw["arch"])
    teacher_cfg = config_from_dict(TeacherConfig, teacher_raw, source=recipe)
    loss_cfg = config_from_dict(LossConfig, cfg.get("loss") or {}, source=recipe)
    batch = batch_override or int((cfg.get("data") or {}).get("batch_size", 64))
    torch.manual_seed(0)
    teacher = make_teacher(teacher_cfg)
    model = UniEmoXPretrainer(model_cfg, loss_cfg, teacher.embed_dim)
    model.to(device)
    teacher.to(device)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], OptimConfig(lr=1e-4))
    side, person = model.mae.arch.img_size, model.person_img_size
    data = {"image": torch.randn(batch, 3, side, side, device=device),
            "person": torch.randn(batch, 3, person, person, device=device),
            "text": teacher.tokenize(["The overall emotion conveyed is awe."] * batch).to(device),
            "clip_image": F.normalize(torch.randn(batch, teacher.embed_dim, device=device), dim=-1),
            "clip_text": F.normalize(torch.randn(batch, teacher.embed_dim, device=device), dim=-1)}
    precision = (cfg.get("train") or {}).get("precision", "auto")
    return model, teacher, optimizer, data, batch, precision


def measure(recipe: str, steps: int, compile_model: bool, peak, device_name: str = "cuda", batch_override=None,
            warmup: int = 3, cached: bool = True) -> dict:
    import torch
    from runtime.device import compile_blocks, configure_cuda
    from runtime.flops import training_step_flops
    from runtime.precision import autocast, resolve_precision
    from runtime.strategy import DDPStrategy

    device = torch.device(device_name)
    configure_cuda(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model, teacher, optimizer, data, batch, precision = build(recipe, device, batch_override)
    precision = resolve_precision(precision, device)

    def embed_batch():  # a live teacher's step: its embeddings replace the batch's, then the student runs
        with torch.no_grad():
            data.update(clip_image=teacher.encode_image(data["image"]), clip_text=teacher.encode_text(data["text"]))
    frozen = None if cached else embed_batch
    flops_per_img = training_step_flops(lambda: model(data), frozen, lambda: autocast(precision, device)) / batch
    if compile_model:
        compile_blocks(model.mae.blocks, model.mae.decoder_blocks)
    strategy = DDPStrategy(model, optimizer, device, precision=precision)
    no_skip = torch.zeros((), device=device)

    def step():
        with autocast(precision, device):
            if not cached:
                embed_batch()
            loss = strategy.model(data).loss
        strategy.backward(loss)
        strategy.step(no_skip)
    t0 = time.perf_counter()
    for _ in range(warmup):  # warm-up (and compilation)
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    img_per_s = batch / step_s
    return {"recipe": recipe,
            "batch": batch, "precision": precision, "compile": compile_model,
            "teacher": "cached" if cached else "live", "img_per_s": round(img_per_s, 1), "step_s": round(step_s, 4),
            "warmup_s": round(warm_s, 1), "gflops_per_img": round(flops_per_img / 1e9, 1), "peak_bf16_tflops": peak,
            "mfu": round(flops_per_img * img_per_s / (peak * 1e12), 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--batch", type=int, default=None, help="per GPU (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also run each recipe under per-block torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if unknown")
    parser.add_argument("--teacher", default="cached", choices=["cached", "live"],
                        help="cached: random embeddings in the batch (the GPU recipes' teacher.cache); live: the "
                             "teacher runs in every step")
    parser.add_argument("--out", default="bench/results/gpu_step.json")
    parser.add_argument("--cpu-check", action="store_true", help="run the same code on the CPU (a check, not a figure)")
    args = parser.parse_args()
    import torch
    from runtime.flops import device_peak_tflops
    if args.cpu_check:
        for compiled in ([False, True] if args.compile else [False]):
            print(json.dumps(measure(args.recipes[0], args.steps, compiled, None, "cpu", args.batch, warmup=1,
                                     cached=args.teacher == "cached")))
        return
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (this benchmark measures the GPU step; the CPU figures are in "
              "bench/pretrain_throughput.py and bench/mae_step.py)")
        return
    peak = device_peak_tflops(torch.device("cuda"), args.peak_tflops)
    rows = []
    for recipe in args.recipes:
        for compiled in ([False, True] if args.compile else [False]):
            rows.append(measure(recipe, args.steps, compiled, peak, batch_override=args.batch,
                                cached=args.teacher == "cached"))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    result = {"bench": "gpu_step", "rows": rows, "torch": torch.__version__, "command": " ".join(sys.argv)}
    atomic_write_json(REPO / args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
