"""A training process whose launcher dies exits at once: no orphaned ranks holding memory (and GPUs)."""
import ctypes
import logging
import os
import select
import signal
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

EXIT_LAUNCHER_GONE = 1
POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when the thread that forked it exits (for loader workers, which the
    trainer's main thread forks). False where prctl is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:
            pass


def _wait_for_exit(parent: int) -> None:
    """Block until `parent` has exited: in one poll() on a pidfd (Linux >= 5.3), else by polling getppid()."""
    try:
        fd = os.pidfd_open(parent)
    except (AttributeError, OSError):  # no pidfd here, or the parent is already gone
        fd = None
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():  # readable once the process has exited
            pass
        os.close(fd)
        return
    while os.getppid() == parent:
        time.sleep(POLL_S)


def _watch(parent: int, what: str) -> None:
    # the thread sleeps in one system call, never waking: a thread that keeps waking up to run Python code while
    # the trainer forks its loader workers was followed by workers that deadlocked inside CPython's fork
    _wait_for_exit(parent)
    log.error("%s (pid %d) is gone: exiting now, without a checkpoint (the last complete one stays the resume "
              "point)", what, parent)
    _flush_logs()
    os._exit(EXIT_LAUNCHER_GONE)  # from this thread: the main one may be blocked in a collective on a dead peer


def exit_with_launcher(launcher: str, what: Optional[str] = None) -> bool:
    """Start a daemon thread that ends this process when its parent (torchrun's agent, srun's step daemon, Ray's
    raylet) changes, i.e. has died. Only under a launcher (`launcher` != "single"): a run started from a shell may
    be meant to outlive it (nohup). UNIEMOX_EXIT_WITH_LAUNCHER=0 turns it off. Loader workers follow through
    `die_with_parent`. Returns whether the watch runs."""
    if launcher == "single" or os.environ.get("UNIEMOX_EXIT_WITH_LAUNCHER", "1") == "0":
        return False
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent, what or f"the {launcher} launcher"), name="launcher-watch",
                     daemon=True).start()
    return True
