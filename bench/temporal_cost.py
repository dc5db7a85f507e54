"""Cost per frame of the temporal encoder modes: frozen (a forward without grad), cached (features read, only a
temporal head trained) and LoRA on Q/V (forward and backward through the encoder, adapters trained); frames/s to
JSON. `python -m bench.temporal_cost --presets tiny vit_b16 --out bench/results/temporal_cost_cpu.json`"""
import argparse
import json
import platform
import time
from typing import Dict, Optional, Sequence

import torch

from finetune.encoder import build_vit
from finetune.lora import apply_lora
from finetune.temporal import TemporalTransformerHead, va_loss
from pretrain.mae import get_arch
from runtime.atomic import atomic_write_text


def _rate(step, frames: int, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return frames * repeats / (time.perf_counter() - start)


def measure(preset: str, frames: int, repeats: int, device: torch.device, dtype: Optional[torch.dtype]) -> Dict:
    arch = get_arch(preset)
    vit = build_vit(arch, num_classes=0).to(device)
    x = torch.randn(frames, 3, arch.img_size, arch.img_size, device=device)
    head = TemporalTransformerHead(arch.embed_dim, width=128, max_frames=frames).to(device)
    target, mask = torch.zeros(1, frames, 2, device=device), torch.ones(1, frames, dtype=torch.bool, device=device)
    feats = torch.randn(1, frames, arch.embed_dim, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def frozen():
        with torch.no_grad(), autocast:
            vit(x)

    head_optim = torch.optim.AdamW(head.parameters(), lr=1e-4)

    def cached():
        with autocast:
            loss = va_loss(head(feats, mask), target, mask)
        head_optim.zero_grad()
        loss.backward()
        head_optim.step()

    apply_lora(vit, rank=8, alpha=16)
    lora_optim = torch.optim.AdamW([p for p in vit.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-4)

    def lora():
        with autocast:
            loss = va_loss(head(vit(x).unsqueeze(0), mask), target, mask)
        lora_optim.zero_grad()
        loss.backward()
        lora_optim.step()

    return {"preset": preset, "img_size": arch.img_size, "frames_per_step": frames,
            "frozen_frames_per_s": _rate(frozen, frames, repeats),
            "cached_frames_per_s": _rate(cached, frames, repeats),
            "lora_frames_per_s": _rate(lora, frames, repeats)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b16"])
    parser.add_argument("--frames", type=int, default=16, help="frames per step (one clip window)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bf16")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(p, args.frames, args.repeats, device, torch.bfloat16 if args.bf16 else None)
            for p in args.presets]
    result = {"device": args.device, "bf16": args.bf16, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
