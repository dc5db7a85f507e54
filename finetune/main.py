"""Fine-tuning entry point: `torchrun finetune/main.py --dataset FI --checkpoint runs/pre [key=value ...]`."""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun finetune/main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.registry import UnknownDatasetError  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from runtime.checkpoint import CheckpointError  # noqa: E402
from runtime.device import DeviceError  # noqa: E402
from runtime.guard import NonFiniteLossError, StopRequest  # noqa: E402
from runtime.loop import run_job  # noqa: E402
from runtime.strategy import init_distributed_for  # noqa: E402

log = logging.getLogger("finetune")


def finetune(cfg: FinetuneConfig, stop: StopRequest) -> int:
    env = init_distributed_for("ddp", cfg.run.dist_timeout_s, cfg.run.device, cfg.train.precision)
    if cfg.train.mode == "linear_probe":
        from finetune.linear_probe import LinearProbe
        LinearProbe(cfg, env).run()
    else:
        from finetune.data import patch_timm_posterize
        from finetune.engine import Finetuning
        patch_timm_posterize()
        Finetuning(cfg, env, stop).run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", help="shortcut for data.dataset=NAME")
    parser.add_argument("--data", help="shortcut for data.root=DIR (shards with info.json, or an image folder)")
    parser.add_argument("--checkpoint", help="shortcut for encoder.checkpoint=PATH")
    parser.add_argument("--from-scratch", action="store_true", help="shortcut for encoder.from_scratch=true")
    parser.add_argument("--linear-probe", action="store_true", help="shortcut for train.mode=linear_probe")
    args, rest = parser.parse_known_args(argv)
    shortcuts = [f"data.dataset={args.dataset}"] if args.dataset else []
    shortcuts += [f"data.root={args.data}"] if args.data else []
    shortcuts += [f"encoder.checkpoint={args.checkpoint}"] if args.checkpoint else []
    shortcuts += ["encoder.from_scratch=true"] if args.from_scratch else []
    shortcuts += ["train.mode=linear_probe"] if args.linear_probe else []
    return run_job(FinetuneConfig, rest + shortcuts, __doc__, log, finetune,
                   expected=(UnknownDatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError,
                             DeviceError))


if __name__ == "__main__":
    from runtime.loop import run_as_script
    run_as_script(main, "fine-tuning")
