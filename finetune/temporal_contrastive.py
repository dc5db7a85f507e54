"""Stage 1 of the temporal job: contrastive terms over frame embeddings. Local-local InfoNCE between adjacent frames
(negatives: the batch's frames of other clips and a queue of past frames of other clips), global-local InfoNCE
between a clip's embedding and its frames, positives weighted by V/A similarity on the [-1, 1] scale, and a
smoothness penalty; the queue holds all-gathered, detached embeddings with their clips and is checkpointed."""
import hashlib
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime import distributed


def clip_ids(names: Sequence[str], device: torch.device) -> torch.Tensor:
    """A stable 63-bit id per clip name (the same on every rank and run), as one int64 tensor."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") >> 1  # >= 0
                         for n in names], dtype=torch.int64, device=device)


class FrameProjector(nn.Module):
    """Frame features -> hidden -> `dim`, L2-normalised: the space the contrastive terms compare in."""

    def __init__(self, features: int, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, features), nn.GELU(), nn.Linear(features, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


def va_weight(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """exp(-|a - b|^2 / (2 sigma^2)) over the last axis: 1 for equal valence/arousal, less the further apart."""
    return torch.exp(-((a - b) ** 2).sum(-1) / (2 * sigma ** 2))


class EmbeddingQueue:
    """A ring of the last `size` frame embeddings (detached, every rank's) and the ids of their clips; its state
    is saved into and restored from every checkpoint of the run (a part of JobParts.states)."""

    def __init__(self, size: int, dim: int, device: torch.device = torch.device("cpu")):
        self.size, self.ptr, self.filled = size, 0, 0  # host-side counters: reading them never waits for a GPU
        self.feats = torch.zeros(size, dim, device=device)
        self.ids = torch.zeros(size, dtype=torch.int64, device=device)

    def to(self, device: torch.device) -> "EmbeddingQueue":
        self.feats, self.ids = self.feats.to(device), self.ids.to(device)
        return self

    def contents(self):
        """(embeddings, clip ids) of the filled slots."""
        return self.feats[:self.filled], self.ids[:self.filled]

    @torch.no_grad()
    def push(self, feats: torch.Tensor, ids: torch.Tensor) -> None:
        """Add every rank's (feats, ids) (a collective under torch.distributed), the oldest overwritten."""
        if self.size == 0:
            return
        feats = distributed.all_gather_tensor(feats.detach().float().contiguous()).flatten(0, 1)
        ids = distributed.all_gather_tensor(ids.contiguous()).flatten(0, 1)
        feats, ids = feats[-self.size:], ids[-self.size:]
        slots = (self.ptr + torch.arange(len(ids), device=self.ids.device)) % self.size
        self.feats[slots] = feats.to(self.feats.device)
        self.ids[slots] = ids.to(self.ids.device)
        self.ptr = (self.ptr + len(ids)) % self.size
        self.filled = min(self.size, self.filled + len(ids))

    def state_dict(self) -> Dict[str, object]:
        return {"feats": self.feats.detach().cpu().clone(), "ids": self.ids.detach().cpu().clone(), "ptr": self.ptr,
                "filled": self.filled}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if tuple(state["feats"].shape) != tuple(self.feats.shape):
            raise ValueError(f"the checkpoint's queue holds {tuple(state['feats'].shape)} embeddings, this run's "
                             f"contrastive.queue / projector make {tuple(self.feats.shape)}")
        self.feats.copy_(state["feats"])
        self.ids.copy_(state["ids"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


def local_infonce(z: torch.Tensor, mask: torch.Tensor, va: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor,
                  queue_z: torch.Tensor, queue_ids: torch.Tensor, temperature: float, sigma: float) -> torch.Tensor:
    """Each frame t (anchor) against frame t + 1 of its window (positive); negatives are the batch's frames and the
    queue's entries of other clips only (never the anchor's own clip). Each anchor's -log softmax is weighted by
    the V/A similarity of the pair (1 where either frame is not annotated). z (B, T, d) normalised."""
    b, t, d = z.shape
    anchors, positives = z[:, :-1].reshape(-1, d), z[:, 1:].reshape(-1, d)
    pair = (mask[:, :-1] & mask[:, 1:]).reshape(-1)
    annotated = (valid[:, :-1] & valid[:, 1:]).reshape(-1)
    weight = torch.where(annotated, va_weight(va[:, :-1], va[:, 1:], sigma).reshape(-1), torch.ones_like(pair,
                                                                                                          dtype=z.dtype))
    weight = weight * pair
    anchor_ids = ids.repeat_interleave(t - 1)
    cand = torch.cat([z.reshape(-1, d), queue_z.to(z.dtype)])
    cand_ids = torch.cat([ids.repeat_interleave(t), queue_ids])
    cand_ok = torch.cat([mask.reshape(-1), queue_ids >= 0])  # the queue's padded frames carry the id -1
    negative = (cand_ids[None, :] != anchor_ids[:, None]) & cand_ok[None, :]
    logits = torch.cat([(anchors * positives).sum(-1, keepdim=True),
                        (anchors @ cand.T).masked_fill(~negative, float("-inf"))], 1) / temperature
    loss = -torch.log_softmax(logits.float(), 1)[:, 0]
    return (weight * loss).sum() / weight.sum().clamp(min=1e-8)


def global_infonce(z: torch.Tensor, mask: torch.Tensor, va: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor,
                   temperature: float, sigma: float) -> torch.Tensor:
    """Each real frame (anchor) against its window's embedding (the normalised mean of its frames, positive) and
    the other windows' embeddings of other clips (negatives); weighted by the V/A similarity of the frame to its
    window's mean (1 where not annotated)."""
    b, t, d = z.shape
    m = mask.to(z.dtype).unsqueeze(-1)
    g = F.normalize((z * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
    vm = valid.to(va.dtype).unsqueeze(-1)
    va_mean = (va * vm).sum(1) / vm.sum(1).clamp(min=1)
    anchors = z.reshape(-1, d)
    own = torch.arange(b, device=z.device).repeat_interleave(t)
    allowed = (ids[None, :] != ids[own][:, None]) | (torch.arange(b, device=z.device)[None, :] == own[:, None])
    logits = (anchors @ g.T).masked_fill(~allowed, float("-inf")) / temperature
    loss = F.cross_entropy(logits.float(), own, reduction="none")
    weight = torch.where(valid.reshape(-1), va_weight(va, va_mean[:, None], sigma).reshape(-1),
                         torch.ones_like(loss)) * mask.reshape(-1)
    return (weight * loss).sum() / weight.sum().clamp(min=1e-8)


def smoothness(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between adjacent real frames' embeddings."""
    pair = (mask[:, :-1] & mask[:, 1:]).to(z.dtype)
    return (((z[:, 1:] - z[:, :-1]) ** 2).sum(-1) * pair).sum() / pair.sum().clamp(min=1)
