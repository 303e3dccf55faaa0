"""Checkpoints: ``state_dict`` + config + format version, written atomically. Modules are never pickled."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message says what to do."""


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it into place.

    An interruption leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write((json.dumps(data, indent=2) + "\n").encode()))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save({"format_version": FORMAT_VERSION, **payload}, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise CheckpointError(f"{path} is corrupt or not a leanlstm checkpoint ({type(error).__name__}: "
                              f"{str(error)[:200]}). Restore it from a backup or start a new run.") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a leanlstm checkpoint (no format version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload['format_version']}, this leanlstm reads "
                              f"format {FORMAT_VERSION}; use the leanlstm version that wrote it")
    return payload


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict`` with a clear error when the checkpoint belongs to another model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not match this model: {str(error).splitlines()[0]} "
                              f"(was it written for another preset or method?)") from error
