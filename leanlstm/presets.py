"""Presets by name, kept for scripts written before presets belonged to their task: these are PTB's.

New code asks the task: ``leanlstm.tasks.get_task("ptb").presets`` / ``.preset("small")``.
"""
from __future__ import annotations

from .tasks import get_task
from .tasks.base import Preset

PRESETS: dict[str, Preset] = get_task("ptb").presets


def get_preset(name: str, task: str = "ptb") -> Preset:
    """The preset ``name`` of ``task``; a clear error names the task that has it.

    >>> get_preset("tiny").train.epochs
    2
    """
    return get_task(task).preset(name)


__all__ = ["PRESETS", "Preset", "get_preset"]
