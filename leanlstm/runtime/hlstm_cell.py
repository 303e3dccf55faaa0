"""The H-LSTM cell in the runtime (``leanlstm.nn.hlstm``): its engine layer (Numba kernels) and its ONNX step,
registered as ``"hlstm"``.

Both follow ``HLSTMLayer.forward`` in inference (gate dropout off):

    z   = ReLU(W1_ih x_t + W1_hh h_{t-1} + b1)           (sum of the gate widths), split gate by gate
    k_t = W2_k z_k + b2_k  for k in (i, f, g, o);  c = sigmoid(f) c + sigmoid(i) tanh(g);  h = sigmoid(o) tanh(c)

Each of the six matrices multiplies through its own form's op (a grow-and-prune mask runs sparse), and the
input half of the first layer runs for the whole sequence in one product before the loop, as in the LSTM.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from ..nn.gates import GATES, NUM_GATES
from ..nn.hlstm import SECOND, HLSTMLayer
from . import kernels
from .cells import EngineError, ExportError, KernelLayer, form_op, register_cell
from .kernels import RuntimeOp
from .lstm_cell import missing_onnx_products, scan_layer


# --- kernels -------------------------------------------------------------------------------------------------
# Inlined into the layer loops: its kernel arguments then stay compile-time constants there, which keeps the
# loops cacheable (``entry_points.specialise``); passed on as values they would not be.
@njit(inline="always", fastmath=True, error_model="numpy", nogil=True)
def _hidden_and_gates(hh_matvec, hh_arrays, i2_matvec, i2_arrays, f2_matvec, f2_arrays, g2_matvec, g2_arrays,
                      o2_matvec, o2_arrays, bias_2, bounds, first, h, c, hidden, gates, flip):
    """One step after the input product ``first`` (bias_1 included): the gates' hidden layer into ``hidden``,
    the four second layers into ``gates``, then the LSTM state update of ``h``, ``c``."""
    hidden[:] = first
    hh_matvec(hh_arrays, h, hidden, flip)
    for j in range(hidden.shape[0]):
        hidden[j] = max(hidden[j], np.float32(0.0))
    gates[:] = bias_2
    size = h.shape[0]
    i2_matvec(i2_arrays, hidden[bounds[0]:bounds[1]], gates[:size], False)
    f2_matvec(f2_arrays, hidden[bounds[1]:bounds[2]], gates[size:2 * size], False)
    g2_matvec(g2_arrays, hidden[bounds[2]:bounds[3]], gates[2 * size:3 * size], False)
    o2_matvec(o2_arrays, hidden[bounds[3]:bounds[4]], gates[3 * size:], False)
    kernels.lstm_cell(gates, h, c)


@njit(fastmath=True, error_model="numpy", nogil=True)
def hlstm_layer_run(ih_matvec, ih_matmat, ih_arrays, hh_matvec, hh_arrays, i2_matvec, i2_arrays, f2_matvec,
                    f2_arrays, g2_matvec, g2_arrays, o2_matvec, o2_arrays, bias_1, bias_2, bounds, xs, h, c, out,
                    reverse):
    """``out[t]`` = h after step t for inputs ``xs`` (T, in); ``h``, ``c`` (H,) updated in place; ``reverse``
    runs over time backwards. ``bounds`` (5,): where each gate's part of the hidden layer starts and ends."""
    steps, width = xs.shape[0], bias_1.shape[0]
    first = kernels.input_products(ih_matvec, ih_matmat, ih_arrays, bias_1, xs)   # (T, sum w): the input half
    hidden, gates = np.empty(width, np.float32), np.empty(bias_2.shape[0], np.float32)
    for k in range(steps):
        t = steps - 1 - k if reverse else k
        _hidden_and_gates(hh_matvec, hh_arrays, i2_matvec, i2_arrays, f2_matvec, f2_arrays, g2_matvec, g2_arrays,
                          o2_matvec, o2_arrays, bias_2, bounds, first[t], h, c, hidden, gates, (k & 1) == 1)
        out[t] = h


@njit(fastmath=True, error_model="numpy", nogil=True)
def hlstm_layer_step(ih_matvec, ih_arrays, hh_matvec, hh_arrays, i2_matvec, i2_arrays, f2_matvec, f2_arrays,
                     g2_matvec, g2_arrays, o2_matvec, o2_arrays, bias_1, bias_2, bounds, x, h, c):
    """One time step of one layer: ``h``, ``c`` are updated in place."""
    first = bias_1.copy()
    ih_matvec(ih_arrays, x, first, False)
    _hidden_and_gates(hh_matvec, hh_arrays, i2_matvec, i2_arrays, f2_matvec, f2_arrays, g2_matvec, g2_arrays,
                      o2_matvec, o2_arrays, bias_2, bounds, first, h, c, np.empty_like(first),
                      np.empty(bias_2.shape[0], np.float32), False)


# --- the engine layer ----------------------------------------------------------------------------------------
@dataclass
class HLSTMRuntimeLayer(KernelLayer):
    """One direction of one H-LSTM layer as the engine runs it (``CompiledLayer``)."""

    run_kernel = staticmethod(hlstm_layer_run)
    step_kernel = staticmethod(hlstm_layer_step)

    input_size: int
    hidden_size: int
    reverse: bool
    ops: dict[str, RuntimeOp]       # ih, hh, i2, f2, g2, o2
    bias_1: np.ndarray              # (sum of widths,)
    bias_2: np.ndarray              # (4H,)
    bounds: np.ndarray              # (5,) int64: the gates' parts of the hidden layer

    def __post_init__(self) -> None:
        self.output_size = self.hidden_size
        second = [part for name in SECOND for part in (self.ops[name].matvec, self.ops[name].arrays)]
        ih, hh = self.ops["ih"], self.ops["hh"]
        tail = (*second, self.bias_1, self.bias_2, self.bounds)
        self._run_args = (ih.matvec, ih.matmat, ih.arrays, hh.matvec, hh.arrays, *tail)
        self._step_args = (ih.matvec, ih.arrays, hh.matvec, hh.arrays, *tail)
        self._run = self._step = None

    def state_sizes(self) -> tuple[int, int]:
        return self.hidden_size, self.hidden_size

    def nbytes(self) -> int:
        return sum(op.nbytes() for op in self.ops.values()) + self.bias_1.nbytes + self.bias_2.nbytes


def compile_hlstm_layer(layer: HLSTMLayer, name: str) -> HLSTMRuntimeLayer:
    """The engine layer of ``layer`` (``name``: its qualified name, for messages)."""
    widths, size, first = layer.widths, layer.hidden_size, sum(layer.widths)
    expected = {"ih": (first, layer.input_size), "hh": (first, size),
                **{name2: (size, width) for name2, width in zip(SECOND, widths)}}
    for matrix, shape in expected.items():      # the kernels multiply through raw addresses: refuse a mismatch
        actual = tuple(layer.form(matrix).shape)
        if actual != shape:
            raise EngineError(f"{name}: weight_{matrix} is {actual[0]}x{actual[1]}, the layer needs "
                              f"{shape[0]}x{shape[1]} (hidden size {size}, gate widths {list(widths)})")
    ops = {m: form_op(layer.form(m), f"{name}.weight_{m}") for m in layer.matrices}
    bias_1, bias_2 = np.zeros(first, np.float32), np.zeros(NUM_GATES * size, np.float32)
    if layer.bias:
        bias_1[:] = layer.bias_1.detach().cpu().float().numpy()
        bias_2[:] = layer.bias_2.detach().cpu().float().numpy()
    bounds = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    return HLSTMRuntimeLayer(layer.input_size, size, layer.reverse, ops, bias_1, bias_2, bounds)


# --- ONNX ----------------------------------------------------------------------------------------------------
def hlstm_onnx_check(layers: Sequence[HLSTMLayer], names: Sequence[str], recurrence: str) -> list[str]:
    """The matrices without an ONNX product. ONNX has no operator for this cell: it is always a Scan."""
    if recurrence == "lstm":
        raise ExportError(f"{names[0]}: recurrence='lstm' writes the ONNX LSTM operator, which cannot compute an "
                          f"H-LSTM's gate networks; use recurrence='auto' or 'scan'")
    return missing_onnx_products(layers, names)


def hlstm_onnx_layer(g: Any, layers: Sequence[HLSTMLayer], x: str, states: Sequence[tuple[str, str]] | None,
                     names: Sequence[str], recurrence: str) -> tuple[str, list[tuple[str, str]]]:
    """Every direction of one H-LSTM layer as a ``Scan`` over its step. x: (T, B, in) -> y (T, B, D * H)."""
    hlstm_onnx_check(layers, names, recurrence)
    outputs, finals = [], []
    for index, (layer, name) in enumerate(zip(layers, names)):
        with g.scope(name):
            bias = g.weight("bias_1", layer.bias_1) if layer.bias else None
            y, h_n, c_n = scan_layer(g, layer, x, *(states[index] if states else (None, None)), sum(layer.widths),
                                     bias, _step_gates)
        outputs.append(y)
        finals.append((h_n, c_n))
    return (outputs[0] if len(outputs) == 1 else g.node("Concat", outputs, axis=2)), finals


def _step_gates(body: Any, layer: HLSTMLayer, first: str, h: str, matvec: Any) -> dict[str, str]:
    """The four gates' pre-activations (B, H) of one step from the first layer's input half ``first``."""
    hidden = body.node("Relu", [body.node("Add", [first, matvec(body, layer.weight_hh, h, "weight_hh")])])
    parts = body.node("Split", [hidden, body.ints(list(layer.widths), "widths")], NUM_GATES, axis=1)
    biases = [None] * NUM_GATES
    if layer.bias:
        biases = body.node("Split", [body.weight("bias_2", layer.bias_2), body.ints([layer.hidden_size] * NUM_GATES,
                                                                                  "split")], NUM_GATES, axis=0)
    out = {}
    for gate, part, bias, matrix in zip(GATES, parts, biases, SECOND):
        product = matvec(body, layer.form(matrix), part, f"weight_{matrix}")
        out[gate] = body.node("Add", [product, bias]) if bias else product
    return out


register_cell(HLSTMLayer.cell, compile_layer=compile_hlstm_layer, onnx_layer=hlstm_onnx_layer,
              onnx_check=hlstm_onnx_check)
