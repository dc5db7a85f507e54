"""Training strategies behind one interface: DDP (or the bare model in one process) and DeepSpeed ZeRO 1/2."""
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional, Protocol, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from runtime import distributed
from runtime.checkpoint import CheckpointError, CheckpointStore, load_checkpoint, load_model_state

log = logging.getLogger(__name__)


class Strategy(Protocol):
    """What the training skeleton asks of a strategy (runtime/training.py is its one caller).

    A step runs `accum_steps` micro-batches, each as `with accumulate(boundary): loss = forward(model, batch)` then
    `backward(loss)` (boundary: the step's last micro-batch, where gradients are reduced across ranks), then one
    `step(found_inf)`: the optimizer update, skipped on the device when `found_inf` (a 0-d device flag, some rank's
    loss was not finite) is set; it returns (gradient norm, skipped), neither read on the host. `set_lr(lr)` sets
    every group's lr times its `lr_scale`. `save_checkpoint(store, step, client_state)` is a collective: every rank
    calls it, the checkpoint holds the weights, the optimizer and `client_state`; `load_checkpoint(path)` restores
    weights and optimizer and returns the rest of what was saved. `module` is the bare model (evaluation, export,
    EMA), `model` what the forward runs through (a DDP wrapper, a DeepSpeed engine, or `module` itself)."""
    name: str
    module: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device

    def accumulate(self, boundary: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, found_inf: Optional[torch.Tensor] = None) -> Tuple[Any, torch.Tensor]: ...
    def set_lr(self, lr: float) -> None: ...
    def save_checkpoint(self, store: CheckpointStore, step: int, client_state: Dict[str, Any]) -> Optional[Path]: ...
    def load_checkpoint(self, path: Path) -> Dict[str, Any]: ...


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at lr times its `lr_scale` (timm's layer decay sets it; 1 elsewhere)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class DDPStrategy:
    """Wraps the model in DDP when there is more than one rank; owns backward, clipping and the optimizer step.

    Gradient accumulation: run each micro-batch inside `accumulate(boundary)`; only the last micro-batch of a step
    (boundary=True) all-reduces gradients, the others run under DDP's `no_sync`. The gradients are views of DDP's
    buckets (no copy). fp16 runs under a GradScaler; bf16 and fp32 need none.
    """
    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 accum_steps: int = 1, clip_grad: Optional[float] = None, precision: str = "fp32"):
        self.module = model.to(device)
        self.device = device
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.clip_grad = clip_grad
        self.trained = [p for p in self.module.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        # fused AdamW reads `found_inf` and skips its update on the device; any other optimizer needs the host
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # static_graph stays off: DDP then all-reduces the first step's gradients only through the tensors it
            # finds in the forward's output, and the pretrainer returns a dataclass (ranks diverged, measured);
            # with no unused parameters (frozen ones are not DDP's) it would save nothing
            self.model = DistributedDataParallel(self.module, device_ids=ids, gradient_as_bucket_view=True)
        else:
            self.model = self.module

    def accumulate(self, boundary: bool):
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def set_lr(self, lr: float) -> None:
        set_group_lrs(self.optimizer, lr)

    def step(self, found_inf: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clip (if configured) and step unless `found_inf` (a device flag: some rank's loss was not finite) or the
        gradient norm is not finite; zero the gradients. Returns (pre-clip gradient norm, skipped), both device
        tensors: nothing here waits for the device. Under fp16 the GradScaler decides the skip (a non-finite loss
        makes the gradients non-finite too) and `skipped` reports the loss flag alone, not its overflow steps."""
        skipped = found_inf if found_inf is not None else torch.zeros((), device=self.device)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.trained, self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trained if p.grad is not None])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            skipped = torch.maximum(skipped, (~torch.isfinite(norm)).float())
            if self.skips_on_device:
                self.optimizer.found_inf = skipped
                self.optimizer.step()
            elif not bool(skipped):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), skipped

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": self.name,
                "world_size": distributed.get_world_size(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def save_checkpoint(self, store: CheckpointStore, step: int, client_state: Dict[str, Any]) -> Optional[Path]:
        return store.save(step, {**self.state_dict(), **client_state})

    def load_checkpoint(self, path: Path) -> Dict[str, Any]:
        """Restore model and optimizer; returns the rest of the checkpoint (step, RNG, data position, ...)."""
        state = load_checkpoint(path)
        if "optimizer" not in state:
            raise CheckpointError(f"{path} was written by the {state.get('strategy')} strategy and holds no optimizer "
                                  f"state for DDP: resume it with that strategy, or start a new run from its "
                                  f"weights (run.resume=none model.init_from={path})")
        load_model_state(self.module, state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        scaler = state.pop("scaler", None)
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(scaler)
        return state


DS_TAG = "deepspeed"


class DeepSpeedStrategy:
    """DeepSpeed ZeRO stage 1 or 2 from a JSON config (configs/deepspeed/*.json); batch size, accumulation,
    clipping and bf16 are filled in from the run's config so the two cannot disagree.

    Checkpoints: every rank writes its ZeRO shards into the checkpoint directory (DeepSpeed requires
    `save_checkpoint` on every rank); rank 0 adds state.pt with the full model weights (stages 1-2 keep whole
    parameters on every rank), so fine-tuning reads DDP and DeepSpeed checkpoints alike.
    """
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 accum_steps: int, clip_grad: Optional[float], config_path: str, batch_per_rank: int,
                 precision: str = "fp32"):
        import deepspeed
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a ~60 s JIT build we do not use
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        ds_config = json.loads(path.read_text())
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ValueError(f"{path}: ZeRO stage {stage} is not supported here (1 or 2: full weights per rank)")
        ds_config.pop("train_batch_size", None)
        ds_config.update(train_micro_batch_size_per_gpu=batch_per_rank, gradient_accumulation_steps=accum_steps,
                         gradient_clipping=clip_grad or 0.0, bf16={"enabled": precision == "bf16"},
                         fp16={"enabled": precision == "fp16"})
        self.stage = stage
        self.accum_steps = accum_steps
        self.device = device
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                 config=ds_config)
        distributed.keep_all_gloo_thread_states()  # DeepSpeed's own groups: see keep_gloo_thread_states
        distributed.release_at_shutdown(self.engine.destroy)  # drops the hooks that keep the engine and its groups
        self.module = self.engine.module
        self.model = self.engine
        self.precision = precision
        self.base_optimizer = optimizer  # what ZeRO steps on its flat partitions: fused AdamW skips on found_inf
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def accumulate(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed tracks the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); off the boundary it updates nothing

    def set_lr(self, lr: float) -> None:
        set_group_lrs(self.optimizer, lr)

    def step(self, found_inf: Optional[torch.Tensor] = None) -> Tuple[Any, torch.Tensor]:
        """DeepSpeed's optimizer step at the accumulation boundary, skipped on the device when `found_inf` is set
        (the flag reaches the fused AdamW that ZeRO steps; DeepSpeed's own checks in step() may read the device:
        its fp32 overflow check, its gradient norm). Returns (gradient norm as DeepSpeed gives it, skipped)."""
        skipped = found_inf if found_inf is not None else torch.zeros((), device=self.device)
        if self.skips_on_device:
            self.base_optimizer.found_inf = skipped
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return (norm.detach() if torch.is_tensor(norm) else float("nan") if norm is None else float(norm)), skipped

    def save_checkpoint(self, store: CheckpointStore, step: int, client_state: Dict[str, Any]) -> Optional[Path]:
        def write_shards(directory: Path) -> None:
            self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        state = {"model": {k: v.float() for k, v in self.module.state_dict().items()}, "strategy": self.name,
                 "zero_stage": self.stage, "world_size": distributed.get_world_size(), **client_state}
        return store.save(step, state, write_shards=write_shards)

    def load_checkpoint(self, path: Path) -> Dict[str, Any]:
        state = load_checkpoint(path)
        world = distributed.get_world_size()
        if state.get("strategy") != self.name:
            raise CheckpointError(f"{path} was written by the {state.get('strategy')} strategy, not DeepSpeed: resume "
                                  f"with train.strategy={state.get('strategy')}, or start a new run from its weights "
                                  f"(run.resume=none model.init_from={path})")
        if state["world_size"] != world:
            raise CheckpointError(
                f"{path} holds DeepSpeed ZeRO shards for {state['world_size']} ranks; this run has {world}. ZeRO "
                f"optimizer state cannot be resharded on resume: rerun with {state['world_size']} ranks, or start a "
                f"new run from its weights with a fresh optimizer (run.resume=none model.init_from={path}); "
                f"DeepSpeed's zero_to_fp32.py in that directory consolidates the shards if you need them")
        load_dir = Path(path) if (Path(path) / DS_TAG).is_dir() else Path(path).parent
        check_deepspeed_files(load_dir / DS_TAG)
        self.engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        state.pop("model")
        return state


def check_deepspeed_files(directory: Path) -> None:
    """DeepSpeed reads its shards with full unpickling, so each shard's pickle is first scanned for the globals it
    names (its tensors are not read): beyond what torch's weights-only loader accepts, only classes of the deepspeed
    package (loss scaler, ZeRO stage, fragment addresses) may appear; a function or another package's object is
    refused before DeepSpeed opens the file."""
    import importlib
    for file in sorted(directory.glob("*.pt")):
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(file)):
            module, _, attr = name.rpartition(".")
            obj = getattr(importlib.import_module(module), attr, None) if module.startswith("deepspeed.") else None
            if not isinstance(obj, type):
                raise CheckpointError(f"{file}: refused to load: it pickles more than tensors and plain data "
                                      f"(GLOBAL {name}). Only load files you trust")


def make_strategy(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  accum_steps: int = 1, clip_grad: Optional[float] = None, deepspeed_config: Optional[str] = None,
                  batch_per_rank: int = 1, precision: str = "fp32") -> Strategy:
    if name == "ddp":
        return DDPStrategy(model, optimizer, device, accum_steps, clip_grad, precision)
    if name == "deepspeed":
        if not deepspeed_config:
            raise ValueError("train.strategy=deepspeed needs train.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
        return DeepSpeedStrategy(model, optimizer, device, accum_steps, clip_grad, deepspeed_config, batch_per_rank,
                                 precision)
    raise ValueError(f"unknown strategy {name!r}; choose ddp or deepspeed")
