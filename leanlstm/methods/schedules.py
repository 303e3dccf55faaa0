"""Pure schedule functions shared by methods: values of a hyperparameter as a function of the optimiser step."""
from __future__ import annotations

import math


def gradual_sparsity(step: int, final: float, initial: float = 0.0, begin: int = 0, end: int = 1,
                     every: int = 1, power: int = 3) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` for ``t0 <= t <= t0 + n dt``.

    ``begin`` is ``t0``, ``end`` is ``t0 + n dt`` and ``every`` is ``dt``: between pruning events the value
    holds (``t`` is rounded down to ``t0 + k dt``), and it is clamped outside: ``initial`` before ``begin``,
    exactly ``final`` from ``end`` on. Sparsity rises fast at first, when there are many redundant weights,
    and slowly near the end, leaving training time to recover.

    >>> [round(gradual_sparsity(t, 0.9, begin=0, end=10), 4) for t in (0, 5, 10, 20)]
    [0.0, 0.7875, 0.9, 0.9]
    """
    if end <= begin:
        return initial if step < begin else final
    if step >= end:
        return final
    if step <= begin:
        return initial
    every = max(int(every), 1)
    step = begin + (step - begin) // every * every
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** power


def phase_steps(fraction: float, total: int) -> int:
    """The optimiser step a fraction of a phase of ``total`` steps falls on (rounded to nearest)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a fraction of the phase must lie in [0, 1], got {fraction}")
    return min(math.floor(fraction * total + 0.5), total)
