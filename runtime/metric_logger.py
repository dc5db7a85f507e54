"""Training metrics: accumulated on device, reduced across ranks every N steps, written to TensorBoard and console."""
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from runtime import distributed

log = logging.getLogger(__name__)


class MetricLogger:
    """Window means of per-step values plus throughput (img/s) and the share of wall time spent waiting for data.

    `update` adds device tensors on their device and host numbers on the host, so a step costs no host
    synchronisation; every `every` steps one all-reduce of one vector and one `.tolist()` produce the window's
    numbers (means over steps and ranks), which rank 0 writes to TensorBoard (`train/<name>`, `perf/img_per_s`,
    `perf/data_wait_share`, ...). A value that is not finite (a skipped step's loss) is left out of its mean; a
    name with no finite value in the window is left out of the window. Counts are totals of the window instead:
    `summed` names over its steps and ranks (samples dropped on each rank), `counted` names over its steps only
    (values every rank holds alike, e.g. skipped updates).
    """

    def __init__(self, log_dir: Optional[Union[str, Path]], every: int = 10, prefix: str = "train",
                 device: Optional[torch.device] = None, console: bool = True, summed: Sequence[str] = (),
                 counted: Sequence[str] = ()):
        self.summed, self.counted = set(summed), set(counted)
        if every < 1:
            raise ValueError(f"log interval must be >= 1, got {every}")
        self.every = every
        self.prefix = prefix
        self.device = device or torch.device("cpu")
        self.console = console
        self.writer = None
        self._jsonl = None       # RUN/metrics.jsonl beside RUN/tb: one line per log window, for scripts
        self._pending: Optional[Dict[str, float]] = None
        if log_dir is not None and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(log_dir))
            self._jsonl = open(Path(log_dir).parent / "metrics.jsonl", "a", buffering=1)
        self._reset()

    def _reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}     # device values: finite sums and counts, on the device
        self._counts: Dict[str, torch.Tensor] = {}
        self._host: Dict[str, List[float]] = {}     # host numbers: [sum, count]
        self._steps = 0
        self._samples = 0
        self._data_time = 0.0
        self._t0 = time.perf_counter()

    def update(self, step: int, samples: int = 0, data_time: float = 0.0,
               **values: Union[torch.Tensor, float]) -> Optional[Dict[str, float]]:
        """Add one step's values; returns the reduced window (on every rank) when `step` ends a window."""
        for name, value in values.items():
            if torch.is_tensor(value):
                value = value.detach().float().reshape(())
                finite = torch.isfinite(value)
                value = torch.where(finite, value, torch.zeros_like(value))
                self._sums[name] = self._sums[name] + value if name in self._sums else value
                self._counts[name] = self._counts[name] + finite if name in self._counts else finite.float()
            else:
                total = self._host.setdefault(name, [0.0, 0])
                if math.isfinite(float(value)):
                    total[0] += float(value)
                    total[1] += 1
        self._steps += 1
        self._samples += samples
        self._data_time += data_time
        if step % self.every == 0:
            return self.flush(step)
        return None

    def flush(self, step: int) -> Dict[str, float]:
        """Reduce the window across ranks (a collective: every rank must call it) and write it out."""
        if self._steps == 0:
            return {}
        names, host_names = sorted(self._sums), sorted(self._host)
        elapsed = time.perf_counter() - self._t0
        host = [self._host[n][0] for n in host_names] + [self._host[n][1] for n in host_names] + [
            self._steps, self._samples, self._data_time, elapsed]
        on_device = torch.stack([self._sums[n] for n in names] + [self._counts[n] for n in names]).double() \
            if names else torch.zeros(0, dtype=torch.float64, device=self.device)
        vec = torch.cat([on_device, torch.tensor(host, dtype=torch.float64).to(self.device)])
        reduced = distributed.all_reduce_sum(vec).tolist()
        world = distributed.get_world_size()
        k, h = len(names), len(host_names)
        sums = dict(zip(names, reduced[:k])) | dict(zip(host_names, reduced[2 * k:2 * k + h]))
        counts = dict(zip(names, reduced[k:2 * k])) | dict(zip(host_names, reduced[2 * k + h:2 * k + 2 * h]))
        steps, samples, data_time, elapsed_sum = reduced[2 * k + 2 * h:]
        elapsed = elapsed_sum / world
        out = {f"{self.prefix}/{n}": self._value(n, sums[n], counts[n], world) for n in sorted(sums) if counts[n] > 0}
        out["perf/img_per_s"] = samples / elapsed if elapsed > 0 else 0.0
        out["perf/data_wait_share"] = (data_time / world) / elapsed if elapsed > 0 else 0.0
        self.write_scalars(step, out)
        if self.console and distributed.is_main():
            log.info("step %d  %s", step, "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in out.items()))
        self._reset()
        return out

    def _value(self, name: str, total: float, count: float, world: int) -> float:
        if name in self.summed:
            return total
        if name in self.counted:
            return total / world
        return total / count

    def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
        """Values already identical on every rank (lr, samples seen): rank 0 writes them as they are, to TensorBoard
        and into the step's line of metrics.jsonl."""
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self._jsonl is not None:
            if self._pending is not None and self._pending["step"] != step:
                self._emit()
            self._pending = {**(self._pending or {"step": step}), **{k: float(v) for k, v in scalars.items()}}

    def _emit(self) -> None:
        import json
        self._jsonl.write(json.dumps(self._pending) + "\n")
        self._pending = None

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A CHW float image in [0, 1] (e.g. a grid of reconstructions or a confusion matrix)."""
        if self.writer is not None:
            self.writer.add_image(tag, image.detach().float().clamp(0, 1).cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._jsonl is not None:
            if self._pending is not None:
                self._emit()
            self._jsonl.close()
            self._jsonl = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
