"""Fine-tuning entry point: `torchrun finetune/main.py --dataset FI --checkpoint runs/pre [key=value ...]`; with
--eval, `--checkpoint` is a trained classifier (a fine-tuning run, an export, a reference .pth) scored on val and
test without training."""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun finetune/main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.registry import UnknownDatasetError  # noqa: E402
from finetune.config import ENCODER_DATA_FLAGS, FinetuneConfig  # noqa: E402
from runtime.checkpoint import CheckpointError  # noqa: E402
from runtime.cli import shortcut_flags  # noqa: E402
from runtime.device import DeviceError  # noqa: E402
from runtime.guard import NonFiniteLossError, StopRequest  # noqa: E402
from runtime.entry import init_distributed_for, run_job  # noqa: E402

log = logging.getLogger("finetune")


def finetune(cfg: FinetuneConfig, stop: StopRequest) -> int:
    env = init_distributed_for("ddp", cfg.run.dist_timeout_s, cfg.run.device, cfg.train.precision)
    if cfg.train.mode == "eval":
        from finetune.evaluate import Evaluation
        Evaluation(cfg, env).run()
    elif cfg.train.mode == "linear_probe":
        from finetune.linear_probe import LinearProbe
        LinearProbe(cfg, env).run()
    else:
        from finetune.data import patch_timm_posterize
        from finetune.engine import Finetuning
        patch_timm_posterize()
        Finetuning(cfg, env, stop).run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune/main.py", description=__doc__)
    shortcuts = shortcut_flags(parser, {**ENCODER_DATA_FLAGS, "--linear-probe": "train.mode=linear_probe",
                                        "--eval": "train.mode=eval"})
    return run_job(FinetuneConfig, argv, __doc__, log, finetune,
                   expected=(UnknownDatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError,
                             DeviceError), parser=parser, shortcuts=shortcuts)

if __name__ == "__main__":
    from runtime.entry import run_as_script
    run_as_script(main, "fine-tuning")
