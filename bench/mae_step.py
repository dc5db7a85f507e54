"""Step throughput and MFU against the plain MAE recipe: a reference MAE step written from the paper vs our MAE-only
step vs our full step (both branches + fusion + distillation) with a cached teacher (person crop at the scene's
size, and at --person-fraction of it: model.person_img_size), with a live teacher, and with a live teacher plus a
person detector run inline on every image (the reference code's way).

    python bench/mae_step.py [--presets tiny vit_b16 vit_l16] [--repeats 3] [--out bench/results/mae_step.json]

Ours runs with the trainers' optimizer (fused AdamW), the reference with torch's default AdamW as MAE's code does.
Same batch, same threads, one process; the variants run in alternation (A B C D E A B C D E ...) and the median
step time of each is reported, so the ratios hold on a noisy machine. Steps are forward + backward + AdamW.
MFU = FLOPs per step (torch.utils.flop_counter: 3x the forward of what trains, 1x the frozen teacher) / step time /
peak, the peak being the best fp32 TFLOP/s of a 2048^3 matmul measured in the same run (on a GPU: same, in the
run's dtype). The inline detector is ours (HOG people, Haar face fallback; OpenCV) on scikit-learn's two bundled
photos (640x427), each image detected, cropped at its box and resized to the model's input.
"""
import argparse
import gc
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_tools.detect import detect_person, make_detector  # noqa: E402
from pretrain.config import LossConfig, ModelConfig  # noqa: E402
from pretrain.mae import MaskedAutoencoderViT, get_arch  # noqa: E402
from pretrain.model import UniEmoXPretrainer  # noqa: E402
from data_tools.crops import person_region  # noqa: E402
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pretrain.teacher import CLIPTeacher  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402
from runtime.config import OptimConfig  # noqa: E402
from runtime.flops import measure_matmul_tflops, training_step_flops  # noqa: E402
from runtime.optim import adamw  # noqa: E402

# preset -> (teacher, batch, at most this many timed repeats, variants); ViT-L runs the three without a live
# teacher: five ViT-L models with their AdamW state do not fit in 24 GB
SETTINGS = {"tiny": ("configs/teacher/tiny-clip.json", 32, 3, 6), "vit_b16": ("ViT-B-16", 8, 3, 6),
            "vit_l16": ("ViT-B-16", 4, 2, 4)}


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


VARIANTS = ["reference_mae", "ours_mae_only", "ours_full_cached", "ours_full_cached_small_person", "ours_full_live",
            "ours_full_live_inline_detector"]
RATIOS = [("ours_mae_only", "reference_mae"), ("ours_full_cached", "ours_mae_only"),
          ("ours_full_cached_small_person", "ours_mae_only"),
          ("ours_full_cached", "ours_full_live"), ("ours_full_cached", "ours_full_live_inline_detector")]


def make_step(model, loss_fn, ours: bool, before=None):
    """forward + backward + AdamW; ours with the trainers' optimizer (runtime.optim: fused), the reference with
    torch's default AdamW, as MAE's code builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = adamw(params, OptimConfig(lr=1e-4)) if ours else torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))

    def step():
        extra = before() if before else {}
        loss = loss_fn(**extra)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    return step


def person_side(arch, fraction: float) -> int:
    """The reduced person branch's input side: that fraction of the scene's, rounded to whole patches (>= 1)."""
    return max(1, round(arch.img_size * fraction / arch.patch_size)) * arch.patch_size


def inline_person_crops(batch: int, size: int):
    """What a step that detects people inline does before its model step: detect, crop at the box, resize
    (RandomResizedCrop bicubic + flip, ImageNet mean/std, as torchvision composes it)."""
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    detector = make_detector("hog+face")
    view = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def crops():
        views = []
        for i in range(batch):
            photo = photos[i % len(photos)]
            box, _, _ = detect_person(detector, photo)
            region = person_region(photo.size, box)
            views.append(view(photo if region is None else photo.crop(region)))
        return {"person": torch.stack(views)}
    return crops


def bench_preset(preset: str, args, peak: float) -> dict:
    teacher_arch, batch, max_repeats, n_variants = SETTINGS[preset]
    repeats = min(args.repeats, max_repeats)
    arch = get_arch(preset)
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, arch.img_size, arch.img_size)
    person = torch.randn_like(imgs)
    small_side = person_side(arch, args.person_fraction)
    small_person = torch.randn(batch, 3, small_side, small_side)
    teacher = CLIPTeacher(str(REPO / teacher_arch) if teacher_arch.endswith(".json") else teacher_arch, "random")
    tokens = teacher.tokenize(["The overall emotion conveyed is awe."] * batch)
    clip_image = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1)
    clip_text = torch.nn.functional.normalize(torch.randn(batch, teacher.embed_dim), dim=-1)
    model_cfg = ModelConfig(preset=preset, mask_ratio=args.mask_ratio)
    small_cfg = ModelConfig(preset=preset, mask_ratio=args.mask_ratio, person_img_size=small_side)
    want = set(VARIANTS[:n_variants])  # the inline-detector variant comes with (and reuses) the live one
    builders = {
        "reference_mae": lambda: ReferenceMAE(arch, args.mask_ratio),
        "ours_mae_only": lambda: MaskedAutoencoderViT(arch),
        "ours_full_cached": lambda: UniEmoXPretrainer(model_cfg, LossConfig(), teacher.embed_dim),
        "ours_full_cached_small_person": lambda: UniEmoXPretrainer(small_cfg, LossConfig(), teacher.embed_dim),
        "ours_full_live": lambda: UniEmoXPretrainer(model_cfg, LossConfig(), teacher.embed_dim),
    }
    models = {k: build() for k, build in builders.items() if k in want}
    cached_batch = {"image": imgs, "person": person, "clip_image": clip_image, "clip_text": clip_text}
    live_batch = {"image": imgs, "person": person, "text": tokens}

    def taught(batch):  # a live teacher's step: its embeddings of the batch first, then the student
        return {**batch, "clip_image": teacher.encode_image(batch["image"]),
                "clip_text": teacher.encode_text(batch["text"])}
    forwards = {  # name -> (trained forward, frozen forward or None)
        "reference_mae": (lambda: models["reference_mae"](imgs), None),
        "ours_mae_only": (lambda: models["ours_mae_only"](imgs, args.mask_ratio)[0], None),
        "ours_full_cached": (lambda: models["ours_full_cached"](cached_batch).loss, None),
        "ours_full_cached_small_person": (
            lambda: models["ours_full_cached_small_person"]({**cached_batch, "person": small_person}).loss, None),
        "ours_full_live": (lambda: models["ours_full_live"](cached_batch).loss,  # the student, once taught
                           lambda: taught(live_batch)),
    }
    forwards = {k: v for k, v in forwards.items() if k in want}
    flops = {name: training_step_flops(fwd, frozen) for name, (fwd, frozen) in forwards.items()}
    losses = {name: fwd for name, (fwd, _) in forwards.items()}  # what each timed step runs
    if "ours_full_live" in losses:  # the teacher too, inside the timed step
        losses["ours_full_live"] = lambda: models["ours_full_live"](taught(live_batch)).loss
    variants = {name: make_step(models[name], loss, ours=name != "reference_mae") for name, loss in losses.items()}
    if "ours_full_live_inline_detector" in want:
        full_live = models["ours_full_live"]
        flops["ours_full_live_inline_detector"] = flops["ours_full_live"]  # the detector adds no matmuls
        variants["ours_full_live_inline_detector"] = make_step(
            full_live, lambda person: full_live(taught({**live_batch, "person": person})).loss, ours=True,
            before=inline_person_crops(batch, arch.img_size))
    times = {k: [] for k in variants}
    for name, step in variants.items():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in variants.items():  # alternate, so drifts hit every variant alike
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    step_s = {k: statistics.median(v) for k, v in times.items()}
    img_s = {k: batch / v for k, v in step_s.items()}
    mfu = {k: flops[k] / step_s[k] / (peak * 1e12) for k in variants}
    row = {"preset": preset, "batch": batch, "repeats": repeats, "small_person_img_size": small_side,
           "img_per_s": img_s,
           "gflops_per_step": {k: v / 1e9 for k, v in flops.items()}, "mfu": mfu,
           "ratios": {f"{a} / {b}": img_s[a] / img_s[b] for a, b in RATIOS if a in img_s and b in img_s}}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_b16", "vit_l16"], choices=SETTINGS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--person-fraction", type=float, default=0.5,
                        help="the small-person variant's person side as a fraction of the scene's (0.5: 112 for 224)")
    parser.add_argument("--out", default="bench/results/mae_step.json")
    args = parser.parse_args()
    peak = measure_matmul_tflops()
    print(f"measured peak: {peak * 1e3:.1f} GFLOP/s (fp32 matmul, {torch.get_num_threads()} threads)", flush=True)
    rows = []
    for preset in args.presets:
        row = bench_preset(preset, args, peak)  # each preset's models are freed before the next is built
        rows.append(row)
        speeds = [f"{k} {v:.2f} img/s (MFU {row['mfu'][k]:.1%})" for k, v in row["img_per_s"].items()]
        print(f"{preset}: " + ", ".join(speeds) + " | " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()),
              flush=True)
        write_result(args, peak, rows)  # after every preset: a larger one that runs out of memory loses nothing
        gc.collect()


def write_result(args, peak: float, rows: list) -> None:
    result = {"bench": "mae_step", "threads": torch.get_num_threads(), "mask_ratio": args.mask_ratio,
              "peak_tflops_measured": peak, "python": platform.python_version(), "torch": torch.__version__,
              "rows": rows, "command": " ".join(sys.argv)}
    atomic_write_json(args.out, result)
    print(f"-> {args.out}", flush=True)


if __name__ == "__main__":
    main()
