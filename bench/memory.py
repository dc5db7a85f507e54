"""Estimated GPU memory of the shipped pretraining recipes, and the per-GPU batch that fits an 80 GB card.

    python bench/memory.py [--budget-gib 60] [--out bench/results/memory_estimate.json]

For each recipe (read from its YAML: preset, mask ratio, person size, strategy) one forward of the full step runs
on the CPU under bf16 autocast with the teacher cached, and every tensor autograd saves for the backward is
counted once (by storage): the activations a GPU would hold at the peak, per image. Weights, gradients and AdamW's
two moments are 16 bytes per trained parameter (ZeRO-2 shards the gradients and moments over the GPUs of a node).
The estimate of a batch is state + batch x activations x 1.15 (allocator slack and workspaces); the chosen batch is
the largest power of two within the budget (default 60 GiB of an 80 GB card). `bench/gpu_check.sh` measures the
real peak on a GPU (attention there runs fused and saves less than the CPU's kernels count here).
"""
import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from runtime.atomic import atomic_write_json  # noqa: E402

RECIPES = ("configs/pretrain/vit_b16.yaml", "configs/pretrain/vit_l16.yaml", "configs/pretrain/vit_h14.yaml")
SLACK = 1.15
GPUS_PER_NODE = 8


def activations_per_image(preset: str, mask_ratio: float, person: int, norm_pix: bool) -> float:
    import torch
    import torch.nn.functional as F
    from pretrain.config import LossConfig, ModelConfig, TeacherConfig
    from pretrain.model import UniEmoXPretrainer
    from pretrain.teacher import teacher_embed_dim
    torch.manual_seed(0)
    dim = teacher_embed_dim(TeacherConfig(checkpoint="random", arch="ViT-B-16"))
    model = UniEmoXPretrainer(ModelConfig(preset=preset, mask_ratio=mask_ratio, person_img_size=person,
                                          norm_pix_loss=norm_pix), LossConfig(), dim)
    n, side = 2, model.mae.arch.img_size
    batch = {"image": torch.randn(n, 3, side, side), "person": torch.randn(n, 3, person, person),
             "clip_image": F.normalize(torch.randn(n, dim), dim=-1),
             "clip_text": F.normalize(torch.randn(n, dim), dim=-1)}
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(storages.values()) / n, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-gib", type=float, default=60.0)
    parser.add_argument("--out", default="bench/results/memory_estimate.json")
    args = parser.parse_args()
    rows = []
    for recipe in RECIPES:
        cfg = yaml.safe_load((REPO / recipe).read_text())
        model, train = cfg.get("model", {}), cfg.get("train", {})
        act, params = activations_per_image(model["preset"], model.get("mask_ratio", 0.75),
                                            model.get("person_img_size") or 224, model.get("norm_pix_loss", False))
        zero2 = train.get("strategy") == "deepspeed"
        # fp32 weights (4 B) everywhere; gradients and the two moments (12 B) sharded over a node's GPUs by ZeRO-2
        state = params * (4 + 12 / GPUS_PER_NODE if zero2 else 16)
        gib = 2 ** 30
        batch = 1
        while state + 2 * batch * act * SLACK <= args.budget_gib * gib:
            batch *= 2
        rows.append({"recipe": recipe, "preset": model["preset"], "trained_params_m": round(params / 1e6, 1),
                     "state_gib": round(state / gib, 2), "activations_mib_per_image": round(act / 2 ** 20, 1),
                     "batch_per_gpu": batch, "estimate_gib": round((state + batch * act * SLACK) / gib, 1),
                     "recipe_batch_per_gpu": cfg.get("data", {}).get("batch_size"), "zero2": zero2})
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(REPO / args.out, {"bench": "memory_estimate", "budget_gib": args.budget_gib, "slack": SLACK,
                                        "rows": rows, "command": " ".join(sys.argv)})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
