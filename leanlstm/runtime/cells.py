"""The runtime's cell seam: how each recurrent cell runs in the engine and is written to ONNX.

A cell layer (``leanlstm.nn.cells.RecurrentLayer``, one direction of one layer) is looked up by its ``cell`` name.
A new cell registers its two halves once, e.g. in its own ``runtime/<cell>_cell.py``:

    register_cell("lstm", compile_layer=compile_lstm_layer, onnx_layer=lstm_onnx_layer, onnx_check=...)

- ``compile_layer(layer, name) -> CompiledLayer``: the arrays and kernels of one direction of one layer;
- ``onnx_layer(graph, layers, x, states, names, recurrence) -> (y, final_states)``: every direction of one layer
  in an ONNX graph (so a cell can use a fused bidirectional operator); ``x`` is (T, B, in), ``states`` per
  direction a tuple of (1, B, size) tensors or None (zeros), ``y`` (T, B, directions * output_size);
- ``onnx_check(layers, names, recurrence) -> list[str]``: the matrices that cannot be written (listed in one error).

A cell without an entry gets a clear ``EngineError`` / ``ExportError`` naming it. Nothing else in the runtime
knows which cells exist.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numba
import numpy as np

from . import kernels, precision
from .entry_points import specialise
from .kernels import RuntimeOp

log = logging.getLogger(__name__)

BUILTIN = ("leanlstm.runtime.lstm_cell", "leanlstm.runtime.hlstm_cell")    # modules that register the cells leanlstm ships


class EngineError(ValueError):
    """The model or an input cannot be run as given; the message names the part and the problem."""


class ExportError(ValueError):
    """The model cannot be written to ONNX as asked; the message names the part and what to do."""


class CompiledLayer(Protocol):
    """One direction of one layer, compiled: what ``compile_layer`` returns."""

    input_size: int
    output_size: int
    reverse: bool

    def state_sizes(self) -> tuple[int, ...]:
        """Sizes of the state parts, e.g. ``(h, c)``; the first part is the output the next step reads."""

    def run(self, xs: np.ndarray, state: Sequence[np.ndarray]) -> np.ndarray:
        """Outputs (T, output_size) for inputs (T, input_size), in time order (a reverse layer runs backwards);
        the state arrays are updated in place."""

    def step(self, x: np.ndarray, state: Sequence[np.ndarray]) -> np.ndarray:
        """One step: updates the state in place and returns the output (valid until the next call)."""

    def nbytes(self) -> int:
        """Bytes of every array the layer multiplies by."""


class KernelLayer:
    """``run`` and ``step`` of a compiled layer whose state is (h, c), through two layer kernels: ``run_kernel(*run_args,
    xs, h, c, out, reverse)`` and ``step_kernel(*step_args, x, h, c)``. A subclass sets both kernels and, once, the
    argument tuples ``_run_args`` / ``_step_args`` (every argument but the data: building them per call cost about
    0.3 us a step of a stream) and ``_run = _step = None``; each kernel is bound on first use (compiled, about a
    second, or loaded from the disk cache: ``entry_points.specialise``)."""

    run_kernel: Any
    step_kernel: Any

    def run(self, xs: np.ndarray, state: Sequence[np.ndarray]) -> np.ndarray:
        h, c = state
        out = np.empty((xs.shape[0], self.output_size), np.float32)
        if self._run is None:
            self._run, self._run_args = specialise(self.run_kernel, self._run_args, xs, h, c, out, self.reverse)
        self._run(*self._run_args, xs, h, c, out, self.reverse)
        return out

    def step(self, x: np.ndarray, state: Sequence[np.ndarray]) -> np.ndarray:
        h, c = state
        if self._step is None:
            self._step, self._step_args = specialise(self.step_kernel, self._step_args, x, h, c)
        self._step(*self._step_args, x, h, c)
        return h


@dataclass(frozen=True)
class CellRuntime:
    compile_layer: Callable[..., CompiledLayer] | None = None
    onnx_layer: Callable[..., Any] | None = None
    onnx_check: Callable[..., list[str]] | None = None


CELL_RUNTIMES: dict[str, CellRuntime] = {}


def register_cell(cell: str, **parts: Callable | None) -> None:
    """Register (or complete) the runtime of cell ``cell``: ``compile_layer``, ``onnx_layer``, ``onnx_check``.

    >>> register_cell("test-cell", compile_layer=lambda layer, name: layer)
    >>> CELL_RUNTIMES["test-cell"].onnx_layer is None
    True
    >>> del CELL_RUNTIMES["test-cell"]
    """
    unknown = set(parts) - set(CellRuntime.__dataclass_fields__)
    if unknown:
        raise TypeError(f"register_cell takes {', '.join(CellRuntime.__dataclass_fields__)}, not "
                        f"{', '.join(sorted(unknown))}")
    CELL_RUNTIMES[cell] = replace(CELL_RUNTIMES.get(cell, CellRuntime()), **parts)


def cell_part(layer: Any, part: str, name: str, error: type[Exception]) -> Callable:
    """The registered ``part`` (e.g. ``"compile_layer"``) of ``layer``'s cell, or ``error`` naming the cell."""
    _load_builtin()
    cell = getattr(layer, "cell", None)
    found = getattr(CELL_RUNTIMES.get(cell), part, None) if cell in CELL_RUNTIMES else None
    if found is None:
        purpose = "engine step" if part == "compile_layer" else "ONNX step"
        raise error(f"{name}: leanlstm.runtime has no {purpose} for cell {cell!r} ({type(layer).__name__}); a cell "
                    f"runs once it is registered with leanlstm.runtime.cells.register_cell({cell!r}, {part}=...)")
    return found


def _load_builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def bind(dispatcher: Any, *example: Any) -> Callable:
    """The compiled entry point of ``dispatcher`` for the types of ``example``.

    Calling it skips Numba's per-call type dispatch (about 6 us with function-valued arguments, more than
    a whole step of a small LSTM). It does not check types: callers pass arrays of the example's types.
    """
    return dispatcher.compile(tuple(numba.typeof(value) for value in example))


def form_op(form: Any, name: str = "weight") -> RuntimeOp:
    """The form's ``runtime_op()``, or, if it has none, its dense ``materialize()`` with a logged warning. Under
    a lower ``precision.precision(...)`` the form's op in it where one is registered, else its float32 op."""
    wanted = precision.current_precision()
    if wanted != "float32":
        low = precision.op_in(wanted, form)
        if low is None:
            log.info("%s: weight form %s has no %s op; it runs in float32", name, type(form).__name__, wanted)
        elif precision.current_choice() == "always":
            return low
        else:
            return _faster(low, _float_op(form, name), form, name, wanted)
    return _float_op(form, name)


def _faster(low: RuntimeOp, full: RuntimeOp, form: Any, name: str, wanted: str) -> RuntimeOp:
    """The faster of a form's low-precision and float32 ops, timed here: a small factor's int8 product can lose to
    float32 (the per-call quantisation of its input costs more than its few multiply-adds), as AntMan's rank-10 ones
    did (21.5 against 11.9 us per step for a 2x650 stack at 50x)."""
    from .speed_check import batched_over_time, checks_enabled, time_ops   # it imports this module

    if not checks_enabled():
        return low
    shape = (form.out_features, form.in_features)
    low_us, full_us = time_ops([low, full], shape, batched_over_time(name))
    if low_us <= full_us:
        return low
    log.info("%s: %s runs %.2f us against %.2f us in float32 per step; kept in float32", name, wanted, low_us, full_us)
    return full


def _float_op(form: Any, name: str) -> RuntimeOp:
    try:
        op = form.runtime_op()
    except NotImplementedError:
        op = None
    if op is None:
        log.warning("%s: weight form %s has no runtime op; running it as a dense %dx%d matrix", name,
                    type(form).__name__, form.out_features, form.in_features)
        return kernels.dense_op(form.materialize().detach().cpu().numpy())
    if not (hasattr(op, "arrays") and hasattr(op, "matvec")):
        raise EngineError(f"{name}: {type(form).__name__}.runtime_op() returned {type(op).__name__}, "
                          f"not a RuntimeOp (arrays, matvec, matmat)")
    return op
