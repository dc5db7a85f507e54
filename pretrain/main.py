"""Pretraining entry point: `torchrun pretrain/main.py --config FILE key=value ...` (or python -m pretrain.main)."""
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (torchrun pretrain/main.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.config import PretrainConfig  # noqa: E402
from runtime import distributed  # noqa: E402
from runtime.config import ConfigError, parse_cli  # noqa: E402
from runtime.launcher_watch import exit_with_launcher  # noqa: E402

log = logging.getLogger("pretrain")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg, _ = parse_cli(PretrainConfig, argv, description=__doc__)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = distributed.resolve_env()
    distributed.setup_logging(env.rank)
    exit_with_launcher(env.launcher)
    from pretrain.engine import Pretraining, EXIT_STOPPED
    from runtime.checkpoint import CheckpointError
    from runtime.guard import NonFiniteLossError
    try:
        outcome = Pretraining(cfg).run()
        distributed.shutdown(wait_for_peers=True)
    except (NonFiniteLossError, CheckpointError, FileNotFoundError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 3
    except ValueError:
        log.exception("bad input")
        return 3
    finally:
        distributed.shutdown()
    return EXIT_STOPPED if outcome["stopped"] else 0


if __name__ == "__main__":
    from runtime.loop import run_as_script
    run_as_script(main, "pretraining")
