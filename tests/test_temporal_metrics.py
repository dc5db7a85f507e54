"""Valence/arousal over time: CCC against an independent closed form and hand cases, pooled vs per-clip where they
disagree, PCC/RMSE/SAGR, the reference predictors, masks and intervals."""
import numpy as np
import pytest
import torch

from finetune.losses import ccc_loss
from finetune.metrics import ccc
from finetune.temporal_metrics import Clip, clip_mean_oracle, pcc, temporal_metrics, train_mean_predictor


def ccc_via_mse(x, y):
    """Lin's CCC in its other closed form: 1 - E[(x - y)^2] / (var x + var y + (mean x - mean y)^2)."""
    return 1 - ((x - y) ** 2).mean() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def test_ccc_equals_its_closed_form_and_hand_cases():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=50), rng.normal(size=50) * 0.5 + 0.2
        assert ccc(x, y) == pytest.approx(ccc_via_mse(x, y), abs=1e-9)
    t = np.array([1.0, 2.0, 3.0, 4.0])
    assert ccc(t, t) == pytest.approx(1.0, abs=1e-9)
    assert ccc(-t + 5, t) == pytest.approx(-1.0, abs=1e-9)  # mirrored about the common mean
    assert ccc(np.full(4, 2.5), t) == 0.0
    # by hand: p = [1, 2, 3], y = [2, 3, 4]: cov 2/3, var 2/3 each, mean gap 1 -> 2(2/3) / (4/3 + 1) = 4/7
    assert ccc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(4 / 7)
    assert pcc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(1.0)  # a bias lowers CCC, not PCC


def test_the_loss_is_one_minus_the_metric_and_stays_fp32_under_bf16():
    p, t = torch.randn(64, 2), torch.randn(64, 2)
    metric = np.mean([ccc(p[:, i].numpy(), t[:, i].numpy()) for i in range(2)])
    assert ccc_loss(p, t).item() == pytest.approx(1 - metric, abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ccc_loss(p.float(), t.float()).dtype == torch.float32


def level_clips():
    """Clips at different levels whose values move a little inside each clip (AFEW-VA's shape)."""
    rng = np.random.default_rng(1)
    clips = []
    for level in (-0.6, -0.2, 0.3, 0.7):
        true = level + 0.05 * rng.normal(size=(40, 2))
        clips.append(Clip(np.zeros_like(true), true))
    return clips


def test_pooled_and_per_clip_disagree_for_the_clip_mean_oracle():
    clips = level_clips()
    oracle = temporal_metrics(clip_mean_oracle(clips), bootstrap=0)
    assert oracle["ccc"] > 0.95  # the level alone explains nearly all of the pooled variance
    assert oracle["ccc_per_clip"] == 0.0  # and nothing of any clip's course
    constant = temporal_metrics(train_mean_predictor(clips, [0.05, 0.05]), bootstrap=0)
    assert constant["ccc"] == pytest.approx(0.0, abs=1e-12) and constant["valence"]["pcc"] is None
    valence = np.concatenate([c.true[:, 0] for c in clips])
    assert constant["valence"]["rmse"] == pytest.approx(np.sqrt(((valence - 0.05) ** 2).mean()))
    assert constant["valence"]["sagr"] == pytest.approx((valence > 0).mean())
    perfect = temporal_metrics([Clip(c.true, c.true) for c in clips], bootstrap=200)
    assert perfect["ccc"] == pytest.approx(1.0) and perfect["ccc_per_clip"] == pytest.approx(1.0)
    assert perfect["valence"]["sagr"] == 1.0 and perfect["valence"]["rmse"] == 0.0
    lo, hi = perfect["valence"]["ccc_ci95"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_masked_frames_change_nothing_and_constant_clips_are_counted():
    rng = np.random.default_rng(2)
    true, pred = rng.normal(size=(30, 2)), rng.normal(size=(30, 2))
    base = temporal_metrics([Clip(pred, true)], bootstrap=0)
    junk_p, junk_t = np.vstack([pred, 99 * np.ones((5, 2))]), np.vstack([true, -99 * np.ones((5, 2))])
    masked = temporal_metrics([Clip(junk_p, junk_t, np.r_[np.ones(30), np.zeros(5)])], bootstrap=0)
    assert masked["valence"] == base["valence"] and masked["frames"] == 30
    flat = Clip(rng.normal(size=(10, 2)), np.zeros((10, 2)))
    both = temporal_metrics([Clip(pred, true), flat], bootstrap=0)
    assert both["valence"]["clips_constant_target"] == 1
    assert both["valence"]["ccc_per_clip"] == pytest.approx(base["valence"]["ccc_per_clip"])
    assert not np.isnan(temporal_metrics([flat], bootstrap=0)["valence"]["ccc"])


def test_bootstrap_intervals_hold_the_estimate_and_are_seeded():
    rng = np.random.default_rng(3)
    clips = []
    for _ in range(12):
        true = rng.normal(size=(25, 2))
        clips.append(Clip(true + rng.normal(size=(25, 2)), true))
    a = temporal_metrics(clips, bootstrap=300, seed=5)
    b = temporal_metrics(clips, bootstrap=300, seed=5)
    assert a == b
    lo, hi = a["arousal"]["ccc_ci95"]
    assert lo < a["arousal"]["ccc"] < hi and hi - lo > 0.01
