"""Stage 1's contrastive terms equal a loop reference, the V/A weights act, the anchor's own clip is never a negative,
and the queue wraps and comes back bit-exactly from a checkpoint."""
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.temporal_contrastive import (EmbeddingQueue, clip_ids, global_infonce, local_infonce, smoothness,
                                           va_weight)
from runtime.checkpoint import CheckpointStore, load_checkpoint


def batch(seed=0, b=3, t=5, d=8):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, t, d, generator=g), dim=-1)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 3:] = False  # a short window, padded
    valid = mask.clone()
    valid[0, 1] = False  # a frame without annotation
    va = torch.rand(b, t, 2, generator=g) * 2 - 1
    ids = torch.tensor([11, 22, 11])  # windows 0 and 2 are of one clip
    return z, mask, va, valid, ids


def local_reference(z, mask, va, valid, ids, qz, qids, tau, sigma):
    b, t, _ = z.shape
    total, weights = 0.0, 0.0
    for i in range(b):
        for s in range(t - 1):
            if not (mask[i, s] and mask[i, s + 1]):
                continue
            w = math.exp(-float(((va[i, s] - va[i, s + 1]) ** 2).sum()) / (2 * sigma ** 2)) \
                if valid[i, s] and valid[i, s + 1] else 1.0
            a = z[i, s]
            negs = [float(a @ z[j, u]) for j in range(b) for u in range(t) if mask[j, u] and ids[j] != ids[i]]
            negs += [float(a @ q) for q, qi in zip(qz, qids) if qi >= 0 and qi != ids[i]]
            pos = float(a @ z[i, s + 1])
            logits = torch.tensor([pos] + negs) / tau
            total += w * -float(torch.log_softmax(logits, 0)[0])
            weights += w
    return total / weights


def global_reference(z, mask, va, valid, ids, tau, sigma):
    b, t, _ = z.shape
    g = [F.normalize(z[i][mask[i]].mean(0), dim=0) for i in range(b)]
    va_mean = [va[i][valid[i]].mean(0) for i in range(b)]
    total, weights = 0.0, 0.0
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            w = math.exp(-float(((va[i, s] - va_mean[i]) ** 2).sum()) / (2 * sigma ** 2)) if valid[i, s] else 1.0
            cands = [j for j in range(b) if j == i or ids[j] != ids[i]]
            logits = torch.tensor([float(z[i, s] @ g[j]) for j in cands]) / tau
            total += w * -float(torch.log_softmax(logits, 0)[cands.index(i)])
            weights += w
    return total / weights


@pytest.mark.parametrize("seed", [0, 1])
def test_the_terms_equal_a_loop_reference(seed):
    z, mask, va, valid, ids = batch(seed)
    qz = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(9)), dim=-1)
    qids = torch.tensor([11, 33, -1, 22, 44, 11])  # the anchor's clip, others, and a padded slot
    got = local_infonce(z, mask, va, valid, ids, qz, qids, 0.1, 0.5)
    assert got.item() == pytest.approx(local_reference(z, mask, va, valid, ids, qz, qids, 0.1, 0.5), rel=1e-5)
    got = global_infonce(z, mask, va, valid, ids, 0.2, 0.5)
    assert got.item() == pytest.approx(global_reference(z, mask, va, valid, ids, 0.2, 0.5), rel=1e-5)
    pairs = [(i, s) for i in range(3) for s in range(4) if mask[i, s] and mask[i, s + 1]]
    expected = sum(float(((z[i, s + 1] - z[i, s]) ** 2).sum()) for i, s in pairs) / len(pairs)
    assert smoothness(z, mask).item() == pytest.approx(expected, rel=1e-5)


def test_va_similarity_weights_the_positives_and_the_own_clip_is_never_a_negative():
    z, mask, va, valid, ids = batch(0)
    empty_z, empty_ids = torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64)
    base = local_infonce(z, mask, va, valid, ids, empty_z, empty_ids, 0.1, 0.5)
    moved = va.clone()
    moved[1, 2] += 0.8  # one frame's valence/arousal changes: the pairs it is in weigh less
    assert local_infonce(z, mask, moved, valid, ids, empty_z, empty_ids, 0.1, 0.5).item() != pytest.approx(
        base.item(), rel=1e-4)
    assert va_weight(torch.zeros(2), torch.zeros(2), 0.5).item() == 1.0
    assert va_weight(torch.zeros(2), torch.ones(2), 0.5).item() == pytest.approx(math.exp(-2 / 0.5))
    # windows 0 and 2 are one clip: its frames are never negatives of each other, nor are its queue entries
    pick, same = [0, 2], torch.tensor([11, 11])
    qz = F.normalize(torch.randn(4, 8), dim=-1)
    alone = local_infonce(z[pick], mask[pick], va[pick], valid[pick], same, empty_z, empty_ids, 0.1, 0.5)
    assert alone.item() == pytest.approx(0.0, abs=1e-6)  # the positive is the only candidate left
    with_own = local_infonce(z[pick], mask[pick], va[pick], valid[pick], same, qz, torch.full((4,), 11), 0.1, 0.5)
    assert with_own.item() == pytest.approx(0.0, abs=1e-6)
    other = local_infonce(z[pick], mask[pick], va[pick], valid[pick], same, qz[:1], torch.tensor([33]), 0.1, 0.5)
    assert other.item() > 0.01


def test_the_queue_wraps_and_restores_bit_exactly(tmp_path):
    q = EmbeddingQueue(5, 3)
    for step in range(3):
        q.push(torch.full((2, 3), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    feats, ids = q.contents()
    assert q.filled == 5 and q.ptr == 1
    assert ids.tolist() == [21, 1, 10, 11, 20]  # slot 0 overwritten by step 2's second row
    assert feats[0].tolist() == [2.0] * 3 and feats[1].tolist() == [0.0] * 3
    CheckpointStore(tmp_path / "ck").save(3, {"step": 3, "states": {"queue": q.state_dict()}})
    restored = EmbeddingQueue(5, 3)
    restored.load_state_dict(load_checkpoint(tmp_path / "ck")["states"]["queue"])
    assert torch.equal(restored.feats, q.feats) and torch.equal(restored.ids, q.ids)
    assert (restored.ptr, restored.filled) == (q.ptr, q.filled)
    with pytest.raises(ValueError, match="queue holds"):
        EmbeddingQueue(4, 3).load_state_dict(q.state_dict())
    assert clip_ids(["a", "b", "a"], torch.device("cpu")).tolist()[0] == clip_ids(["a"], torch.device("cpu")).item()
    assert (clip_ids(["a", "b"], torch.device("cpu")) >= 0).all()
