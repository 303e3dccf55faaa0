"""Export a ``leanlstm.LSTM`` or a ``WordLM`` to ONNX, keeping each weight form's real structure.

Per layer, the exporter picks how the recurrence is written (``recurrence="auto"``):

- **both forms dense**: one ONNX ``LSTM`` node, the fused operator every runtime optimises;
- **any structured form**: an explicit recurrence. The input-to-hidden products of the whole sequence are
  computed before the loop in one batch, ``(T*B, in) -> (T*B, 4H)`` (unless the form's
  ``onnx_batch_over_time`` says batching does not pay, as for sparse); a ``Scan`` over time then adds each
  step's hidden-to-hidden product and applies the gates. Every product is written by the form itself through
  ``WeightForm.onnx_matvec(graph, x)``: a low-rank form is two thin ``MatMul``s, a Kronecker form the reshape
  identity, a sparse form gathers only the inputs its stored entries need (sliced ELL). Nothing is
  re-densified.

Graph signature (``T`` and ``B`` are symbolic: streaming with ``T = B = 1`` and batched runs share a file):

- inputs: ``x`` (T, B, input) float32, or ``tokens`` (T, B) int64 for a ``WordLM``; with ``state_inputs``
  also ``h0``, ``c0`` (L, B, H) when all layers have one size, else ``h0_0``, ``c0_0``, ``h0_1``, ... (1, B, H_l);
- outputs: ``y`` (T, B, H_last) (``logits`` (T, B, V) for a ``WordLM``) and the final state ``h_n``, ``c_n``
  (or ``h_n_0``, ``c_n_0``, ...), shaped like the state inputs.

A ``batch_first`` LSTM takes ``x`` and returns ``y`` as (B, T, ...), as in PyTorch. Dropout is not exported
(inference). Everything is float32.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..files import atomic_write
from ..nn import LSTM, LSTMLayer
from ..nn.forms import Dense, WeightForm
from ..nn.gates import GATES, NUM_GATES, split_gates

DEFAULT_OPSET = 17
MIN_OPSET = 13                       # Split/Squeeze/ReduceSum with their sizes and axes as inputs
ONNX_GATES = ("i", "o", "f", "g")    # the ONNX LSTM operator packs [i|o|f|c]; its c is our cell candidate g
GATE_ACTIVATIONS = {"i": "Sigmoid", "f": "Sigmoid", "g": "Tanh", "o": "Sigmoid"}
RECURRENCES = ("auto", "lstm", "scan")


class ExportError(ValueError):
    """The model cannot be written to ONNX as asked; the message names the part and what to do."""


# --- a small graph builder -------------------------------------------------------------------------------
class GraphBuilder:
    """Collects ONNX nodes and initializers under unique names; weight forms write their products into it.

    ``node`` adds an operator and returns its output name (a list for several outputs); ``weight`` stores a
    tensor as an initializer, named after the current ``scope``. A ``subgraph`` (a loop body) has its own
    nodes but shares the root's names and initializers, which the body reads from the outer scope.

    >>> g = GraphBuilder()
    >>> with g.scope("layer"):
    ...     y = g.node("MatMul", ["x", g.weight("w", torch.ones(3, 2))])
    >>> y, [t.name for t in g.initializers]
    ('layer.MatMul', ['layer.w'])
    """

    def __init__(self, parent: "GraphBuilder | None" = None) -> None:
        self.root = self if parent is None else parent.root
        self.nodes: list[onnx.NodeProto] = []
        if parent is None:
            self.initializers: list[onnx.TensorProto] = []
            self._used: set[str] = set()
            self._scope: list[str] = []
            self._ints: dict[tuple[int, ...], str] = {}

    def fresh(self, hint: str) -> str:
        """A name not used anywhere in the model yet, based on ``hint``."""
        used, name, k = self.root._used, hint, 0
        while name in used:
            k += 1
            name = f"{hint}_{k}"
        used.add(name)
        return name

    def scoped(self, name: str) -> str:
        return ".".join(self.root._scope + [name])

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names made inside with ``name`` (e.g. ``layers.0.weight_ih``) for a readable graph."""
        self.root._scope.append(name)
        try:
            yield
        finally:
            self.root._scope.pop()

    def weight(self, name: str, value: torch.Tensor | np.ndarray, dtype: str | type = np.float32) -> str:
        """Store ``value`` (as ``dtype``) as an initializer; returns its name."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        name = self.fresh(self.scoped(name))
        self.root.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def ints(self, values: Sequence[int], name: str = "const") -> str:
        """An int64 constant: shapes, axes, pads, split sizes (one initializer per distinct value)."""
        key, known = tuple(int(v) for v in values), self.root._ints
        if key not in known:
            known[key] = self.weight(name, np.asarray(key, dtype=np.int64), np.int64)
        return known[key]

    def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, **attrs) -> str | list[str]:
        """Add an ``op`` node; ``outputs`` is a count (names are made up) or the exact output names."""
        if isinstance(outputs, int):
            outputs = [self.fresh(self.scoped(op)) for _ in range(outputs)]
        names = list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=names[0], **attrs))
        return names[0] if len(names) == 1 else names

    def reserve(self, *names: str) -> None:
        """Keep fixed names (graph inputs and outputs) away from ``fresh``."""
        self.root._used.update(names)

    def subgraph(self) -> "GraphBuilder":
        return GraphBuilder(parent=self)


# --- gate layout ----------------------------------------------------------------------------------------
def onnx_gate_order(packed: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Reorder PyTorch's ``[i|f|g|o]`` gate blocks into the ONNX LSTM operator's ``[i|o|f|c]``.

    >>> onnx_gate_order(torch.arange(8)).tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    blocks = dict(zip(GATES, split_gates(packed, dim)))
    return torch.cat([blocks[gate] for gate in ONNX_GATES], dim)


# --- layers ---------------------------------------------------------------------------------------------
def _is_dense(layer: LSTMLayer) -> bool:
    return type(layer.weight_ih) is Dense and type(layer.weight_hh) is Dense


def _lstm_op_layer(g: GraphBuilder, layer: LSTMLayer, x: str, h0: str | None, c0: str | None
                   ) -> tuple[str, str, str]:
    """The fused ONNX LSTM operator. x: (T, B, in); h0, c0: (1, B, H) -> y (T, B, H), h_n, c_n (1, B, H)."""
    w = g.weight("W", onnx_gate_order(layer.weight_ih.materialize())[None])    # (1, 4H, in)
    r = g.weight("R", onnx_gate_order(layer.weight_hh.materialize())[None])    # (1, 4H, H)
    bias = ""
    if layer.bias_ih is not None:
        bias = g.weight("B", torch.cat([onnx_gate_order(layer.bias_ih), onnx_gate_order(layer.bias_hh)])[None])
    inputs = [x, w, r, bias] + (["", h0, c0] if h0 is not None else [])  # "" skips sequence_lens
    while not inputs[-1]:
        inputs.pop()
    y, h_n, c_n = g.node("LSTM", inputs, 3, hidden_size=layer.hidden_size)
    return g.node("Squeeze", [y, g.ints([1], "axes")]), h_n, c_n             # (T, 1, B, H) -> (T, B, H)


def _matvec(g: GraphBuilder, form: WeightForm, x: str, name: str) -> str:
    """``x @ W.T`` through the form's own ONNX product. x: (N, in) -> (N, out)."""
    with g.scope(name):
        return form.onnx_matvec(g, x)


def _scan_layer(g: GraphBuilder, layer: LSTMLayer, x: str, h0: str | None, c0: str | None
                ) -> tuple[str, str, str]:
    """An explicit recurrence over the forms' products; same contract as ``_lstm_op_layer``.

    The input-to-hidden product runs before the loop, over all T*B rows at once, unless the form says a
    batched product does not pay (``onnx_batch_over_time``): a gather-based sparse product gains no speed
    from batching and would hold a (T*B, nnz) intermediate, so it runs inside the loop, one step at a time.
    """
    hidden = layer.hidden_size
    bias = g.weight("bias", layer.bias_ih + layer.bias_hh) if layer.bias_ih is not None else None
    time_batch = g.node("Slice", [g.node("Shape", [x]), g.ints([0]), g.ints([2])])           # [T, B]
    batched = layer.weight_ih.onnx_batch_over_time
    scanned = x                                                                              # (T, B, in)
    if batched:
        flat = g.node("Reshape", [x, g.ints([-1, layer.input_size])])                        # (T*B, in)
        scanned = _matvec(g, layer.weight_ih, flat, "weight_ih")                             # (T*B, 4H)
        scanned = g.node("Add", [scanned, bias]) if bias else scanned
        shape = g.node("Concat", [time_batch, g.ints([NUM_GATES * hidden])], axis=0)
        scanned = g.node("Reshape", [scanned, shape])                                        # (T, B, 4H)
    if h0 is None:
        batch = g.node("Slice", [time_batch, g.ints([1]), g.ints([2])])
        zeros = g.node("ConstantOfShape", [g.node("Concat", [batch, g.ints([hidden])], axis=0)])
        h0 = c0 = zeros                                                                      # (B, H)
    else:
        h0, c0 = (g.node("Squeeze", [s, g.ints([0], "axes")]) for s in (h0, c0))
    body = _step_body(g, layer, batched, bias)
    h_n, c_n, y = g.node("Scan", [h0, c0, scanned], 3, body=body, num_scan_inputs=1)
    h_n, c_n = (g.node("Unsqueeze", [s, g.ints([0], "axes")]) for s in (h_n, c_n))
    return y, h_n, c_n


def _step_body(g: GraphBuilder, layer: LSTMLayer, batched: bool, bias: str | None) -> onnx.GraphProto:
    """One time step (h, c, u_t) -> (h', c', h').

    ``u_t`` is the step's input-to-hidden product plus biases when it was batched before the loop, else the
    step's input x_t, multiplied here (and ``bias`` added).
    """
    body, hidden = g.subgraph(), layer.hidden_size
    h, c, u_t = (body.fresh(body.scoped(n)) for n in ("h", "c", "gx_t" if batched else "x_t"))
    packed = body.node("Add", [u_t if batched else _matvec(body, layer.weight_ih, u_t, "weight_ih"),
                               _matvec(body, layer.weight_hh, h, "weight_hh")])              # (B, 4H)
    packed = body.node("Add", [packed, bias]) if bias and not batched else packed
    parts = body.node("Split", [packed, body.ints([hidden] * NUM_GATES, "split")], NUM_GATES, axis=1)
    act = {gate: body.node(GATE_ACTIVATIONS[gate], [part]) for gate, part in zip(GATES, parts)}
    c_next = body.node("Add", [body.node("Mul", [act["f"], c]), body.node("Mul", [act["i"], act["g"]])])
    h_next = body.node("Mul", [act["o"], body.node("Tanh", [c_next])])
    y_t = body.node("Identity", [h_next])
    state = lambda name, size: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", size])  # noqa: E731
    step_input = NUM_GATES * hidden if batched else layer.input_size
    return helper.make_graph(body.nodes, body.fresh(body.scoped("step")),
                             [state(h, hidden), state(c, hidden), state(u_t, step_input)],
                             [state(h_next, hidden), state(c_next, hidden), state(y_t, hidden)])


# --- whole models ---------------------------------------------------------------------------------------
def _uses_lstm_op(layer: LSTMLayer, index: int, recurrence: str) -> bool:
    if recurrence == "scan" or (recurrence == "auto" and not _is_dense(layer)):
        return False
    if not _is_dense(layer):
        kinds = ", ".join(f"weight_{m} is {type(layer.form(m)).__name__}" for m in ("ih", "hh"))
        raise ExportError(f"recurrence='lstm' writes the ONNX LSTM operator, which only takes dense weights, "
                          f"but in layer {index} {kinds}; use recurrence='auto' or 'scan' to export the "
                          f"structured products as an explicit recurrence")
    return True


def _check_forms(lstm: LSTM, recurrence: str) -> None:
    """Fail before building anything if a form that must write its own product cannot."""
    missing = []
    for index, layer in enumerate(lstm.layers):
        if _uses_lstm_op(layer, index, recurrence):
            continue
        for matrix in ("ih", "hh"):
            form = layer.form(matrix)
            if type(form).onnx_matvec is WeightForm.onnx_matvec:
                missing.append(f"layers.{index}.weight_{matrix} ({type(form).__name__})")
    if missing:
        raise ExportError(f"cannot export to ONNX: {', '.join(missing)} has no ONNX product. Give the form "
                          f"an onnx_matvec(graph, x) method (see leanlstm.runtime.onnx.GraphBuilder), or "
                          f"convert those matrices first, e.g. lstm.replace_forms('dense')")


def _unwrap(model: nn.Module) -> tuple[LSTM, nn.Module | None, str]:
    """(the leanlstm.LSTM, the WordLM around it or None, the LSTM's name prefix in the state dict)."""
    from ..tasks.lm import WordLM  # tasks import the nn package, not the reverse

    if isinstance(model, WordLM):
        lstm = LSTM.from_torch(model.lstm) if isinstance(model.lstm, nn.LSTM) else model.lstm
        return lstm, model, "lstm"
    if isinstance(model, nn.LSTM):
        return LSTM.from_torch(model), None, ""
    if isinstance(model, LSTM):
        return model, None, ""
    raise ExportError(f"export_onnx takes a leanlstm.LSTM, a torch.nn.LSTM or a WordLM, got "
                      f"{type(model).__name__}")


def _state_inputs(g: GraphBuilder, sizes: list[int], stacked: bool
                  ) -> tuple[list[onnx.ValueInfoProto], list[str], list[str]]:
    """Graph inputs for the initial state and the per-layer (1, B, H_l) tensors they give."""
    def value(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    if stacked:
        infos = [value(name, [len(sizes), "B", sizes[0]]) for name in ("h0", "c0")]
        if len(sizes) == 1:
            return infos, ["h0"], ["c0"]
        split = g.ints([1] * len(sizes), "split")
        per_layer = [g.node("Split", [name, split], len(sizes), axis=0) for name in ("h0", "c0")]
        return infos, per_layer[0], per_layer[1]
    infos = [value(f"{part}0_{i}", [1, "B", size]) for part in "hc" for i, size in enumerate(sizes)]
    return infos, [f"h0_{i}" for i in range(len(sizes))], [f"c0_{i}" for i in range(len(sizes))]


def _state_outputs(g: GraphBuilder, h_n: list[str], c_n: list[str], sizes: list[int], stacked: bool
                   ) -> list[onnx.ValueInfoProto]:
    """Name the final states ``h_n``/``c_n`` (stacked) or ``h_n_0``, ``c_n_0``, ... (per layer)."""
    infos = []
    for part, tensors in (("h_n", h_n), ("c_n", c_n)):
        if stacked:
            g.node("Concat", tensors, [part], axis=0)
            infos.append(helper.make_tensor_value_info(part, TensorProto.FLOAT, [len(sizes), "B", sizes[0]]))
            continue
        for i, (tensor, size) in enumerate(zip(tensors, sizes)):
            g.node("Identity", [tensor], [f"{part}_{i}"])
            infos.append(helper.make_tensor_value_info(f"{part}_{i}", TensorProto.FLOAT, [1, "B", size]))
    return infos


def to_onnx(model: nn.Module, *, opset: int = DEFAULT_OPSET, state_inputs: bool = True,
            recurrence: str = "auto") -> onnx.ModelProto:
    """The checked ONNX model of a ``leanlstm.LSTM``, ``torch.nn.LSTM`` or ``WordLM`` (see the module doc).

    ``recurrence``: ``"auto"`` (ONNX LSTM operator for dense layers, a ``Scan`` over the forms' products
    otherwise), ``"lstm"`` (operator only; structured forms are an error) or ``"scan"`` (always explicit).
    Without ``state_inputs`` the recurrence starts from zeros.

    >>> proto = to_onnx(LSTM(8, 16, 2))
    >>> [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    (['x', 'h0', 'c0'], ['y', 'h_n', 'c_n'])
    """
    if recurrence not in RECURRENCES:
        raise ExportError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is not available: leanlstm writes ONNX opsets {MIN_OPSET} to "
                          f"{onnx.defs.onnx_opset_version()} (the newest this onnx {onnx.__version__} knows)")
    lstm, head, prefix = _unwrap(model)
    _check_forms(lstm, recurrence)
    g, sizes, stacked = GraphBuilder(), lstm.hidden_sizes, lstm.uniform_sizes
    g.reserve("x", "tokens", "y", "logits", *(f"{p}{s}" for p in ("h0", "c0", "h_n", "c_n")
                                               for s in ["", *(f"_{i}" for i in range(len(sizes)))]))
    with torch.no_grad():
        if head is None:
            shape = ["B", "T", lstm.input_size] if lstm.batch_first else ["T", "B", lstm.input_size]
            inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
            x = g.node("Transpose", ["x"], perm=[1, 0, 2]) if lstm.batch_first else "x"     # (T, B, in)
        else:
            inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T", "B"])]
            x = g.node("Gather", [g.weight("embedding.weight", head.embedding.weight), "tokens"], axis=0)
        h0, c0 = [None] * len(sizes), [None] * len(sizes)
        if state_inputs:
            infos, h0, c0 = _state_inputs(g, sizes, stacked)
            inputs += infos
        h_n, c_n = [], []
        for index, layer in enumerate(lstm.layers):
            with g.scope(".".join(filter(None, [prefix, "layers", str(index)]))):
                build = _lstm_op_layer if _uses_lstm_op(layer, index, recurrence) else _scan_layer
                x, h, c = build(g, layer, x, h0[index], c0[index])
                h_n.append(h)
                c_n.append(c)
        outputs = _main_output(g, lstm, head, x) + _state_outputs(g, h_n, c_n, sizes, stacked)
    graph = helper.make_graph(g.nodes, "leanlstm", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="leanlstm",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _main_output(g: GraphBuilder, lstm: LSTM, head: nn.Module | None, y: str) -> list[onnx.ValueInfoProto]:
    """``y`` (T, B, H) for an LSTM (transposed back if batch_first), ``logits`` (T, B, V) for a WordLM."""
    if head is None:
        if lstm.batch_first:
            g.node("Transpose", [y], ["y"], perm=[1, 0, 2])
        else:
            g.node("Identity", [y], ["y"])
        shape = ["B", "T", lstm.hidden_sizes[-1]] if lstm.batch_first else ["T", "B", lstm.hidden_sizes[-1]]
        return [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    decoder = head.decoder
    product = g.node("MatMul", [y, g.weight("decoder.weight_t", decoder.weight.T)])
    g.node("Add", [product, g.weight("decoder.bias", decoder.bias)], ["logits"])
    return [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "B", decoder.out_features])]


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, state_inputs: bool = True,
                recurrence: str = "auto", overwrite: bool = True) -> Path:
    """Write ``model`` (a ``leanlstm.LSTM``, ``torch.nn.LSTM`` or ``WordLM``) to ``path`` as ONNX, atomically.

    Options as in ``to_onnx``; ``overwrite=False`` refuses to replace an existing file.

    >>> import onnxruntime, tempfile, numpy as np
    >>> path = export_onnx(LSTM(8, 16, 2), Path(tempfile.mkdtemp()) / "lstm.onnx", state_inputs=False)
    >>> y, h_n, c_n = onnxruntime.InferenceSession(path).run(None, {"x": np.zeros((5, 1, 8), np.float32)})
    >>> y.shape, h_n.shape
    ((5, 1, 16), (2, 1, 16))
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; not overwriting it (pass overwrite=True, or --force)")
    data = to_onnx(model, opset=opset, state_inputs=state_inputs, recurrence=recurrence).SerializeToString()
    atomic_write(path, lambda file: file.write(data))
    return path
