"""The LSTM cell in the runtime: its engine layer (Numba kernels) and its ONNX step, registered as ``"lstm"``.

Both halves follow ``torch.nn.LSTM`` exactly: gates = W_ih x + W_hh h + b_ih + b_hh packed ``[i|f|g|o]``,
c = f*c + i*g, h = o*tanh(c), or with ``proj_size`` h = W_hr (o*tanh(c)); a ``reverse`` layer runs over time
backwards. Every matrix, ``weight_hr`` included, multiplies through its form's own structure.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..nn.cells import LSTMLayer
from ..nn.forms import Dense, WeightForm
from ..nn.gates import GATES, NUM_GATES
from . import kernels
from .cells import EngineError, ExportError, KernelLayer, form_op, register_cell
from .kernels import RuntimeOp

GATE_ACTIVATIONS = {"i": "Sigmoid", "f": "Sigmoid", "g": "Tanh", "o": "Sigmoid"}


# --- the engine layer ----------------------------------------------------------------------------------------
@dataclass
class LSTMRuntimeLayer(KernelLayer):
    """One direction of one LSTM layer as the engine runs it (``CompiledLayer``)."""

    run_kernel = staticmethod(kernels.layer_run)
    step_kernel = staticmethod(kernels.layer_step)

    input_size: int
    hidden_size: int
    output_size: int                 # proj_size or hidden_size
    reverse: bool
    ih: RuntimeOp
    hh: RuntimeOp
    hr: RuntimeOp | None             # the projection, or None
    bias: np.ndarray                 # bias_ih + bias_hh, (4H,)

    def __post_init__(self) -> None:
        projection = (None, ()) if self.hr is None else (self.hr.matvec, self.hr.arrays)
        self._run_args = (self.ih.matvec, self.ih.matmat, self.ih.arrays, self.hh.matvec, self.hh.arrays,
                          *projection, self.bias)
        self._step_args = (self.ih.matvec, self.ih.arrays, self.hh.matvec, self.hh.arrays, *projection, self.bias)
        self._run = self._step = None

    def state_sizes(self) -> tuple[int, int]:
        return self.output_size, self.hidden_size

    def nbytes(self) -> int:
        return sum(op.nbytes() for op in (self.ih, self.hh, self.hr) if op is not None) + self.bias.nbytes


def compile_lstm_layer(layer: LSTMLayer, name: str) -> LSTMRuntimeLayer:
    """The engine layer of ``layer`` (``name``: its qualified name, for messages)."""
    _check_shapes(layer, name)
    ops = {m: form_op(layer.form(m), f"{name}.weight_{m}") for m in layer.matrices}
    bias = np.zeros(NUM_GATES * layer.hidden_size, np.float32)
    if layer.bias_ih is not None:
        bias += (layer.bias_ih + layer.bias_hh).detach().cpu().float().numpy()
    return LSTMRuntimeLayer(layer.input_size, layer.hidden_size, layer.output_size, layer.reverse, ops["ih"],
                            ops["hh"], ops.get("hr"), bias)


def _check_shapes(layer: LSTMLayer, name: str) -> None:
    """Every matrix must fit the layer: the kernels multiply through raw addresses without bounds checks, where
    PyTorch would raise, so a mismatch (a form assigned by hand) must be refused here."""
    gates, size = NUM_GATES * layer.hidden_size, layer.hidden_size
    expected = {"ih": (gates, layer.input_size), "hh": (gates, layer.output_size), "hr": (layer.proj_size, size)}
    for matrix in layer.matrices:
        shape = tuple(layer.form(matrix).shape)
        if shape != expected[matrix]:
            want = expected[matrix]
            raise EngineError(f"{name}: weight_{matrix} is {shape[0]}x{shape[1]}, the layer needs {want[0]}x{want[1]} "
                              f"(hidden size {size}, input size {layer.input_size}, output size {layer.output_size})")
    for bias_name in ("bias_ih", "bias_hh"):
        bias = getattr(layer, bias_name)
        if bias is not None and tuple(bias.shape) != (gates,):
            raise EngineError(f"{name}: {bias_name} has shape {tuple(bias.shape)}, not ({gates},)")


# --- ONNX ------------------------------------------------------------------------------------------------------
def is_dense(layer: LSTMLayer) -> bool:
    """Whether the fused ONNX LSTM operator can run the layer: dense matrices, no projection (it has none)."""
    return not layer.proj_size and all(type(layer.form(m)) is Dense for m in ("ih", "hh"))


def _uses_lstm_op(layers: Sequence[LSTMLayer], names: Sequence[str], recurrence: str) -> bool:
    dense = all(is_dense(layer) for layer in layers)
    if recurrence == "scan" or (recurrence == "auto" and not dense):
        return False
    if not dense:
        kinds = "; ".join(f"{name}: " + ", ".join(f"weight_{m} is {type(layer.form(m)).__name__}"
                                                  for m in layer.matrices) for layer, name in zip(layers, names))
        raise ExportError(f"recurrence='lstm' writes the ONNX LSTM operator, which only takes dense weights and no "
                          f"projection, but {kinds}; use recurrence='auto' or 'scan' to export the structured "
                          f"products and projections as an explicit recurrence")
    return True


def lstm_onnx_check(layers: Sequence[LSTMLayer], names: Sequence[str], recurrence: str) -> list[str]:
    """The matrices an explicit recurrence would need an ONNX product for, and that have none."""
    if _uses_lstm_op(layers, names, recurrence):
        return []
    return missing_onnx_products(layers, names)


def missing_onnx_products(layers: Sequence[Any], names: Sequence[str]) -> list[str]:
    """The matrices of cell ``layers`` whose forms have no ONNX product (``WeightForm.onnx_matvec``)."""
    return [f"{name}.weight_{m} ({type(layer.form(m)).__name__})" for layer, name in zip(layers, names)
            for m in layer.matrices if type(layer.form(m)).onnx_matvec is WeightForm.onnx_matvec]


def lstm_onnx_layer(g: Any, layers: Sequence[LSTMLayer], x: str, states: Sequence[tuple[str, str]] | None,
                    names: Sequence[str], recurrence: str) -> tuple[str, list[tuple[str, str]]]:
    """Every direction of one LSTM layer: one fused LSTM node (``direction="bidirectional"`` for two) when the
    operator applies, else a ``Scan`` per direction. x: (T, B, in) -> y (T, B, D * out), [(h_n, c_n)] per direction,
    each (1, B, size)."""
    if _uses_lstm_op(layers, names, recurrence):
        with g.scope(names[0]):
            return _lstm_op(g, layers, x, states)
    outputs, finals = [], []
    for index, (layer, name) in enumerate(zip(layers, names)):
        with g.scope(name):
            bias = g.weight("bias", layer.bias_ih + layer.bias_hh) if layer.bias_ih is not None else None
            y, h_n, c_n = scan_layer(g, layer, x, *(states[index] if states else (None, None)),
                                     NUM_GATES * layer.hidden_size, bias, _lstm_gates)
        outputs.append(y)
        finals.append((h_n, c_n))
    return (outputs[0] if len(outputs) == 1 else g.node("Concat", outputs, axis=2)), finals


def _lstm_op(g: Any, layers: Sequence[LSTMLayer], x: str, states: Sequence[tuple[str, str]] | None
             ) -> tuple[str, list[tuple[str, str]]]:
    """The fused ONNX LSTM operator. Its output is (T, D, B, H); the state (D, B, H) in direction order."""
    from .onnx import onnx_gate_order

    directions = len(layers)
    stacked = lambda f: torch.stack([onnx_gate_order(f(layer)) for layer in layers])  # noqa: E731 - (D, ...)
    w = g.weight("W", stacked(lambda layer: layer.weight_ih.materialize()))           # (D, 4H, in)
    r = g.weight("R", stacked(lambda layer: layer.weight_hh.materialize()))           # (D, 4H, H)
    bias = ""
    if layers[0].bias_ih is not None:
        bias = g.weight("B", torch.stack([torch.cat([onnx_gate_order(layer.bias_ih), onnx_gate_order(layer.bias_hh)])
                                          for layer in layers]))                       # (D, 8H)
    inputs = [x, w, r, bias]
    if states:
        h0, c0 = ([s[part] for s in states] for part in (0, 1))
        h0, c0 = (parts[0] if directions == 1 else g.node("Concat", parts, axis=0) for parts in (h0, c0))
        inputs += ["", h0, c0]                                                         # "" skips sequence_lens
    while not inputs[-1]:
        inputs.pop()
    direction = "bidirectional" if directions == 2 else "forward"
    y, h_n, c_n = g.node("LSTM", inputs, 3, hidden_size=layers[0].hidden_size, direction=direction)
    if directions == 1:
        return g.node("Squeeze", [y, g.ints([1], "axes")]), [(h_n, c_n)]              # (T, 1, B, H) -> (T, B, H)
    y = g.node("Transpose", [y], perm=[0, 2, 1, 3])                                   # (T, B, 2, H)
    y = g.node("Reshape", [y, g.ints([0, 0, -1])])                                    # (T, B, 2H): [fwd | rev]
    split = g.ints([1, 1], "split")
    h_parts, c_parts = (g.node("Split", [s, split], 2, axis=0) for s in (h_n, c_n))
    return y, list(zip(h_parts, c_parts))


def matvec(g: Any, form: WeightForm, x: str, name: str) -> str:
    """``x @ W.T`` through the form's own ONNX product. x: (N, in) -> (N, out)."""
    with g.scope(name):
        return form.onnx_matvec(g, x)


def scan_layer(g: Any, layer: Any, x: str, h0: str | None, c0: str | None, first_rows: int, bias: str | None,
               gates: Any) -> tuple[str, str, str]:
    """An explicit recurrence of a cell with an LSTM's state update, over its forms' products (and the
    projection, if the layer has one). x: (T, B, in); h0 (1, B, out), c0 (1, B, H) -> y (T, B, out), h_n, c_n.

    ``first_rows``: the rows of ``weight_ih`` (4H for an LSTM); ``bias``: added to its product. ``gates(body,
    layer, first, h, matvec) -> {gate: (B, H)}`` gives the pre-activations of i, f, g, o from ``first`` (the
    step's input product plus bias) and the previous h.

    The input-to-hidden product runs before the loop, over all T*B rows at once, unless the form says a
    batched product does not pay (``onnx_batch_over_time``): a gather-based sparse product gains no speed
    from batching and would hold a (T*B, nnz) intermediate, so it runs inside the loop, one step at a time.
    A reverse layer scans its input from the end and writes its outputs from the end (ONNX Scan directions).
    """
    hidden, out = layer.hidden_size, layer.output_size
    time_batch = g.node("Slice", [g.node("Shape", [x]), g.ints([0]), g.ints([2])])           # [T, B]
    batched = layer.weight_ih.onnx_batch_over_time
    scanned = x                                                                              # (T, B, in)
    if batched:
        flat = g.node("Reshape", [x, g.ints([-1, layer.input_size])])                        # (T*B, in)
        scanned = matvec(g, layer.weight_ih, flat, "weight_ih")                              # (T*B, rows)
        scanned = g.node("Add", [scanned, bias]) if bias else scanned
        shape = g.node("Concat", [time_batch, g.ints([first_rows])], axis=0)
        scanned = g.node("Reshape", [scanned, shape])                                        # (T, B, rows)
    if h0 is None:
        batch = g.node("Slice", [time_batch, g.ints([1]), g.ints([2])])
        h0, c0 = (g.node("ConstantOfShape", [g.node("Concat", [batch, g.ints([size])], axis=0)])
                  for size in (out, hidden))                                                 # (B, out), (B, H)
    else:
        h0, c0 = (g.node("Squeeze", [s, g.ints([0], "axes")]) for s in (h0, c0))
    body = _step_body(g, layer, batched, bias, first_rows, gates)
    direction = [1] if layer.reverse else [0]
    h_n, c_n, y = g.node("Scan", [h0, c0, scanned], 3, body=body, num_scan_inputs=1,
                         scan_input_directions=direction, scan_output_directions=direction)
    h_n, c_n = (g.node("Unsqueeze", [s, g.ints([0], "axes")]) for s in (h_n, c_n))
    return y, h_n, c_n


def _step_body(g: Any, layer: Any, batched: bool, bias: str | None, first_rows: int, gates: Any) -> Any:
    """One time step (h, c, u_t) -> (h', c', h').

    ``u_t`` is the step's input-to-hidden product plus bias when it was batched before the loop, else the
    step's input x_t, multiplied here (and ``bias`` added).
    """
    from onnx import TensorProto, helper

    body, hidden, out = g.subgraph(), layer.hidden_size, layer.output_size
    h, c, u_t = (body.fresh(body.scoped(n)) for n in ("h", "c", "gx_t" if batched else "x_t"))
    first = u_t if batched else matvec(body, layer.weight_ih, u_t, "weight_ih")
    first = body.node("Add", [first, bias]) if bias and not batched else first
    pre = gates(body, layer, first, h, matvec)                                               # gate -> (B, H)
    act = {gate: body.node(GATE_ACTIVATIONS[gate], [pre[gate]]) for gate in GATES}
    c_next = body.node("Add", [body.node("Mul", [act["f"], c]), body.node("Mul", [act["i"], act["g"]])])
    h_next = body.node("Mul", [act["o"], body.node("Tanh", [c_next])])                      # (B, H)
    if getattr(layer, "proj_size", 0):
        h_next = matvec(body, layer.weight_hr, h_next, "weight_hr")                         # (B, P)
    y_t = body.node("Identity", [h_next])
    state = lambda name, size: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", size])  # noqa: E731
    step_input = first_rows if batched else layer.input_size
    return helper.make_graph(body.nodes, body.fresh(body.scoped("step")),
                             [state(h, out), state(c, hidden), state(u_t, step_input)],
                             [state(h_next, out), state(c_next, hidden), state(y_t, out)])


def _lstm_gates(body: Any, layer: LSTMLayer, first: str, h: str, product: Any) -> dict[str, str]:
    packed = body.node("Add", [first, product(body, layer.weight_hh, h, "weight_hh")])     # (B, 4H)
    parts = body.node("Split", [packed, body.ints([layer.hidden_size] * NUM_GATES, "split")], NUM_GATES, axis=1)
    return dict(zip(GATES, parts))


register_cell(LSTMLayer.cell, compile_layer=compile_lstm_layer, onnx_layer=lstm_onnx_layer, onnx_check=lstm_onnx_check)
