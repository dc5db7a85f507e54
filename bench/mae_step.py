"""Step throughput against the plain MAE recipe: a reference MAE step written from the paper vs our MAE-only step
vs our full step (both branches + fusion + distillation) with a cached and with a live teacher.

    python bench/mae_step.py [--presets tiny vit_b16] [--repeats 3] [--out bench/results/mae_step.json]

Same batch, same threads, one process; the variants run in alternation (A B C D A B C D ...) and the median step
time of each is reported, so the ratios hold on a noisy machine. Steps are forward + backward + AdamW.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.config import LossConfig, ModelConfig, TeacherConfig  # noqa: E402
from pretrain.mae import MaskedAutoencoderViT, get_arch  # noqa: E402
from pretrain.model import UniEmoXPretrainer  # noqa: E402
from pretrain.teacher import CLIPTeacher  # noqa: E402

SETTINGS = {"tiny": ("configs/teacher/tiny-clip.json", 32), "vit_b16": ("ViT-B-16", 8), "vit_l16": ("ViT-B-16", 4)}


class ReferenceMAE(nn.Module):
    """MAE as the paper describes it, independently of pretrain/mae.py: patchify, shuffle by argsort of noise,
    encode the visible patches, decode with mask tokens, MSE on the masked patches (fixed position embeddings
    are zeros here: their values do not change the cost)."""

    def __init__(self, arch, mask_ratio):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.p, self.mask_ratio = arch.patch_size, mask_ratio
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, arch.embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, arch.embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(arch.embed_dim, arch.num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(arch.depth)])
        self.norm = norm(arch.embed_dim)
        self.decoder_embed = nn.Linear(arch.embed_dim, arch.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, arch.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, arch.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(arch.decoder_embed_dim, arch.decoder_num_heads, 4.0,
                                                   qkv_bias=True, norm_layer=norm)
                                             for _ in range(arch.decoder_depth)])
        self.decoder_norm = norm(arch.decoder_embed_dim)
        self.decoder_pred = nn.Linear(arch.decoder_embed_dim, arch.patch_size ** 2 * 3)

    def forward(self, imgs):
        b, p = imgs.shape[0], self.p
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, d = x.shape[1], x.shape[2]
        keep = int(n * (1 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(b, n), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        dd = x.shape[2]
        y = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], 1)
        y = torch.gather(y, 1, restore[:, :, None].expand(-1, -1, dd))
        x = torch.cat([x[:, :1], y], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        h = imgs.shape[2] // p
        target = imgs.reshape(b, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * h, p * p * 3)
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def make_step(model, loss_fn):
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))

    def step():
        loss = loss_fn()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--out", default="bench/results/mae_step.json")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        teacher_arch, batch = SETTINGS[preset]
        arch = get_arch(preset)
        torch.manual_seed(0)
        imgs = torch.randn(batch, 3, arch.img_size, arch.img_size)
        person = torch.randn_like(imgs)
        teacher = CLIPTeacher(str(REPO / teacher_arch) if teacher_arch.endswith(".json") else teacher_arch, "random")
        tokens = teacher.tokenize(["The overall emotion conveyed is awe."] * batch)
        clip_image = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1)
        clip_text = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1)
        model_cfg = ModelConfig(preset=preset, mask_ratio=args.mask_ratio)
        ours_mae = MaskedAutoencoderViT(arch)
        full_cached = UniEmoXPretrainer(model_cfg, LossConfig(), TeacherConfig(checkpoint="random", arch=teacher.arch,
                                                                               cached=True))
        full_live = UniEmoXPretrainer(model_cfg, LossConfig(), TeacherConfig(checkpoint="random", arch=teacher.arch),
                                      teacher)
        reference = ReferenceMAE(arch, args.mask_ratio)
        variants = {
            "reference_mae": make_step(reference, lambda: reference(imgs)),
            "ours_mae_only": make_step(ours_mae, lambda: ours_mae(imgs, args.mask_ratio)[0]),
            "ours_full_cached": make_step(full_cached, lambda: full_cached(
                {"image": imgs, "person": person, "clip_image": clip_image, "clip_text": clip_text}).loss),
            "ours_full_live": make_step(full_live, lambda: full_live(
                {"image": imgs, "person": person, "text": tokens}).loss),
        }
        times = {k: [] for k in variants}
        for name, step in variants.items():
            step()  # warm-up
        for _ in range(args.repeats):
            for name, step in variants.items():  # alternate, so drifts hit every variant alike
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        img_s = {k: batch / statistics.median(v) for k, v in times.items()}
        row = {"preset": preset, "batch": batch, "img_per_s": img_s,
               "ratios": {"ours_mae_only / reference": img_s["ours_mae_only"] / img_s["reference_mae"],
                          "full_cached / ours_mae_only": img_s["ours_full_cached"] / img_s["ours_mae_only"],
                          "full_cached / full_live": img_s["ours_full_cached"] / img_s["ours_full_live"]}}
        rows.append(row)
        print(f"{preset}: " + ", ".join(f"{k} {v:.2f} img/s" for k, v in img_s.items()) + " | "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()), flush=True)
    result = {"bench": "mae_step", "threads": torch.get_num_threads(), "mask_ratio": args.mask_ratio,
              "repeats": args.repeats, "python": platform.python_version(), "torch": torch.__version__,
              "rows": rows, "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
