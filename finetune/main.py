"""Fine-tuning entry point: `torchrun finetune/main.py --dataset FI --checkpoint runs/pre [key=value ...]`."""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun finetune/main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.config import FinetuneConfig  # noqa: E402
from runtime import distributed  # noqa: E402
from runtime.config import ConfigError, parse_cli  # noqa: E402
from runtime.launcher_watch import exit_with_launcher  # noqa: E402

log = logging.getLogger("finetune")


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
    try:
        cfg, _ = parse_cli(FinetuneConfig, rest + shortcuts, description=__doc__)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = distributed.resolve_env()
    distributed.setup_logging(env.rank)
    exit_with_launcher(env.launcher)
    from data_tools.registry import UnknownDatasetError
    from runtime.checkpoint import CheckpointError
    from runtime.guard import NonFiniteLossError
    try:
        if cfg.train.mode == "linear_probe":
            from finetune.linear_probe import LinearProbe
            LinearProbe(cfg).run()
        else:
            from finetune.engine import Finetuning
            Finetuning(cfg).run()
        distributed.shutdown(wait_for_peers=True)
    except (UnknownDatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 3
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    from runtime.loop import run_as_script
    run_as_script(main, "fine-tuning")
