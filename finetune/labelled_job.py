"""What every job on a labelled benchmark shares: its dataset, its training batches, evaluation on val after every
epoch with the best weights kept, and the best tested at the end (fine-tuning and teacher adaptation subclass it)."""
import logging
from typing import Any, Callable, Dict, Optional

from data_tools.registry import SINGLE_LABEL
from finetune.data import eval_loader, resolve_dataset, train_loader
from runtime import distributed
from runtime.atomic import atomic_write_json
from runtime.guard import StopRequest
from runtime.metric_logger import MetricLogger
from runtime.training import TrainingJob, TrainState

log = logging.getLogger("finetune")


class LabelledJob(TrainingJob):
    """A job on one labelled dataset. A subclass builds `train_transform`, `eval_transform`, `primary` (the metric
    the best epoch is chosen by) in `build()` (after `self.resolve_dataset()`), and says how it evaluates a split,
    keeps and reloads its best weights and what its metrics.json holds. `on_epoch(epoch, val_metrics)` is called on
    every rank after each evaluation (Ray Tune reports through it)."""

    def __init__(self, cfg: Any, env: distributed.DistEnv, stop: Optional[StopRequest] = None,
                 on_epoch: Optional[Callable[[int, Dict], None]] = None):
        self.on_epoch = on_epoch
        super().__init__(cfg, env, stop)

    def resolve_dataset(self):
        self.info = resolve_dataset(self.cfg.data.dataset, self.cfg.data.root, self.run_dir)
        self.task = self.info.task
        return self.info

    # what a subclass says
    def evaluate(self, split: str, save_predictions: bool = False) -> Dict[str, Any]:
        raise NotImplementedError

    def save_best(self, metrics: Dict[str, Any], step: int) -> None:
        """Rank 0 writes the best weights so far (every rank calls it)."""
        raise NotImplementedError

    def load_best(self) -> None:
        raise NotImplementedError

    def results(self, state: TrainState, test: Dict[str, Any]) -> Dict[str, Any]:
        """metrics.json beside the shared fields."""
        return {}

    def write_results(self, state: TrainState, test: Dict[str, Any], logger: MetricLogger) -> None:
        """Rank 0, after metrics.json: anything else the job writes."""

    # shared
    def train_loader(self):
        return train_loader(self.info, self.train_transform, self.cfg.data,
                            batches=self.steps_per_epoch * self.cfg.optim.accum_steps, seed=self.cfg.run.seed,
                            epoch=self.epoch)

    def no_batch(self, loader) -> str:
        return (f"the training shards of {self.info.name} in {self.info.root} gave no batch of "
                f"{self.cfg.data.batch_size} in a whole pass")

    def eval_split(self, split: str):
        """The loader of one evaluation split (None where this rank has no shard of it)."""
        return eval_loader(self.info, split, self.eval_transform, self.cfg.data)

    def checkpoint_due(self, step: int) -> bool:
        return super().checkpoint_due(step) or step % self.steps_per_epoch == 0

    def busy_step(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0  # evaluates on val

    def after_step(self, state: TrainState, done, logger: MetricLogger) -> None:
        """At the end of an epoch: evaluate on val, keep the best weights."""
        if state.step % self.steps_per_epoch:
            return
        epoch, best = state.step // self.steps_per_epoch, state.best
        val = self.evaluate("val")
        state.history.append({"epoch": epoch, "step": state.step, f"val_{self.primary}": val[self.primary]})
        logger.write_scalars(state.step, {f"val/{self.primary}": val[self.primary],
                                          **({"val/top3": val["top3"], "val/macro_f1": val["macro_f1"]}
                                             if self.task == SINGLE_LABEL else {})})
        if best["metric"] is None or val[self.primary] > best["metric"]:
            best = state.best = {"epoch": epoch, "metric": val[self.primary], "val": val}
            self.save_best(val, state.step)
        log.info("epoch %d: val %s %.4f (best %.4f at epoch %d)", epoch, self.primary, val[self.primary],
                 best["metric"], best["epoch"])
        if self.on_epoch is not None:
            self.on_epoch(epoch, val)

    def finish(self, state: TrainState, logger: MetricLogger, guard, start: int, stopped: bool) -> Dict[str, Any]:
        """Test the best-validation weights; write metrics.json (and what the job adds)."""
        if stopped:
            return {"final_step": state.step, "stopped": True}
        self.load_best()
        test = self.evaluate("test", save_predictions=True)
        logger.write_scalars(state.step, {f"test/{self.primary}": test[self.primary]})
        best = state.best
        result = {"dataset": self.info.name, "final_step": state.step, "best_epoch": best["epoch"],
                  **self.results(state, test), "history": state.history, "train": state.summary,
                  "classes": self.info.classes, "world_size": self.env.world_size, "stopped": False}
        if self.env.is_main:
            atomic_write_json(self.run_dir / "metrics.json", result)
            self.write_results(state, test, logger)
        return result
