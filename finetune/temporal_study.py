"""`python -m finetune.temporal_study`: does the temporal machinery learn temporal structure? Not an emotion
benchmark. Clips are built from real labelled images (scikit-learn's 8x8 digits, split into train/val/test before
any clip is made): each frame shows two digits side by side whose classes follow slow bounded random walks;
valence is read from the left class, arousal from the right one, both on [-1, 1]; a quarter of the frames are
drowned in noise, so a frame alone is often unreadable and its neighbours are the way to it. The encoder is a small
ViT pretrained without labels on the training frames (masked-patch reconstruction); heads on its frozen features,
LoRA on its Q/V, and LoRA after the contrastive stage 1 are scored with finetune.temporal_metrics beside the
reference rows."""
import argparse
import json
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from finetune.lora import apply_lora
from finetune.temporal import MeanPoolHead, PerFrameHead, TemporalTransformerHead, stitch, va_loss
from finetune.temporal_contrastive import (EmbeddingQueue, FrameProjector, global_infonce, local_infonce,
                                           smoothness)
from finetune.temporal_metrics import Clip, clip_mean_oracle, temporal_metrics, train_mean_predictor
from finetune.temporal_model import ClipModel


def digit_pools(seed: int) -> Dict[str, Dict[int, np.ndarray]]:
    """Each split's images by class: no image is in two splits."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    cut = {"train": order[:1000], "val": order[1000:1400], "test": order[1400:]}
    return {s: {c: digits.images[idx[digits.target[idx] == c]] / 16.0 for c in range(10)} for s, idx in cut.items()}


def walk(rng: np.random.Generator, frames: int, p_move: float = 0.15) -> np.ndarray:
    """A class index 0..9 moving by one step now and then, bounded at the ends."""
    c = [int(rng.integers(0, 10))]
    for _ in range(frames - 1):
        step = rng.choice([-1, 0, 1], p=[p_move, 1 - 2 * p_move, p_move])
        c.append(int(np.clip(c[-1] + step, 0, 9)))
    return np.array(c)


def make_clips(pool: Dict[int, np.ndarray], n: int, frames: int, rng: np.random.Generator, noisy: float = 0.25):
    """(images (n, T, 8, 16), targets (n, T, 2)): valence from the left digit's class, arousal from the right's."""
    images, targets = np.zeros((n, frames, 8, 16), np.float32), np.zeros((n, frames, 2), np.float32)
    for i in range(n):
        left, right = walk(rng, frames), walk(rng, frames)
        for t in range(frames):
            a = pool[left[t]][rng.integers(len(pool[left[t]]))]
            b = pool[right[t]][rng.integers(len(pool[right[t]]))]
            img = np.concatenate([a, b], 1)
            if rng.random() < noisy:
                img = 0.2 * img + rng.normal(0, 1.0, img.shape)
            images[i, t] = img
        targets[i] = np.stack([(left - 4.5) / 4.5, (right - 4.5) / 4.5], 1)
    return images, targets


VIT = {"dim": 32, "depth": 2}


def tiny_vit(seed: int) -> VisionTransformer:
    """timm's ViT on the 8 x 16 frames: 4 x 4 patches (8 tokens), mean-pooled features."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=(8, 16), patch_size=4, in_chans=1, embed_dim=VIT["dim"], depth=VIT["depth"],
                             num_heads=4, num_classes=0, global_pool="avg", class_token=False)


def pretrain_vit(vit: VisionTransformer, frames: np.ndarray, steps: int, seed: int, batch: int = 256,
                 mask_ratio: float = 0.5) -> VisionTransformer:
    """Without labels: half the patches of each training frame blanked, all of its pixels reconstructed from the
    tokens by a linear decoder (the loss on the blanked patches, as MAE scores it)."""
    g = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(frames.astype(np.float32)).unsqueeze(1)
    decoder = torch.nn.Linear(vit.embed_dim, 16)
    optim = torch.optim.AdamW([*vit.parameters(), *decoder.parameters()], lr=2e-3, weight_decay=0.05)
    vit.train()
    for _ in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch,), generator=g)]
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(batch, 8, 16)  # (B, tokens, pixels)
        hidden = torch.rand(batch, 8, generator=g) < mask_ratio
        seen = (patches * ~hidden[..., None]).reshape(batch, 2, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(
            batch, 1, 8, 16)
        tokens = vit.forward_features(seen)
        loss = (((decoder(tokens) - patches) ** 2).mean(-1) * hidden).sum() / hidden.sum().clamp(min=1)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return vit.eval()


@torch.no_grad()
def frozen_features(vit: VisionTransformer, images: np.ndarray) -> np.ndarray:
    """(n, T, 8, 16) frames -> (n, T, dim) pooled features."""
    x = torch.from_numpy(images.reshape(-1, 1, 8, 16).astype(np.float32))
    return vit(x).reshape(*images.shape[:2], -1).numpy()


HEADS = {"per-frame linear head": lambda d: PerFrameHead(d), "mean-pool head": lambda d: MeanPoolHead(d),
         "temporal head": lambda d: TemporalTransformerHead(d, width=64, depth=2, heads=4, max_frames=64)}


def windows(g: np.random.Generator, inputs: np.ndarray, targets: np.ndarray, window: int, batch: int,
            shuffle: bool = False):
    """A batch of random windows (clip indices, inputs, targets); frames permuted within each window when
    `shuffle`."""
    n, t = inputs.shape[:2]
    clips, starts = g.integers(0, n, batch), g.integers(0, t - window + 1, batch)
    x = np.stack([inputs[c, s:s + window] for c, s in zip(clips, starts)])
    y = np.stack([targets[c, s:s + window] for c, s in zip(clips, starts)])
    if shuffle:
        perm = np.stack([g.permutation(window) for _ in range(batch)])
        x = np.take_along_axis(x, perm.reshape(*perm.shape, *([1] * (x.ndim - 2))), 1)
        y = np.take_along_axis(y, perm[..., None], 1)
    return torch.from_numpy(clips), torch.from_numpy(x), torch.from_numpy(y)


STAGE1_QUEUE = 512   # a 4,096-frame queue without a momentum encoder collapses the embeddings here (docs/temporal.md)
LORA_LR_SCALE = 8.0  # stage 2: adapters at 8x the head's rate (LoRA's usual setting: a higher rate for adapters)


def study_groups(model: torch.nn.Module, lr: float, adapter_scale: float) -> List[Dict]:
    """What trains: the adapters at `adapter_scale` times the rate of the rest."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapters = [p for n, p in trained if ".lora_" in n]
    rest = [p for n, p in trained if ".lora_" not in n]
    return [g for g in ({"params": rest, "lr": lr}, {"params": adapters, "lr": lr * adapter_scale}) if g["params"]]


def train_head(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, steps: int, seed: int,
               shuffle: bool = False, window: int = 16, batch: int = 32, lr: float = 2e-3) -> torch.nn.Module:
    """Stage 2: random windows of the training clips (features, or frames for a model with an encoder), AdamW on
    what requires grad, va_loss."""
    g = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(study_groups(model, lr, LORA_LR_SCALE), weight_decay=0.01)
    model.train()
    for _ in range(steps):
        _, x, y = windows(g, inputs, targets, window, batch, shuffle)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        loss = va_loss(model(x, mask), y, mask)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval()


def train_stage1(model: ClipModel, images: np.ndarray, targets: np.ndarray, steps: int, seed: int,
                 window: int = 16, batch: int = 32, lr: float = 2e-3, queue_size: int = 4096) -> ClipModel:
    """Stage 1: the encoder's adapters and the projector by the contrastive terms (adjacent frames, clip vs frames,
    V/A-weighted, a 4,096-frame queue of other clips, smoothness)."""
    g = np.random.default_rng(seed + 7)
    torch.manual_seed(seed)
    queue = EmbeddingQueue(queue_size, model.projector.net[-1].out_features)
    optim = torch.optim.AdamW(study_groups(model, lr, 1.0), weight_decay=0.01)  # 8x collapses stage 1 here
    model.train()
    for _ in range(steps):
        ids, x, y = windows(g, images, targets, window, batch)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        z = model(x, mask)
        queue_z, queue_ids = queue.contents()
        loss = (local_infonce(z, mask, y, mask, ids, queue_z, queue_ids, 0.1, 0.5)
                + global_infonce(z, mask, y, mask, ids, 0.1, 0.5) + 0.1 * smoothness(z, mask))
        optim.zero_grad()
        loss.backward()
        optim.step()
        queue.push(z.reshape(-1, z.shape[-1]), ids.repeat_interleave(window))
    return model.eval()


@torch.no_grad()
def predict_clips(model, inputs: np.ndarray, targets: np.ndarray, window: int = 16,
                  shuffle_seed: Optional[int] = None) -> List[Clip]:
    """Every test frame predicted once: overlapping windows of the training length (stride half of it) stitched;
    with `shuffle_seed`, each clip's frames (and their targets) permuted first."""
    out = []
    g = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    for x, y in zip(inputs, targets):
        if g is not None:
            perm = g.permutation(len(x))
            x, y = x[perm], y[perm]
        out.append(Clip(stitch(model, torch.from_numpy(np.ascontiguousarray(x)), window, max(1, window // 2)).numpy(),
                        y))
    return out


def lora_model(vit: VisionTransformer, seed: int, projector: bool = False) -> ClipModel:
    """The pretrained ViT (a copy) with LoRA rank 8 on the Q/V of every block, and a temporal head."""
    import copy
    encoder = copy.deepcopy(vit)
    torch.manual_seed(seed)
    apply_lora(encoder, rank=8, alpha=16)
    proj = FrameProjector(encoder.embed_dim, 32) if projector else None
    return ClipModel(encoder, None, proj)


def pca_encoder(train_frames: np.ndarray, dim: int):
    """A frozen encoder fitted without labels: the first `dim` principal directions of the training frames,
    whitened."""
    x = train_frames.reshape(len(train_frames), -1)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:dim].T / np.sqrt(np.var((x - mean) @ vt[:dim].T, 0) + 1e-6)
    return lambda frames: ((frames.reshape(*frames.shape[:-2], -1) - mean) @ basis).astype(np.float32)


def run_seed(seed: int, frames: int = 48, clips: Sequence[int] = (150, 60), steps: int = 250,
             bootstrap: int = 300, pretrain_steps: int = 300, stage1: bool = True) -> Dict[str, Dict]:
    pools = digit_pools(seed)
    rng = np.random.default_rng(seed + 1)
    # fixed recipes, nothing tuned on this data: the val images stay unused
    data = {s: make_clips(pools[s], n, frames, rng) for s, n in zip(("train", "test"), clips)}
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]

    def score(model, inputs, **kw):
        return temporal_metrics(predict_clips(model, inputs, test_y, **kw), bootstrap=bootstrap, seed=seed)
    # heads on a classical frozen encoder: what context and order are worth
    encode = pca_encoder(train_x.reshape(-1, 8, 16), dim=24)
    feats = {"train": encode(train_x), "test": encode(test_x)}
    rows = {}
    for name, make in HEADS.items():
        rows[f"PCA frozen + {name}"] = score(train_head(make(24), feats["train"], train_y, steps, seed), feats["test"])
    # the same transformer seeing one frame at a time: its capacity without the context
    alone = train_head(HEADS["temporal head"](24), feats["train"], train_y, steps, seed, window=1, batch=32 * 16)
    rows["PCA frozen + temporal head, one frame (no context)"] = score(alone, feats["test"], window=1)
    shuffled = train_head(HEADS["temporal head"](24), feats["train"], train_y, steps, seed, shuffle=True)
    rows["PCA frozen + temporal head, frames shuffled"] = score(shuffled, feats["test"], shuffle_seed=seed)
    # a ViT pretrained without labels: frozen, with LoRA on its Q/V, and LoRA after stage 1
    vit = pretrain_vit(tiny_vit(seed), train_x.reshape(-1, 8, 16), pretrain_steps, seed)
    for p in vit.parameters():
        p.requires_grad_(False)
    vit_feats = {"train": frozen_features(vit, train_x), "test": frozen_features(vit, test_x)}
    dim = vit_feats["train"].shape[-1]
    head = train_head(HEADS["temporal head"](dim), vit_feats["train"], train_y, steps, seed)
    rows["ViT frozen + temporal head"] = score(head, vit_feats["test"])
    frames_train, frames_test = train_x[:, :, None], test_x[:, :, None]  # one channel
    lora = lora_model(vit, seed)
    lora.head = HEADS["temporal head"](dim)
    rows["ViT LoRA + temporal head"] = score(train_head(lora, frames_train, train_y, steps, seed), frames_test)
    if stage1:
        staged = train_stage1(lora_model(vit, seed, projector=True), frames_train, train_y, steps, seed,
                              queue_size=STAGE1_QUEUE)
        staged.head = HEADS["temporal head"](staged.projector.net[-1].out_features)
        rows["ViT stage 1, then LoRA + temporal head"] = score(train_head(staged, frames_train, train_y, steps, seed),
                                                             frames_test)
    truth = [Clip(np.zeros_like(y), y) for y in test_y]
    rows["reference: train-mean constant"] = temporal_metrics(
        train_mean_predictor(truth, train_y.reshape(-1, 2).mean(0)), bootstrap=bootstrap, seed=seed)
    rows["reference: clip-mean oracle"] = temporal_metrics(clip_mean_oracle(truth), bootstrap=bootstrap, seed=seed)
    return rows


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "-"


def _mean_sd(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def table(results: Dict[int, Dict[str, Dict]]) -> str:
    """Mean ± sample sd over the seeds of the pooled and per-clip CCC (mean of V and A), with the first seed's
    clip-bootstrap 95 % intervals of each target."""
    seeds = sorted(results)
    lines = [f"| model | pooled CCC ({len(seeds)} seeds) | 95 % CI, seed {seeds[0]} | per-clip CCC | 95 % CI, seed "
             f"{seeds[0]} | valence RMSE |", "|---|---|---|---|---|---|"]
    for name in results[seeds[0]]:
        first = results[seeds[0]][name]
        pooled_ci = f"V {_ci(first['valence']['ccc_ci95'])} A {_ci(first['arousal']['ccc_ci95'])}"
        per_ci = f"V {_ci(first['valence']['ccc_per_clip_ci95'])} A {_ci(first['arousal']['ccc_per_clip_ci95'])}"
        lines.append(f"| {name} | {_mean_sd([results[s][name]['ccc'] for s in seeds])} | {pooled_ci} | "
                     f"{_mean_sd([results[s][name]['ccc_per_clip'] for s in seeds])} | {per_ci} | "
                     f"{np.mean([results[s][name]['valence']['rmse'] for s in seeds]):.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args(argv)
    start = time.time()
    torch.set_num_threads(2)
    results = {s: run_seed(s, steps=args.steps) for s in args.seeds}
    print(table(results))
    print(f"\n{time.time() - start:.0f} s")
    if args.json:
        from runtime.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps({str(k): v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
