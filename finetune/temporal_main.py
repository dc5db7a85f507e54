"""Temporal valence/arousal entry point: `torchrun finetune/temporal_main.py --dataset afew --data shards/afew
--checkpoint runs/pre [key=value ...]` trains a head over frames (stage 2); with train.stage=1, the contrastive
stage whose run a later stage 2 starts from (temporal.stage1=RUN)."""
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun finetune/temporal_main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402

from finetune.cache_frames import FrameCacheError  # noqa: E402
from finetune.config import ENCODER_DATA_FLAGS  # noqa: E402
from finetune.temporal_config import TemporalConfig  # noqa: E402
from runtime.checkpoint import CheckpointError  # noqa: E402
from runtime.cli import shortcut_flags  # noqa: E402
from runtime.device import DeviceError  # noqa: E402
from runtime.entry import init_distributed_for, run_job  # noqa: E402
from runtime.guard import NonFiniteLossError, StopRequest  # noqa: E402

log = logging.getLogger("finetune.temporal")


def train_temporal(cfg: TemporalConfig, stop: StopRequest) -> int:
    env = init_distributed_for(cfg.train.strategy, cfg.run.dist_timeout_s, cfg.run.device, cfg.train.precision)
    from finetune.temporal_job import TemporalPretraining, TemporalRegression
    job = TemporalPretraining if cfg.train.stage == 1 else TemporalRegression
    job(cfg, env, stop).run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune/temporal_main.py", description=__doc__)
    shortcuts = shortcut_flags(parser, ENCODER_DATA_FLAGS)
    return run_job(TemporalConfig, argv, __doc__, log, train_temporal,
                   expected=(CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError, KeyError,
                             DeviceError, FrameCacheError), parser=parser, shortcuts=shortcuts)


if __name__ == "__main__":
    from runtime.entry import run_as_script
    run_as_script(main, "temporal training")
