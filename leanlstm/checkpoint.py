"""Checkpoints: ``state_dict`` + config + format version, written atomically. Modules are never pickled."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message says what to do."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save({"format_version": FORMAT_VERSION, **payload}, handle))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise CheckpointError(f"{path} is corrupt or not a leanlstm checkpoint ({_reason(error)}). Restore it from "
                              f"a backup or start a new run.") from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a leanlstm checkpoint (no format version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {payload['format_version']}, this leanlstm reads "
                              f"format {FORMAT_VERSION}; use the leanlstm version that wrote it")
    return payload


def _reason(error: Exception) -> str:
    """The first line of a load error. PyTorch's advice to retry with ``weights_only=False`` is replaced: that
    unpickles the file, which runs whatever code it holds, and leanlstm checkpoints never need it."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "weights_only" in str(error):
        return (f"{type(error).__name__}: it holds Python objects besides tensors and plain data, which leanlstm "
                f"checkpoints never do. Do not load it with torch.load(weights_only=False) unless you trust where "
                f"it came from: that runs arbitrary code from the file")
    return f"{type(error).__name__}: {text[:200]}"


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict`` with a clear error when the checkpoint belongs to another model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not match this model: {str(error).splitlines()[0]} "
                              f"(was it written for another preset or method?)") from error
