"""The pretraining step on a CUDA GPU in bf16: img/s and MFU for ViT-B/16 and ViT-L/16 (on a CPU it says it skipped).

    python bench/gpu_step.py [--presets vit_b16 vit_l16] [--batch 64] [--steps 20] [--compile]
        [--teacher cached|live] [--out bench/results/gpu_step.json]

The step is the trainer's: UniEmoXPretrainer (scene + person branches, both distillation losses; teacher embeddings
cached as in the recommended recipe, or a live random-weight open_clip ViT-B-16), bf16 autocast, timm attention
through PyTorch's fused scaled_dot_product_attention, torch's fused AdamW, and optionally torch.compile. FLOPs are
counted once with torch's flop counter (3x the student's forward, 1x a live teacher's); MFU = FLOPs/img x img/s /
the device's dense bf16 peak (runtime/flops.py's table, or --peak-tflops).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402


def measure(preset: str, batch: int, steps: int, compile_model: bool, live_teacher: bool, peak: float,
            device_name: str = "cuda") -> dict:
    import torch
    import torch.nn.functional as F
    from pretrain.config import LossConfig, ModelConfig, TeacherConfig
    from pretrain.model import UniEmoXPretrainer
    from pretrain.teacher import CLIPTeacher
    from runtime.config import OptimConfig
    from runtime.flops import training_step_flops
    from runtime.optim import adamw

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    arch = str(REPO / "configs/teacher/tiny-clip.json") if preset == "tiny" else "ViT-B-16"
    teacher = CLIPTeacher(arch, "random").to(device)
    tcfg = TeacherConfig(checkpoint="random", arch=arch, cached=not live_teacher)
    model = UniEmoXPretrainer(ModelConfig(preset=preset), LossConfig(), tcfg, teacher if live_teacher else None)
    model.to(device)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], OptimConfig(lr=1e-4))
    size = model.mae.arch.img_size
    data = {"image": torch.randn(batch, 3, size, size, device=device),
            "person": torch.randn(batch, 3, *(model.person_img_size,) * 2, device=device),
            "text": teacher.tokenize(["The overall emotion conveyed is awe."] * batch).to(device)}
    if not live_teacher:
        data["clip_image"] = F.normalize(torch.randn(batch, teacher.embed_dim, device=device), dim=-1)
        data["clip_text"] = F.normalize(torch.randn(batch, teacher.embed_dim, device=device), dim=-1)

    def forward(m):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return m(data)
    frozen = (lambda: (teacher.encode_image(data["image"]), teacher.encode_text(data["text"]))) if live_teacher else None
    flops_per_img = training_step_flops(lambda: forward(model), frozen) / batch
    step_model = torch.compile(model) if compile_model else model
    times = []
    for i in range(steps + 3):  # 3 warm-up steps (and compilation)
        sync()
        t0 = time.perf_counter()
        out = forward(step_model)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    img_per_s = batch / statistics.median(times)
    return {"preset": preset, "batch": batch, "compile": compile_model, "teacher": "live" if live_teacher else "cached",
            "img_per_s": round(img_per_s, 1), "step_s_median": statistics.median(times),
            "gflops_per_img": round(flops_per_img / 1e9, 1), "peak_bf16_tflops": peak,
            "mfu": round(flops_per_img * img_per_s / (peak * 1e12), 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vit_b16", "vit_l16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also run each preset under torch.compile")
    parser.add_argument("--teacher", choices=["cached", "live"], default="cached")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if unknown")
    parser.add_argument("--out", default="bench/results/gpu_step.json")
    parser.add_argument("--cpu-check", action="store_true", help="run the same code on the CPU (a check, not a figure)")
    args = parser.parse_args()
    import torch
    from runtime.flops import device_peak_tflops
    if args.cpu_check:
        print(json.dumps(measure(args.presets[0], args.batch, args.steps, args.compile, args.teacher == "live", None,
                                 "cpu")))
        return
    if not torch.cuda.is_available():
        print("no CUDA device: skipped (this benchmark measures the bf16 GPU step; the CPU figures are in "
              "bench/pretrain_throughput.py and bench/mae_step.py)")
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak_tflops(torch.device("cuda"), args.peak_tflops)
    rows = []
    for preset in args.presets:
        for compiled in ([False, True] if args.compile else [False]):
            rows.append(measure(preset, args.batch, args.steps, compiled, args.teacher == "live", peak))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    result = {"bench": "gpu_step", "rows": rows, "torch": torch.__version__, "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
