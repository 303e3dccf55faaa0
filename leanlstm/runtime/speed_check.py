"""No silent slow-downs: whether each compressed matrix runs faster than its dense self, at batch 1.

A weight form that stores fewer bytes is not always faster: a matrix pruned only 1.5-3x runs its sparse
product (jagged diagonals: one gathered input per stored entry) slower than the dense panel product of the
same matrix, which streams every weight once in vector registers. ``check_speed(model)`` times every non-dense
matrix's product against the dense product of its shape on the leanlstm engine, the way the engine runs it
(``weight_ih`` batched over the sequence, the recurrent matrices one step at a time), and returns a
``SlowDown`` for each that is slower; the compression methods call it and log a warning such as::

    rnn.layers.0.weight_hh: pruned 3.0x runs 2.6 us against 1.0 us dense per step on leanlstm (batch 1)

``keep_dense_(model, slow)`` (or a method's ``keep_slow_dense=True``) turns those matrices back into dense ones,
so the model is never slower than dense. ``backend="onnxruntime"`` compares each layer's explicit recurrence
over its forms against the fused dense LSTM operator in ONNX Runtime instead (``runtime.onnx``).

A quick measurement: batch 1, the product repeated inside compiled code (no Python call per product) for about
``SAMPLE_SECONDS``, form and dense taking turns, ``repeats`` samples each, medians. Results are cached in the
process per (form type, shape, options, stored entries, batched), so a model of repeated shapes, or a method
that checks at the start and the end, measures each kind once.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from torch import nn

from ..graph import head_forms, lstm_forms
from ..nn import Dense, FormLinear, WeightForm
from . import kernels
from .cells import form_op
from .entry_points import generated_kernels

log = logging.getLogger(__name__)

BACKENDS = ("leanlstm", "onnxruntime")
SAMPLE_SECONDS = 2e-4        # one timed sample: well above the timer's resolution, short enough to repeat
SEQUENCE = 35                # steps of the batched input product (the latency benchmarks' sequence length)
_TIMINGS: dict[tuple, "Timing"] = {}
_ENABLED = [True]

_REPEAT_VEC = """
@njit(**OPTIONS)
def repeat_vec(arrays, x, out, times):
    for k in range(times):
        once_vec(arrays, x, out, (k & 1) == 1)
"""
_REPEAT_MAT = """
@njit(**OPTIONS)
def repeat_mat(arrays, xs, out, times):
    for k in range(times):
        once_mat(arrays, xs, out)
"""


@dataclass(frozen=True)
class Timing:
    """Median microseconds per time step of one matrix's product in its form and dense."""

    us: float
    dense_us: float

    @property
    def slower(self) -> bool:
        return self.us > self.dense_us


@dataclass(frozen=True)
class SlowDown:
    """A matrix whose form runs slower than the dense matrix would, on ``backend``.

    >>> str(SlowDown("layers.0.weight_hh", "pruned", 3.0, 26.0, 10.0, "leanlstm"))
    'layers.0.weight_hh: pruned 3.0x runs 26.0 us against 10.0 us dense per step on leanlstm (batch 1)'
    """

    name: str              # qualified matrix name ("rnn.layers.0.weight_hh"), or a layer's for onnxruntime
    form: str              # what it is: "pruned", "doped kronecker", "lowrank", ...
    compression: float     # dense bytes over the bytes the form stores
    us: float              # the form's median, microseconds per time step
    dense_us: float        # the dense matrix's (or layer's) median
    backend: str

    def __str__(self) -> str:
        return (f"{self.name}: {self.form} {self.compression:.1f}x runs {self.us:.1f} us against "
                f"{self.dense_us:.1f} us dense per step on {self.backend} (batch 1)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "form": self.form, "compression": self.compression, "us": self.us,
                "dense_us": self.dense_us, "backend": self.backend}


def describe(form: WeightForm) -> str:
    """How a form is named in messages: ``"pruned"`` for a masked-sparse matrix, ``"doped <structure>"``, else the
    form's name.

    >>> from leanlstm.nn.forms import MaskedSparse
    >>> describe(MaskedSparse(4, 4))
    'pruned'
    """
    if form.name == "sparse":
        return "pruned"
    structured = getattr(form, "structured", None)
    return f"{form.name} {structured.name}" if structured is not None else form.name


@contextlib.contextmanager
def speed_checks_off() -> Iterator[None]:
    """Skip every speed check inside (``check_forms`` returns nothing): profiling sweeps, exports, tests."""
    before = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = before


def checks_enabled() -> bool:
    return _ENABLED[0]


# --- timing one matrix on the engine ---------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _repeaters(matvec: Any, matmat: Any) -> Any:
    """Kernels that run one op's product ``times`` times in compiled code (disk-cached, as every engine kernel)."""
    body, named = _REPEAT_VEC, {"once_vec": matvec}
    if matmat is not None:
        body, named = body + _REPEAT_MAT, named | {"once_mat": matmat}
    return generated_kernels(body, named, {}, kernels.JIT)


def _runner(op: kernels.RuntimeOp, shape: tuple[int, int], batched: bool):
    """``run(times)`` and the time steps one repetition covers: the sequence product when the engine batches this
    matrix over time (and the op can), else one step's product."""
    repeat = _repeaters(op.matvec, op.matmat)
    rng = np.random.default_rng(0)
    if batched and op.matmat is not None:
        xs = rng.standard_normal((SEQUENCE, shape[1])).astype(np.float32)
        out = np.zeros((SEQUENCE, shape[0]), np.float32)
        return (lambda times: repeat.repeat_mat(op.arrays, xs, out, times)), SEQUENCE
    x = rng.standard_normal(shape[1]).astype(np.float32)
    out = np.zeros(shape[0], np.float32)
    # the engine multiplies an input matrix without matmat step by step, as this does
    return (lambda times: repeat.repeat_vec(op.arrays, x, out, times)), 1


def _calibrated(run, steps: int) -> tuple[Any, int]:
    run(1)                                              # compiles or loads the kernel
    start = time.perf_counter()
    run(4)
    once = max((time.perf_counter() - start) / 4, 1e-9)
    return run, max(1, math.ceil(SAMPLE_SECONDS / once))


def _interleaved(runs: list[tuple[Any, int, int]], repeats: int) -> list[float]:
    """Median us per step of each ``(run, times, steps)``, taking turns in a rotating order."""
    samples: list[list[float]] = [[] for _ in runs]
    for repeat in range(repeats):
        order = list(range(len(runs)))
        order = order[repeat % len(runs):] + order[:repeat % len(runs)]
        for index in order:
            run, times, steps = runs[index]
            start = time.perf_counter_ns()
            run(times)
            samples[index].append((time.perf_counter_ns() - start) / 1e3 / times / steps)
    return [float(np.median(values)) for values in samples]


def _key(form: WeightForm, batched: bool) -> tuple:
    sparse = form if hasattr(form, "nnz") else getattr(form, "sparse", None)       # a sparse form or a doped D
    entries = sparse.nnz() if sparse is not None else None
    options = json.dumps(form.options(), sort_keys=True, default=str)
    return type(form).__name__, form.out_features, form.in_features, options, entries, batched


def time_form(form: WeightForm, batched: bool = False, repeats: int = 7) -> Timing:
    """Median us per time step of ``form``'s engine product and of a dense matrix of its shape, batch 1.

    ``batched``: the product runs over a whole sequence at once (the engine does this for ``weight_ih``); else one
    step at a time. Cached in the process per form type, shape, options, stored entries and ``batched``.

    >>> from leanlstm.nn.forms import MaskedSparse
    >>> import torch
    >>> timing = time_form(MaskedSparse.from_dense(torch.randn(64, 32), density=0.5))
    >>> timing.us > 0 and timing.dense_us > 0
    True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    key = _key(form, batched) + (repeats,)
    if key not in _TIMINGS:
        shape = (form.out_features, form.in_features)
        dense = kernels.dense_op(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
        runs = []
        for op in (form_op(form), dense):
            run, steps = _runner(op, shape, batched)
            run, times = _calibrated(run, steps)
            runs.append((run, times, steps))
        us, dense_us = _interleaved(runs, repeats)
        _TIMINGS[key] = Timing(us, dense_us)
    return _TIMINGS[key]


def time_ops(ops: list[kernels.RuntimeOp], shape: tuple[int, int], batched: bool = False, repeats: int = 5
             ) -> list[float]:
    """Median us per time step of each op's product of an ``(out, in)`` matrix, interleaved; e.g. a form's float32
    op against its int8 op, to keep the faster (``runtime.precision``)."""
    runs = []
    for op in ops:
        run, steps = _runner(op, shape, batched)
        run, times = _calibrated(run, steps)
        runs.append((run, times, steps))
    return _interleaved(runs, repeats)


# --- checking a model ------------------------------------------------------------------------------------------
def batched_over_time(name: str) -> bool:
    """Whether the engine multiplies matrix ``name`` over the whole sequence at once: a layer's input matrix, or
    a head's (``"decoder.weight"``: a ``FormLinear``)."""
    return name.endswith("weight_ih") or name == "weight" or name.endswith(".weight")


def check_forms(forms: Iterable[tuple[str, WeightForm]], backend: str = "leanlstm", warn: bool = True,
                repeats: int = 7) -> list[SlowDown]:
    """A ``SlowDown`` for every non-dense form in ``(name, form)`` pairs that runs slower than dense on the
    leanlstm engine; each is logged as a warning when ``warn``. Nothing while ``speed_checks_off()``."""
    if backend != "leanlstm":
        raise ValueError(f"check_forms times single matrices on the leanlstm engine; got backend {backend!r} "
                         f"(check_speed(model, backend='onnxruntime') times whole layers)")
    if not checks_enabled():
        return []
    slow = []
    for name, form in forms:
        if isinstance(form, Dense):
            continue
        timing = time_form(form, batched_over_time(name), repeats)
        log.debug("%s: %s %.2fx %.2f us, dense %.2f us per step", name, describe(form), form.compression(),
                  timing.us, timing.dense_us)
        if timing.slower:
            slow.append(SlowDown(name, describe(form), form.compression(), timing.us, timing.dense_us, backend))
    if warn:
        for found in slow:
            log.warning("%s; keep_slow_dense=True (or runtime.keep_dense_) keeps it dense", found)
    return slow


def check_speed(model: nn.Module, backend: str = "leanlstm", warn: bool = True, repeats: int = 7
                ) -> list[SlowDown]:
    """The compressed matrices of ``model`` (every ``leanlstm.LSTM`` in it) that run slower than dense at batch 1.

    ``backend="leanlstm"`` times each matrix's product on the engine; ``"onnxruntime"`` times each layer's
    explicit recurrence over its forms against the dense fused LSTM operator (one ``SlowDown`` per layer, named
    like ``rnn.layers.0``). With ``warn`` each slow-down is also logged as a warning.

    >>> import leanlstm
    >>> check_speed(leanlstm.LSTM(8, 16))          # dense matrices are never slower than themselves
    []
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for a speed check; known: {', '.join(BACKENDS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_speed takes an nn.Module, got {type(model).__name__}")
    if backend == "onnxruntime":
        from .onnx import layer_choices

        slow = [choice.slow_down() for choice in layer_choices(model, repeats=repeats) if choice.slower]
        if warn:
            for found in slow:
                log.warning("%s; export with structure='auto' writes it as the dense LSTM operator", found)
        return slow
    return check_forms(lstm_forms(model), backend, warn, repeats)


def keep_dense_(model: nn.Module, slow: Iterable[SlowDown | str]) -> list[str]:
    """Turn the named matrices of ``model`` (``SlowDown``s or qualified names) into dense forms computing the same
    matrix, in place; returns the names changed.

    >>> import leanlstm
    >>> lstm = leanlstm.LSTM(8, 16).replace_forms("sparse", density=0.5)
    >>> keep_dense_(lstm, ["layers.0.weight_hh"]), type(lstm.layers[0].weight_hh).__name__
    (['layers.0.weight_hh'], 'Dense')
    """
    names = {s.name if isinstance(s, SlowDown) else s for s in slow}
    forms = dict(lstm_forms(model)) | dict(head_forms(model))
    unknown = sorted(names - set(forms))
    if unknown:
        raise ValueError(f"no matrix named {', '.join(unknown)} in {type(model).__name__}; its matrices: "
                         f"{', '.join(forms) or 'none'}")
    changed = []
    for name in sorted(names):
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)                 # a cell layer, or a FormLinear head
        form = forms[name]
        if isinstance(form, Dense):
            continue
        weight = form.materialize().detach()
        dense = Dense.from_dense(weight.cpu().float()).to(weight.device)
        if isinstance(owner, FormLinear):
            owner.form = dense
        else:
            owner.set_form(attribute.removeprefix("weight_"), dense)
        changed.append(name)
    return changed
