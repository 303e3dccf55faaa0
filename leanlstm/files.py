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
    """Write ``data`` as JSON; NaN and infinities are refused (``ValueError``): JSON has no such numbers."""
    text = json.dumps(data, indent=2, allow_nan=False)
    atomic_write(path, lambda handle: handle.write((text + "\n").encode()))


class FileProblem(ValueError):
    """A file cannot be read or written as asked; the message names it and says what to do."""


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed raises ``FileProblem`` naming it, the problem
    and ``fix`` (what the user can do about it).

    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "config.json"
    >>> _ = bad.write_text("{")
    >>> read_json(bad, "restore it")
    Traceback (most recent call last):
    ...
    leanlstm.files.FileProblem: .../config.json is not valid JSON (line 1, column 2: Expecting ...); restore it
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise FileProblem(f"cannot read {path} ({reason}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FileProblem(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                          f"{fix}") from None


def check_writable(path: str | os.PathLike, option: str, file: bool = False) -> None:
    """Refuse an output path that cannot be created, before any work: the nearest existing folder at or above it
    (above it, for a ``file``) must take a new file (tried with an unnamed temporary file, which is what counts
    for root too, and leaves nothing behind).

    >>> check_writable("/proc/leanlstm/out", "--out")
    Traceback (most recent call last):
    ...
    leanlstm.files.FileProblem: --out /proc/leanlstm/out cannot be written: ...; choose another --out
    """
    path = Path(path).absolute()
    existing = next(p for p in (path.parents if file else (path, *path.parents)) if p.exists())
    if not existing.is_dir():
        raise FileProblem(f"{option} {path} cannot be written: {existing} is a file, not a folder; choose another "
                          f"{option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise FileProblem(f"{option} {path} cannot be written: {existing}: {error.strerror or error}; choose "
                          f"another {option}") from None
