"""What every command-line tool (not a trainer) does with bad input: one line naming it, exit 2, no traceback."""
import sys
from typing import Callable, Tuple

from runtime.checkpoint import CheckpointError

BAD_INPUT: Tuple[type, ...] = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def with_one_line_errors(body: Callable[[], int], errors: Tuple[type, ...] = BAD_INPUT) -> int:
    """body()'s exit status; an error in `errors` (a missing file, a checkpoint that does not fit, a bad value) is
    printed as one line `error: ...` and exits 2."""
    try:
        return body()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
