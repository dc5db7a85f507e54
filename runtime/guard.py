"""Agreement across ranks without a host sync on steps that do not log: a step whose loss is not finite on any rank
has its update skipped on the device; at sync points (log and checkpoint steps, the last step) the counts and every
rank's stop request (SIGTERM/SIGUSR1/Ctrl-C) reach the host in one exchange, and every rank takes the same decision."""
import logging
import signal
import threading
import time
from typing import Optional

import torch

from runtime import distributed

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss; the last good checkpoint is kept."""


class StopRequest:
    """A request to stop at the next sync point, set by SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT) once an entry
    point has called install() (signal handlers are process-wide: only entry points install them, never a
    constructor). A second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint); one arriving within
    `SIGINT_ECHO_S` of the first is the same key press forwarded by a launcher (torchrun passes its SIGINT on to
    ranks that the terminal has already sent it to) and is ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    SIGINT_ECHO_S = 2.0
    EXIT_INTERRUPTED = 130  # a run stopped by Ctrl-C after its checkpoint: the shell's "interrupted" status

    def __init__(self) -> None:
        self.requested = False
        self.name: Optional[str] = None
        self._sigint_at: Optional[float] = None

    def install(self) -> "StopRequest":
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # (Ray runs trials in threads: none there)
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """The handlers as they were before install() (a job run in-process leaves its caller's Ctrl-C alone)."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._sigint_at is not None:
                if now - self._sigint_at < self.SIGINT_ECHO_S:
                    return
                raise KeyboardInterrupt
            self._sigint_at = now
            log.warning("Ctrl-C: stopping at the next log step, after a checkpoint; press Ctrl-C again to stop "
                        "at once without one")
        self.requested = True
        self.name = self.name or signal.Signals(signum).name

    def exit_status(self, status: int) -> int:
        """The process's exit status: a run that finished or stopped for the launcher (SIGTERM/SIGUSR1: it requeues)
        keeps `status`; one stopped by Ctrl-C exits 130 after its checkpoint, as interrupted commands do."""
        return self.EXIT_INTERRUPTED if status == 0 and self._sigint_at is not None else status


class StepGuard:
    """The non-finite policy and the stop decision, kept on the device between sync points.

    Each step: `nonfinite_anywhere(flag)` all-reduces this rank's "my loss was not finite" flag on the device (an
    asynchronous collective on a GPU, no host wait) into `found_inf`, 1.0 on every rank if any rank's loss was not
    finite; the strategy hands it to the optimizer, which skips its update on the device (fused AdamW's found_inf),
    and `record(skipped, flag)` adds the step to counters that stay on the device. `sync(step)`, at sync points only,
    brings the counters and every rank's stop request to the host in one all-gather: warnings name the ranks whose
    loss was not finite, `max_consecutive` skipped steps in a row end the run (NonFiniteLossError), and a stop
    requested on any rank stops all of them after this step."""

    def __init__(self, max_consecutive_nonfinite: int = 3, device: Optional[torch.device] = None,
                 stop: Optional[StopRequest] = None):
        self.max_consecutive = max_consecutive_nonfinite
        self.device = device or torch.device("cpu")
        self.stop = stop or StopRequest()
        self.skipped_total = 0      # as of the last sync
        self.consecutive = 0        # skipped steps in a row ending at the last sync
        self._run = self._zero()    # skipped steps in a row ending at the current step
        self._longest = self._zero()
        self._skipped = self._zero()
        self._local_bad = self._zero()
        self._last_synced_step = 0

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    @property
    def signal_name(self) -> Optional[str]:
        return self.stop.name

    def nonfinite_anywhere(self, local_nonfinite: torch.Tensor) -> torch.Tensor:
        """found_inf: 1.0 on every rank if the loss was not finite on any rank in this step, else 0.0 (device)."""
        flag = local_nonfinite.detach().float().reshape(1)
        return (distributed.all_reduce_sum(flag.clone()) > 0).float().reshape(())

    def record(self, skipped: torch.Tensor, local_nonfinite: torch.Tensor) -> None:
        """A step whose update was skipped (1.0) or taken (0.0), and whether this rank's loss was not finite."""
        self._run = (self._run + 1) * skipped
        self._longest = torch.maximum(self._longest, self._run)
        self._skipped = self._skipped + skipped
        self._local_bad = self._local_bad + local_nonfinite.detach().float().reshape(())

    def sync(self, step: int) -> bool:
        """The exchange (a collective: every rank calls it at the same steps): True if the run stops after `step`."""
        local = torch.stack([self._skipped, self._longest, self._run, self._local_bad,
                             torch.tensor(float(self.stop.requested), device=self.device)])
        rows = distributed.all_gather_tensor(local).tolist()
        skipped, longest, run = (int(v) for v in rows[0][:3])  # identical on every rank: found_inf was reduced
        ranks = [r for r, row in enumerate(rows) if row[3] > 0]
        stop = any(row[4] > 0 for row in rows)
        first = self._last_synced_step + 1
        self._last_synced_step = step
        self._skipped, self._longest, self._local_bad = self._zero(), self._zero(), self._zero()
        self.skipped_total += skipped
        self.consecutive = run
        if skipped:
            cause = f"non-finite loss on rank(s) {ranks}" if ranks else "non-finite gradients"
            log.warning("steps %d-%d: %d update(s) skipped, %s (at most %d in a row, limit %d)", first, step,
                        skipped, cause, longest, self.max_consecutive)
        if longest >= self.max_consecutive:
            raise NonFiniteLossError(f"{longest} consecutive steps with a non-finite loss (between steps {first} and "
                                     f"{step}, ranks {ranks}); stopping with the last good checkpoint")
        if stop and not self.stop.requested:
            self.stop.requested = True
            self.stop.name = self.stop.name or "a signal on another rank"
        return stop
