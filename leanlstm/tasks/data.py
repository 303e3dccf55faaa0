"""Where data sets live, and how a missing file is fetched and verified.

The data directory is, in order: an explicit argument (``--data-dir``), ``$LEANLSTM_DATA``, or a per-user
cache (``$XDG_CACHE_HOME/leanlstm``, default ``~/.cache/leanlstm``).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from ..files import atomic_write

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data file is missing, truncated or corrupt; the message says what to do."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get("LEANLSTM_DATA"):
        return Path(os.environ["LEANLSTM_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "leanlstm"


def find_file(directory: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` inside ``directory``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_text(path: Path) -> str:
    """Text of a plain or gzip-compressed file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}. The file looks truncated or corrupt; delete it so that "
                        f"it is downloaded again, or replace it with a good copy.") from error


def md5_of(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def download(url: str, destination: Path, expected_md5: str | None = None) -> Path:
    """Download ``url`` to ``destination`` atomically, with a progress bar and an md5 check."""
    log.info("downloading %s to %s", url, destination)

    def fetch(out) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if expected_md5 is not None and digest.hexdigest() != expected_md5:
            raise DataError(f"download of {url} has md5 {digest.hexdigest()}, expected {expected_md5}; "
                            f"try again later or place the file in {destination.parent} by hand")

    try:
        atomic_write(destination, fetch)
    except OSError as error:
        raise DataError(f"could not download {url} ({error}). Without network access, put the file in "
                        f"{destination.parent} or point --data-dir / LEANLSTM_DATA at a copy.") from error
    return destination
