"""Tasks: data sets, metrics, models and presets, one file each, registered by name (see ``tasks.base``).

>>> get_task("ptb").metric, get_task("ptb").higher_is_better, "small" in get_task("ptb").presets
('ppl', False, True)
"""
from __future__ import annotations

from .base import (BUILTIN_TASKS, TASKS, DataConfig, Preset, Task, TaskError, get_task, register_task,
                   task_names)
from .ptb import Corpus, LanguageModelTask, LMTrainConfig, load_ptb


def build_ptb(data_dir, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1,
              max_tokens: int | None = None, verify: bool = True) -> LanguageModelTask:
    """The PTB task from plain arguments (scripts and tests; runs use ``get_task("ptb").load``)."""
    train = LMTrainConfig(batch_size=batch_size, bptt=bptt)
    return LanguageModelTask.load(DataConfig(data_dir, max_tokens, verify), train, rank, world_size)


__all__ = ["BUILTIN_TASKS", "TASKS", "Corpus", "DataConfig", "LMTrainConfig", "LanguageModelTask", "Preset", "Task",
           "TaskError", "build_ptb", "get_task", "load_ptb", "register_task", "task_names"]
