"""Training strategies behind one interface: DDP (or the bare model in one process) and DeepSpeed ZeRO 1/2."""
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from runtime import distributed
from runtime.checkpoint import CheckpointError, CheckpointStore, load_checkpoint, load_model_state

log = logging.getLogger(__name__)


class DDPStrategy:
    """Wraps the model in DDP when there is more than one rank; owns backward, clipping and the optimizer step.

    Gradient accumulation: run each micro-batch inside `accumulate(boundary)`; only the last micro-batch of a step
    (boundary=True) all-reduces gradients, the others run under DDP's `no_sync`.
    """
    name = "ddp"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 accum_steps: int = 1, clip_grad: Optional[float] = None):
        self.module = model.to(device)
        self.device = device
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.clip_grad = clip_grad
        if distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module

    def accumulate(self, boundary: bool):
        if boundary or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def skip(self) -> None:
        """Drop the gradients of a step whose update is skipped (non-finite loss)."""
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> torch.Tensor:
        """Clip (if configured), step, zero grads; returns the pre-clip gradient norm as a device tensor."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": self.name,
                "world_size": distributed.get_world_size()}

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
                 bf16: bool):
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
                         gradient_clipping=clip_grad or 0.0, bf16={"enabled": bf16})
        self.stage = stage
        self.accum_steps = accum_steps
        self.device = device
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                                 config=ds_config)
        distributed.keep_all_gloo_thread_states()  # DeepSpeed's own groups: see keep_gloo_thread_states
        distributed.release_at_shutdown(self.engine.destroy)  # drops the hooks that keep the engine and its groups
        self.module = self.engine.module
        self.model = self.engine
        self.bf16 = bf16

    def accumulate(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed tracks the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # an optimizer step only at DeepSpeed's accumulation boundary

    def skip(self) -> None:
        """A skipped micro-batch: no backward, no engine step. With accumulation this shifts DeepSpeed's
        boundary by one micro-batch (README: deviations)."""
        self.engine.zero_grad()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

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


def init_distributed_for(strategy: str, timeout_s: int = 600) -> distributed.DistEnv:
    """The process group a strategy needs: DeepSpeed wants one even for a single process, and is imported before it
    starts (imported later, it keeps the group alive past shutdown; see distributed.init_distributed)."""
    deepspeed = strategy == "deepspeed"
    return distributed.init_distributed(distributed.resolve_env(), timeout_s, always=deepspeed,
                                        libraries=("deepspeed",) if deepspeed else ())


def make_strategy(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  accum_steps: int = 1, clip_grad: Optional[float] = None, deepspeed_config: Optional[str] = None,
                  batch_per_rank: int = 1, precision: str = "fp32"):
    if name == "ddp":
        return DDPStrategy(model, optimizer, device, accum_steps, clip_grad)
    if name == "deepspeed":
        if not deepspeed_config:
            raise ValueError("train.strategy=deepspeed needs train.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
        return DeepSpeedStrategy(model, optimizer, device, accum_steps, clip_grad, deepspeed_config, batch_per_rank,
                                 bf16=precision == "bf16")
    raise ValueError(f"unknown strategy {name!r}; choose ddp or deepspeed")
