"""Files written atomically: a reader, or a run resumed after a crash, sees the old file or the new one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it into place.

    An interruption leaves either the old file or the new one, never half of one (a hard kill may also leave
    the temporary ``.NAME.*.tmp``; ``leftover_temp_files`` finds those). The file gets the permissions a
    plain ``open`` would give it, not ``mkstemp``'s owner-only ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def leftover_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Temporary files ``atomic_write`` left in ``directory`` when its process was killed mid-write."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write((json.dumps(data, indent=2) + "\n").encode()))
