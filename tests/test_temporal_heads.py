"""Heads over frames: padded frames change neither the loss nor a head's outputs on real frames; stitched windows
of a per-frame model equal one pass; the transformer's outputs see their context, the per-frame head's do not."""
import numpy as np
import pytest
import torch

from finetune.metrics import ccc
from finetune.temporal import (MeanPoolHead, PerFrameHead, TemporalTransformerHead, stitch, va_loss,
                               window_starts)


def test_padded_frames_change_neither_the_loss_nor_the_outputs():
    torch.manual_seed(0)
    feats, target = torch.randn(2, 10, 16), torch.rand(2, 10, 2) * 2 - 1
    mask = torch.ones(2, 10, dtype=torch.bool)
    padded_feats = torch.cat([feats, 50 * torch.randn(2, 6, 16)], 1)
    padded_target = torch.cat([target, 9 * torch.ones(2, 6, 2)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.bool)], 1)
    for head in (PerFrameHead(16), MeanPoolHead(16), TemporalTransformerHead(16, width=32, heads=4).eval()):
        with torch.no_grad():
            plain, padded = head(feats, mask), head(padded_feats, padded_mask)[:, :10]
        assert torch.allclose(plain, padded, atol=1e-5), type(head).__name__
        pred = head(feats, mask).detach()
        padded_pred = torch.cat([pred, -7 * torch.ones(2, 6, 2)], 1)
        assert va_loss(padded_pred, padded_target, padded_mask).item() == pytest.approx(
            va_loss(pred, target, mask).item(), abs=1e-6)


def test_the_loss_is_mse_plus_one_minus_the_pooled_ccc_in_fp32():
    torch.manual_seed(1)
    pred, target, mask = torch.randn(3, 8, 2), torch.randn(3, 8, 2), torch.rand(3, 8) > 0.3
    p, t = pred[mask].numpy(), target[mask].numpy()
    expected = ((p - t) ** 2).mean() + 1 - np.mean([ccc(p[:, i], t[:, i]) for i in range(2)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = va_loss(pred.bfloat16(), target, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=2e-2)  # inputs rounded to bf16, arithmetic in fp32
    assert va_loss(pred, target, mask).item() == pytest.approx(expected, abs=1e-5)


def test_stitched_windows_of_a_per_frame_model_equal_one_pass_and_cover_every_frame():
    torch.manual_seed(2)
    head, feats = PerFrameHead(8), torch.randn(23, 8)
    assert window_starts(23, 8, 3) == [0, 3, 6, 9, 12, 15] and window_starts(5, 8, 3) == [0]
    with torch.no_grad():
        whole = head(feats.unsqueeze(0), torch.ones(1, 23, dtype=torch.bool))[0]
    assert torch.allclose(stitch(head, feats, size=8, stride=3), whole, atol=1e-6)


def test_the_transformer_sees_context_and_the_per_frame_head_does_not():
    torch.manual_seed(3)
    feats, mask = torch.randn(1, 12, 16), torch.ones(1, 12, dtype=torch.bool)
    changed = feats.clone()
    changed[0, 11] += 5  # only the last frame changes
    for head, sees in ((PerFrameHead(16), False), (TemporalTransformerHead(16, width=32).eval(), True)):
        with torch.no_grad():
            moved = (head(changed, mask)[0, :11] - head(feats, mask)[0, :11]).abs().max().item()
        assert (moved > 1e-4) == sees, type(head).__name__
