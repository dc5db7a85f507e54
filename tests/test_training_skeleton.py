"""The runtime's training skeleton in one process: TrainState as one object, the config resolved once and never
mutated, no process-wide effects from constructors (signal handlers, timm's op table), a stop request honoured."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from data_tools.registry import DatasetSpec
from runtime.checkpoint import load_checkpoint
from runtime.config import RunConfig, config_to_dict
from runtime.distributed import resolve_env
from runtime.guard import StopRequest
from runtime.smoke import SmokeConfig, SmokeRun
from runtime.training import TrainState

from conftest import REPO, clean_env


def smoke_config(tmp_path, **kw) -> SmokeConfig:
    return SmokeConfig(run=RunConfig(output_dir=str(tmp_path / "run"), log_every=5, ckpt_every=10), steps=20, **kw)


def test_train_state_round_trip_and_summary():
    state = TrainState(steps_per_epoch=7, total_steps=70, samples_per_step=12, seed=3)
    losses = [2.0, 1.5, 1.75, 0.5]
    for i, loss in enumerate(losses):
        state.step = 5 * (i + 1)
        state.record_window({"train/loss": loss})
    state.best = {"epoch": 2, "metric": 0.5, "val": {"top1": 0.5}}
    state.history.append({"epoch": 2, "val_top1": 0.5})
    state.extra["classes"] = ["a", "b"]
    saved = json.loads(json.dumps(state.to_dict()))  # what a checkpoint holds, through a serialiser
    assert saved["data"] == {"seed": 3, "epoch": 2, "step_in_epoch": 6} and saved["samples_seen"] == 20 * 12
    assert saved["summary"]["train/loss"] == {"count": 4, "first": 2.0, "last": 0.5, "min": 0.5, "max": 2.0,
                                              "mean": pytest.approx(sum(losses) / 4)}
    back = TrainState(steps_per_epoch=7, total_steps=70, samples_per_step=12, seed=3).restore(saved)
    assert back.to_dict() == saved


def test_constructing_and_running_leaves_the_process_and_the_config_alone(tmp_path):
    cfg = smoke_config(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    job = SmokeRun(cfg, resolve_env())
    assert signal.getsignal(signal.SIGTERM) is before  # only an entry point installs handlers
    assert cfg.optim.lr is None  # the caller's config: untouched
    assert job.cfg.optim.lr == pytest.approx(cfg.optim.blr * cfg.batch_size / 256) and job.cfg is not cfg
    result = job.run()
    assert result["final_step"] == 20 and not result["stopped"]
    assert signal.getsignal(signal.SIGTERM) is before
    saved = load_checkpoint(tmp_path / "run")
    assert saved["config"] == config_to_dict(job.cfg) and saved["summary"]["train/loss"]["count"] == 4


def test_a_stop_request_ends_the_run_after_one_step_with_a_checkpoint(tmp_path):
    stop = StopRequest()
    stop.requested, stop.name = True, "SIGTERM"  # as the handler leaves it
    result = SmokeRun(smoke_config(tmp_path), resolve_env(), stop).run()
    assert result["stopped"] and result["final_step"] == 1
    assert load_checkpoint(tmp_path / "run")["step"] == 1
    again = SmokeRun(smoke_config(tmp_path), resolve_env()).run()  # a rerun resumes there and finishes
    assert again["resumed_from_step"] == 1 and again["final_step"] == 20 and not again["stopped"]


def test_the_weight_average_is_timms_formula_and_survives_a_stop(tmp_path):
    """train.ema_decay: after each optimizer step e = d * e + (1 - d) * w (the first step copies w, as timm's
    ModelEmaV3 does); a run stopped part-way and resumed ends with the uninterrupted run's average, bit for bit."""
    class Recorded(SmokeRun):
        def after_step(self, state, done, logger):
            self.seen.append([p.detach().clone() for p in self.strategy.module.parameters()])

    job = Recorded(smoke_config(tmp_path, ema_decay=0.8), resolve_env())
    job.seen = []
    job.run()
    expected = job.seen[0]
    for weights in job.seen[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights)]
    averaged = list(job.ema.module.parameters())
    assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-7) for a, e in zip(averaged, expected))
    assert not torch.allclose(averaged[0], job.seen[-1][0])
    stop = StopRequest()
    stop.requested, stop.name = True, "SIGTERM"
    cfg = SmokeConfig(run=RunConfig(output_dir=str(tmp_path / "stopped"), log_every=5, ckpt_every=10), steps=20,
                      ema_decay=0.8)
    assert SmokeRun(cfg, resolve_env(), stop).run()["final_step"] == 1
    again = SmokeRun(cfg, resolve_env())
    again.run()
    assert all(torch.equal(a, b) for a, b in zip(again.ema.module.parameters(), averaged))


def test_a_registered_part_is_saved_and_restored_with_the_run(tmp_path):
    """A job's own stateful part (JobParts.states) goes into every checkpoint and comes back on resume."""
    class Counter:
        def __init__(self):
            self.steps = 0

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]

    class Counting(SmokeRun):
        def build(self):
            parts = super().build()
            self.counter = parts.states["counter"] = Counter()
            return parts

        def after_step(self, state, done, logger):
            self.counter.steps += 1

    stop = StopRequest()
    stop.requested, stop.name = True, "SIGTERM"
    assert Counting(smoke_config(tmp_path), resolve_env(), stop).run()["final_step"] == 1
    assert load_checkpoint(tmp_path / "run")["states"]["counter"] == {"steps": 1}
    again = Counting(smoke_config(tmp_path), resolve_env())
    again.run()
    assert again.counter.steps == 20 and load_checkpoint(tmp_path / "run")["states"]["counter"] == {"steps": 20}


def test_stop_request_install_takes_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = StopRequest().install()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_building_transforms_does_not_patch_timm():
    code = ("from timm.data import auto_augment as a; from finetune.data import make_transforms, "
            "patch_timm_posterize; from finetune.config import AugmentConfig; op = a.NAME_TO_OP['Posterize']; "
            "make_transforms(32, AugmentConfig()); assert a.NAME_TO_OP['Posterize'] is op; "
            "patch_timm_posterize(); assert a.NAME_TO_OP['Posterize'] is not op")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), check=True)


def test_registry_refuses_an_unknown_split_rule_or_task():
    with pytest.raises(ValueError, match="split_rule 'by_class'"):
        DatasetSpec("X", ("a", "b"), "by_class")
    with pytest.raises(ValueError, match="task 'ordinal'"):
        DatasetSpec("X", ("a", "b"), "per_class", task="ordinal")


def test_one_logging_setup_for_tools_and_ranks(capsys):
    import logging

    from runtime.logs import setup_logging
    try:
        setup_logging()  # a single-process tool
        logging.getLogger("tool").info("hello")
        setup_logging(rank=1)  # a training job's second rank: warnings only
        logging.getLogger("job").info("quiet")
        logging.getLogger("job").warning("loud")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and err[0].endswith(" tool: hello") and "[rank" not in err[0]
        assert err[1].endswith(" [rank 1] job: loud")
    finally:
        logging.getLogger().handlers[:] = []
        logging.getLogger().setLevel(logging.WARNING)
