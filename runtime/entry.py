"""What owns a trainer's process: command line -> config, logging per rank, the launcher watch, signal handlers,
the process group and the exit status."""
import argparse
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence, Tuple

from runtime import distributed
from runtime.cli import Shortcuts, name_flags, parse_cli
from runtime.config import ConfigError
from runtime.device import resolve_device
from runtime.guard import StopRequest
from runtime.launcher_watch import exit_with_launcher
from runtime.logs import setup_logging


def run_as_script(main: Callable[[], int], what: str) -> None:
    """A trainer's `__main__`: exit with main()'s status; a second Ctrl-C exits 130 in one line; on an unexpected
    error, log it and leave at once (Python's normal exit would wait on data-loader workers that no one told to
    stop)."""
    try:
        status = main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        logging.getLogger(what).error("%s interrupted by a second Ctrl-C: stopped without a checkpoint (the last "
                                      "complete one stays the resume point)", what)
        logging.shutdown()
        os._exit(StopRequest.EXIT_INTERRUPTED)
    except BaseException:
        logging.getLogger(what).exception("%s failed", what)
        logging.shutdown()
        os._exit(1)
    raise SystemExit(status)


def run_job(schema: type, argv: Optional[Sequence[str]], description: str, log: logging.Logger,
            job: Callable[[Any, StopRequest], int], expected: Tuple[type, ...] = (),
            traced: Tuple[type, ...] = (), parser: Optional[argparse.ArgumentParser] = None,
            shortcuts: Optional[Shortcuts] = None) -> int:
    """A trainer's main(): its config from the command line (`--help` exits 0 and a usage error 2, as argparse's
    do; a config error exits 2), logging per rank, the launcher watch, the SIGTERM/SIGUSR1/SIGINT handlers (a stop
    request at the next sync point), then job(cfg, stop) -> exit status; the job starts its process group itself.
    `parser` may declare the job's own flags, and `shortcuts(args)` turns them into overrides. Errors in
    `expected` are bad input, logged in one line, and those in `traced` with their traceback; both exit 3. The
    process group is shut down on every path."""
    try:
        cfg, _ = parse_cli(schema, argv, description=description, parser=parser, shortcuts=shortcuts)
    except SystemExit as e:  # argparse has printed the help or the usage error
        return e.code if isinstance(e.code, int) else 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = distributed.resolve_env()
    setup_logging(env.rank)
    exit_with_launcher(env.launcher)
    stop = StopRequest().install()
    try:
        status = job(cfg, stop)
        distributed.shutdown(wait_for_peers=True)
        return stop.exit_status(status)
    except expected + traced as e:
        if isinstance(e, expected):
            log.error("%s: %s", type(e).__name__, name_flags(str(e), getattr(shortcuts, "typed_as", {})))
        else:
            log.exception("bad input")
        return 3
    finally:
        stop.uninstall()
        distributed.shutdown()


def init_distributed_for(strategy: str, timeout_s: int = 1800, device: str = "auto",
                         precision: str = "auto") -> distributed.DistEnv:
    """The process group a run needs, on the device it will train on (run.device, resolved first: a GPU asked for
    and missing is an error before anything starts). DeepSpeed wants a group even for a single process, and is
    imported before it starts (imported later, it keeps the group alive past shutdown; see
    distributed.init_distributed)."""
    env = distributed.resolve_env()
    deepspeed = strategy == "deepspeed"
    return distributed.init_distributed(env, timeout_s, always=deepspeed,
                                        libraries=("deepspeed",) if deepspeed else (),
                                        device=resolve_device(env, device, precision))
