"""Console logging for the command-line tools: one format everywhere, the rank in each line of a distributed job."""
import logging
from typing import Optional


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: Optional[int] = None, all_ranks: bool = False, level: int = logging.INFO) -> None:
    """Console logging. With a rank (a training job): the rank in each line, and ranks other than 0 only warn
    unless all_ranks. Without (a single-process tool): time, logger and message."""
    handler = logging.StreamHandler()
    if rank is None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.addFilter(_RankFilter(rank))
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if not rank or all_ranks else max(level, logging.WARNING))
