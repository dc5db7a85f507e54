"""Counting, on any device, the calls that make the host wait for a GPU: a TorchFunctionMode over training steps
(debug.count_host_syncs), each call attributed to the project's code or to DeepSpeed's."""
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode

# read a tensor's value on the host: on a GPU each waits for every kernel queued before it
READS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__float__: "__float__",
         torch.Tensor.__bool__: "__bool__", torch.Tensor.__int__: "__int__", torch.Tensor.__index__: "__index__",
         torch.Tensor.numpy: "numpy", torch.Tensor.__array__: "__array__", torch.Tensor.cpu: "cpu",
         torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.unique: "unique",
         torch.masked_select: "masked_select"}
# build a device tensor from host data: a pageable copy that waits for the stream
FROM_HOST = {torch.tensor: "tensor", torch.as_tensor: "as_tensor"}

TORCH_DIR = str(Path(torch.__file__).resolve().parent)
DATA_LOADER_DIR = str(Path(torch.utils.data.__file__).resolve().parent)


def _deepspeed_dir() -> Optional[str]:
    module = sys.modules.get("deepspeed")
    return str(Path(module.__file__).resolve().parent) if module is not None and module.__file__ else None


def _device_of(value: Any) -> Optional[torch.device]:
    """The device an argument of `to` or a constructor names (a device, its name, or a tensor's), else None."""
    if isinstance(value, torch.device):
        return value
    if torch.is_tensor(value):
        return value.device
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            return None
    return None


def _in_torch(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR)


class HostSyncCounter(TorchFunctionMode):
    """Counts, while active on this thread, every call that would wait for a GPU: reads of a tensor's value on the
    host (item, tolist, float/bool/int/index conversions, numpy, cpu, size-dependent ops such as nonzero, boolean
    masks), `to` a CPU device, and device tensors built from host data (torch.tensor / as_tensor with a device).

    On a CPU run every tensor is on the host, so the counter cannot tell a read of a device result from one of a
    host value: it counts them all, except inside torch.utils.data (the loader only handles host tensors). A
    `to(device)` whose target is the very device object the job moves batches with (`job_device`) is a
    host-to-device copy, not counted; nor is a `to` called from torch's own code (see __torch_function__). Each
    call is attributed to DeepSpeed when DeepSpeed's code is on the stack (its step may read the device), else to
    the project; `calls` keeps where each one came from."""

    def __init__(self, job_device: Optional[torch.device] = None):
        super().__init__()
        self.job_device = job_device
        self.counts: Counter = Counter()
        self.calls: List[Dict[str, str]] = []
        self._deepspeed = _deepspeed_dir()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self._sync_name(func, args, kwargs)
        # torch's own code moves tensors between devices it takes from its inputs (a no-op where they agree): only
        # a `to` written outside torch names a host device of its own accord
        if name is not None and not (func is torch.Tensor.to and _in_torch(sys._getframe(1))):
            self._record(name)
        return func(*args, **kwargs)

    def _sync_name(self, func, args, kwargs) -> Optional[str]:
        if func in READS:
            return READS[func]
        if func in FROM_HOST:
            device = _device_of(kwargs.get("device"))
            # on a CPU run the job's device is the host: a tensor built there would be a copy to the GPU on a GPU run
            cpu_job = self.job_device is not None and self.job_device.type == "cpu"
            return FROM_HOST[func] if device is not None and (device.type != "cpu" or cpu_job) else None
        if func is torch.Tensor.to:
            targets = list(args[1:]) + [kwargs.get("device")]
            if any(t is self.job_device for t in targets if t is not None):
                return None  # a batch moving to the job's device
            devices = [d for d in map(_device_of, targets) if d is not None]
            return "to(cpu)" if devices and devices[0].type == "cpu" else None
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            indices = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices):
                return "boolean mask"
        return None

    def _record(self, name: str) -> None:
        frame = sys._getframe(2)
        owner, where = "project", None
        while frame is not None:
            path = frame.f_code.co_filename
            if path.startswith(DATA_LOADER_DIR):
                return
            if self._deepspeed and path.startswith(self._deepspeed):
                owner = "deepspeed"
            if where is None and not path.startswith(TORCH_DIR) and path != __file__:
                where = f"{Path(path).name}:{frame.f_lineno}"
            frame = frame.f_back
        self.counts[owner] += 1
        self.calls.append({"call": name, "owner": owner, "where": where or "?"})


class HostSyncLog:
    """Per-step host-sync records in RUN/host_syncs/rank<R>.jsonl, one JSON line per training step: {"step",
    "quiet" (a step that neither logs, checkpoints, evaluates nor starts the run), ...}. debug.count_host_syncs:
    the step under a HostSyncCounter ("project", "deepspeed", "calls"). debug.cuda_sync_debug, on a GPU: CUDA's own
    detector (torch.cuda.set_sync_debug_mode("warn")) with each warning it raises in the step caught ("cuda_syncs",
    "cuda_sync_sites": the frames outside torch that led to it)."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, count_calls: bool = True,
                 cuda_debug: bool = False):
        directory = Path(run_dir) / "host_syncs"
        directory.mkdir(parents=True, exist_ok=True)
        self.device, self.count_calls = device, count_calls
        self.cuda_debug = cuda_debug and device.type == "cuda"
        self.file = open(directory / f"rank{rank}.jsonl", "a", buffering=1)

    @contextlib.contextmanager
    def step(self, step: int, quiet: bool) -> Iterator[None]:
        import warnings
        record: Dict[str, Any] = {"step": step, "quiet": quiet}
        counter = HostSyncCounter(self.device) if self.count_calls else None
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True)) if self.cuda_debug else []
            if counter is not None:
                stack.enter_context(counter)
            if self.cuda_debug:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, "default")
            yield
        if counter is not None:
            record.update(project=counter.counts["project"], deepspeed=counter.counts["deepspeed"],
                          calls=counter.calls)
        if self.cuda_debug:
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            record.update(cuda_syncs=len(syncs), cuda_sync_sites=sorted({f"{Path(w.filename).name}:{w.lineno}"
                                                                         for w in syncs}))
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()
