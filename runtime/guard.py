"""Per-step agreement across ranks: skip a step whose loss is not finite on any rank, stop after k in a row,
and stop cleanly (checkpoint, exit for requeue) when any rank was asked to by SIGTERM or SIGUSR1."""
import logging
import signal
import threading
from typing import Optional

import torch

from runtime import distributed

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss; the last good checkpoint is kept."""


class StopRequest:
    """A request to stop at the next step boundary, set by SIGTERM or SIGUSR1 once an entry point has called
    install() (signal handlers are process-wide: only entry points install them, never a constructor)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.name: Optional[str] = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # (Ray runs trials in threads: none there)
            for sig in self.SIGNALS:
                signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name


class StepGuard:
    """One all-reduce of two flags per step (the only per-step host sync of a training loop): every rank then
    takes the same decision, so no collective is left waiting on a rank that skipped or stopped."""

    def __init__(self, max_consecutive_nonfinite: int = 3, device: Optional[torch.device] = None,
                 stop: Optional[StopRequest] = None):
        self.max_consecutive = max_consecutive_nonfinite
        self.device = device or torch.device("cpu")
        self.consecutive = 0
        self.skipped_total = 0
        self.stop = stop or StopRequest()

    @property
    def signal_name(self) -> Optional[str]:
        return self.stop.name

    def check(self, loss: torch.Tensor, step: int) -> tuple:
        """(skip this step's update, stop after it) — identical on every rank."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).any().float(),
                             torch.tensor(float(self.stop.requested), device=loss.device)]).to(self.device)
        nonfinite_ranks, stop = distributed.all_reduce_sum(flags).tolist()
        skip = nonfinite_ranks > 0
        if skip:
            bad = distributed.all_gather_object(bool(not torch.isfinite(loss.detach()).all()))
            ranks = [r for r, b in enumerate(bad) if b]
            self.consecutive += 1
            self.skipped_total += 1
            log.warning("step %d: non-finite loss on rank(s) %s; update skipped (%d in a row, limit %d)",
                        step, ranks, self.consecutive, self.max_consecutive)
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLossError(f"{self.consecutive} consecutive steps with a non-finite loss (last at "
                                         f"step {step}, ranks {ranks}); stopping with the last good checkpoint")
        else:
            self.consecutive = 0
        if stop > 0 and not self.stop.requested:
            self.stop.requested = True
            self.stop.name = self.stop.name or "a signal on another rank"
        return skip, stop > 0
