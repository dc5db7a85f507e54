"""MAE: masking, loss against a plain reference computation, sin-cos embedding, official checkpoint loading."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from pretrain.mae import MaskedAutoencoderViT, get_arch, load_mae_checkpoint, sincos_pos_embed
from runtime.checkpoint import CheckpointError

ARCH = get_arch("tiny")  # 32 px, patch 8 -> 16 patches, width 64, 2 blocks; decoder 32 wide, 1 block


def reference_loss(model, imgs, noise, mask_ratio, norm_pix):
    """Written from the paper, independently of the module: patchify, keep the lowest-noise patches, masked MSE."""
    n, c, h, w = imgs.shape
    p = ARCH.patch_size
    patches = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
    keep = int(patches.shape[1] * (1 - mask_ratio))
    mask = torch.ones(n, patches.shape[1])
    for i in range(n):
        mask[i, noise[i].argsort()[:keep]] = 0
    _, pred, _ = model(imgs, mask_ratio, noise)
    target = patches
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), mask


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.9])
def test_loss_matches_reference(norm_pix, mask_ratio):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(ARCH, norm_pix_loss=norm_pix)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    loss, _, mask = model(imgs, mask_ratio, noise)
    expected, expected_mask = reference_loss(model, imgs, noise, mask_ratio, norm_pix)
    assert torch.equal(mask, expected_mask)
    assert (mask == 0).sum(1).tolist() == [int(16 * (1 - mask_ratio))] * 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_masking_keeps_the_lowest_noise_and_restores_order():
    x = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2], [0.0, 1.0, 0.2, 0.8, 0.6, 0.4]])
    kept, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, 0.5, noise)
    assert kept[..., 0].tolist() == [[1, 5, 3], [6, 8, 11]]
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0]]
    shuffled = torch.gather(x, 1, noise.argsort(1).unsqueeze(-1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1)), x)


def test_decoder_drops_cls_and_patchify_roundtrip():
    torch.manual_seed(1)
    model = MaskedAutoencoderViT(ARCH)
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, torch.rand(2, 16))
    assert latent.shape == (2, 1 + 4, 64)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 8 * 8 * 3)  # one prediction per patch, the CLS slot dropped


def test_sincos_matches_mae_numpy_formula():
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(4.0), np.arange(4.0)), 0)
    ref = np.concatenate([np.zeros((1, 64)), np.concatenate([one_d(32, grid[0]), one_d(32, grid[1])], 1)])
    assert np.abs(sincos_pos_embed(64, 4).numpy() - ref).max() < 1e-6


def official_state_dict(arch, with_decoder):
    """A state dict in the official release's layout, written out key by key (not from our module)."""
    d, L = arch.embed_dim, (arch.img_size // arch.patch_size) ** 2
    sd = OrderedDict(cls_token=torch.randn(1, 1, d), pos_embed=torch.randn(1, L + 1, d))
    sd["patch_embed.proj.weight"] = torch.randn(d, 3, arch.patch_size, arch.patch_size)
    sd["patch_embed.proj.bias"] = torch.randn(d)

    def block(prefix, width):
        hidden = int(width * arch.mlp_ratio)
        shapes = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.qkv.weight": (3 * width, width),
                  "attn.qkv.bias": (3 * width,), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
                  "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (hidden, width),
                  "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (width, hidden), "mlp.fc2.bias": (width,)}
        for k, shape in shapes.items():
            sd[f"{prefix}.{k}"] = torch.randn(shape)
    for i in range(arch.depth):
        block(f"blocks.{i}", d)
    sd["norm.weight"], sd["norm.bias"] = torch.randn(d), torch.randn(d)
    if with_decoder:
        dd = arch.decoder_embed_dim
        sd["mask_token"], sd["decoder_pos_embed"] = torch.randn(1, 1, dd), torch.randn(1, L + 1, dd)
        sd["decoder_embed.weight"], sd["decoder_embed.bias"] = torch.randn(dd, d), torch.randn(dd)
        for i in range(arch.decoder_depth):
            block(f"decoder_blocks.{i}", dd)
        sd["decoder_norm.weight"], sd["decoder_norm.bias"] = torch.randn(dd), torch.randn(dd)
        sd["decoder_pred.weight"] = torch.randn(arch.patch_size ** 2 * 3, dd)
        sd["decoder_pred.bias"] = torch.randn(arch.patch_size ** 2 * 3)
    return sd


def test_official_checkpoints_load_strictly(tmp_path):
    model = MaskedAutoencoderViT(ARCH)
    full = official_state_dict(ARCH, with_decoder=True)
    torch.save({"model": full}, tmp_path / "mae_visualize_vit_tiny.pth")
    assert load_mae_checkpoint(model, tmp_path / "mae_visualize_vit_tiny.pth") == "encoder+decoder"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in full.items())
    encoder = official_state_dict(ARCH, with_decoder=False)
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_tiny.pth")
    fresh = MaskedAutoencoderViT(ARCH)
    assert load_mae_checkpoint(fresh, tmp_path / "mae_pretrain_vit_tiny.pth") == "encoder"
    assert torch.equal(fresh.blocks[1].mlp.fc2.weight, encoder["blocks.1.mlp.fc2.weight"])


def test_mismatched_checkpoint_reports_exact_keys(tmp_path):
    bad = official_state_dict(ARCH, with_decoder=False)
    del bad["blocks.1.norm2.bias"]
    bad["fc_norm.weight"] = torch.randn(64)  # a fine-tuned checkpoint's head norm
    with pytest.raises(CheckpointError) as e:
        load_mae_checkpoint(MaskedAutoencoderViT(ARCH), {"model": bad})
    assert "missing keys ['blocks.1.norm2.bias']" in str(e.value)
    assert "unexpected keys ['fc_norm.weight']" in str(e.value)
    with pytest.raises(CheckpointError, match="MAE checkpoint not found"):
        load_mae_checkpoint(MaskedAutoencoderViT(ARCH), tmp_path / "none.pth")


def test_presets():
    assert get_arch("vit_l16").embed_dim == 1024 and get_arch("vit_l16").depth == 24
    assert get_arch("vit_h14").patch_size == 14 and get_arch("vit_b16", img_size=128).img_size == 128
    assert get_arch("tiny_p4").img_size // get_arch("tiny_p4").patch_size == 7  # 49 tokens at 28 px
    with pytest.raises(ValueError, match="unknown model preset 'vit_x'; choose one of tiny, tiny_p4, vit_b16"):
        get_arch("vit_x")


def test_reconstruction_grid_keeps_visible_patches_and_runs_in_bf16():
    from pretrain.visualize import reconstruction_grid
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(ARCH)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    grid = reconstruction_grid(model, imgs, noise, 0.75)
    assert grid.shape == (3, 2 * 33 + 1, 3 * 33 + 1)
    original, pasted = grid[:, 1:33, 1:33], grid[:, 1:33, 67:99]  # first row: columns 1 and 3
    keep = noise[0].argsort()[:4]  # the visible patches of sample 0, pasted back unchanged
    for k in keep.tolist():
        r, c = divmod(k, 4)
        patch = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
        assert torch.allclose(pasted[patch], original[patch], atol=1e-6)
    assert reconstruction_grid(model.to(torch.bfloat16), imgs, noise, 0.75).shape == grid.shape
