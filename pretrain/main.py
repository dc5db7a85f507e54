"""Pretraining entry point: `torchrun pretrain/main.py --config FILE key=value ...` (or python -m pretrain.main)."""
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun pretrain/main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.shard_errors import ShardError  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.teacher_error import TeacherCacheError, TeacherError  # noqa: E402
from runtime.checkpoint import CheckpointError  # noqa: E402
from runtime.device import DeviceError  # noqa: E402
from runtime.guard import NonFiniteLossError, StopRequest  # noqa: E402
from runtime.entry import init_distributed_for, run_job  # noqa: E402

log = logging.getLogger("pretrain")


def pretrain(cfg: PretrainConfig, stop: StopRequest) -> int:
    from pretrain.engine import EXIT_STOPPED, Pretraining
    env = init_distributed_for(cfg.train.strategy, cfg.run.dist_timeout_s, cfg.run.device, cfg.train.precision)
    return EXIT_STOPPED if Pretraining(cfg, env, stop).run()["stopped"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_job(PretrainConfig, argv, __doc__, log, pretrain,
                   expected=(NonFiniteLossError, CheckpointError, FileNotFoundError, DeviceError, TeacherError,
                             TeacherCacheError, ShardError), traced=(ValueError,))


if __name__ == "__main__":
    from runtime.entry import run_as_script
    run_as_script(main, "pretraining")
