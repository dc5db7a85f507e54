"""Reading a shard's members grouped by sample key, outside the training pipeline (verify, caches, tools)."""
import tarfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

Members = Dict[str, Dict[str, bytes]]  # key -> {extension: bytes}


def read_tar(path: Union[str, Path]) -> Tuple[Members, Optional[str]]:
    """(members in file order, error or None): a truncated tar yields the members before the break."""
    members: Members = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = Path(m.name).name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        return members, f"{type(e).__name__}: {e}"
    return members, None
