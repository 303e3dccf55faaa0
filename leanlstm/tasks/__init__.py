"""Tasks: data sets, metrics and model heads. ``TASKS`` maps a task name to its builder."""
from __future__ import annotations

from .ptb import Corpus, LanguageModelTask, load_ptb


def build_ptb(data_dir, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1,
              max_tokens: int | None = None, verify: bool = True) -> LanguageModelTask:
    corpus = load_ptb(data_dir, verify=verify, max_tokens=max_tokens)
    return LanguageModelTask(corpus, batch_size, bptt, rank=rank, world_size=world_size)


TASKS = {"ptb": build_ptb}

__all__ = ["TASKS", "Corpus", "LanguageModelTask", "build_ptb", "load_ptb"]
