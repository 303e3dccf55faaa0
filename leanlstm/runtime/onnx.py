"""Export a model to ONNX (any model ``runtime.compile`` runs), keeping each weight form's real structure.

The model is read as a pipeline (``runtime.pipeline``: embedding, LSTM stacks, ``nn.Linear`` heads, activations, last
step); a ``FormLinear`` head is written through its form's ``onnx_matvec``, like the LSTM matrices; each cell layer is
written by its cell's registered ``onnx_layer`` (``runtime.cells``). For the LSTM cell, per layer, the exporter picks
how the recurrence is written (``recurrence="auto"``):

- **dense, no projection**: one ONNX ``LSTM`` node (``direction="bidirectional"`` for both directions), the fused
  operator every runtime optimises;
- **any structured form, or a projection** (the ``LSTM`` operator has no ``proj_size``): an explicit recurrence.
  The input-to-hidden products of the whole sequence are computed before the loop in one batch,
  ``(T*B, in) -> (T*B, 4H)`` (unless the form's ``onnx_batch_over_time`` says batching does not pay, as for
  sparse); a ``Scan`` over time (backwards for a reverse direction) then adds each step's hidden-to-hidden
  product, applies the gates and the projection. Every product is written by the form itself through
  ``WeightForm.onnx_matvec(graph, x)``: a low-rank form is two thin ``MatMul``s, a Kronecker form the reshape
  identity, a sparse form gathers only the inputs its stored entries need (sliced ELL). Nothing is re-densified.

Graph signature (``T`` and ``B`` are symbolic: streaming with ``T = B = 1`` and batched runs share a file):

- inputs: ``x`` float32 in the model's own layout ((T, B, input), or (B, T, input) for a ``batch_first`` model),
  or ``tokens`` int64 ((T, B) or (B, T)) for a model that starts with an embedding; with ``state_inputs`` also
  ``h0``, ``c0`` (L*D, B, size) when all layers have one size, else ``h0_0``, ``c0_0``, ``h0_1``, ... (1, B, size)
  per cell layer (with several LSTM stacks, each stack's names start with its name: ``rnn.h0``);
- outputs: the model's output, ``y`` when it is an LSTM's output, ``logits`` when a head follows, in the model's
  own layout ((T, B, F), (B, T, F), (B, F) after the last step, (T*B, F) after a ``view(-1, F)``), and the final
  state ``h_n``, ``c_n`` (or ``h_n_0``, ``c_n_0``, ...), shaped like the state inputs.

Which structure to write (``structure``): a sparse or structured matrix is not always faster in ONNX Runtime
than the fused dense LSTM operator (a layer pruned 3x runs its gather-based product, inside a ``Scan``, slower
than the dense operator). ``export_onnx`` therefore measures by default (``structure="auto"``): for every layer
with a non-dense matrix it times, in ONNX Runtime at batch 1, the layer with each subset of its non-dense
matrices written through their structure and the rest dense (all dense: the fused operator), and writes the
fastest; the choices are logged. ``"always"`` writes every form's structure (``to_onnx``'s default, what the
backends time), ``"never"`` every matrix dense.

Dropout is not exported (inference). Everything is float32.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import copy
import itertools
import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..files import atomic_write
from ..nn import FormLinear, WeightForm
from ..nn.gates import GATES, split_gates
from .cells import ExportError, cell_part
from .pipeline import Activation, Affine, Elementwise, LastStep, Pipeline, Recurrent, pipeline_of

__all__ = ["ExportError", "GraphBuilder", "LayerChoice", "export_onnx", "layer_choices", "onnx_gate_order", "to_onnx"]
log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 13                       # Split/Squeeze/ReduceSum with their sizes and axes as inputs
ONNX_GATES = ("i", "o", "f", "g")    # the ONNX LSTM operator packs [i|o|f|c]; its c is our cell candidate g
RECURRENCES = ("auto", "lstm", "scan")
STRUCTURES = ("auto", "always", "never")
ACTIVATION_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softmax": "Softmax",
                  "log_softmax": "LogSoftmax"}
ELEMENTWISE_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "rsub": "Sub", "rdiv": "Div"}


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
        self.root.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype, order="C"), name))
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


# --- recurrent stacks --------------------------------------------------------------------------------------
class _StackState:
    """Names and shapes of one stack's state inputs and outputs: ``{prefix}h0`` (L*D, B, size) when every cell
    layer keeps states of one size, else ``{prefix}h0_{i}`` (1, B, size) per cell layer."""

    PARTS = ("h", "c")

    def __init__(self, stage: Recurrent, prefix: str) -> None:
        self.prefix, self.sizes = prefix, [layer.state_sizes() for layer in stage.module.layers]
        self.stacked = len(set(self.sizes)) == 1
        self.parts = self.PARTS[:len(self.sizes[0])]

    def names(self, suffix: str) -> list[str]:
        """Graph names of one end (``"0"`` inputs, ``"_n"`` outputs), part by part."""
        if self.stacked:
            return [f"{self.prefix}{part}{suffix}" for part in self.parts]
        return [f"{self.prefix}{part}{suffix}_{i}" for part in self.parts for i in range(len(self.sizes))]

    def infos(self, suffix: str) -> list[onnx.ValueInfoProto]:
        shapes = ([[len(self.sizes), "B", self.sizes[0][k]] for k in range(len(self.parts))] if self.stacked else
                  [[1, "B", sizes[k]] for k in range(len(self.parts)) for sizes in self.sizes])
        return [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                for name, shape in zip(self.names(suffix), shapes)]

    def inputs(self, g: "GraphBuilder") -> list[tuple[str, ...]]:
        """Per cell layer, its (1, B, size) state tensors read from the graph inputs."""
        count = len(self.sizes)
        if not self.stacked:
            names = self.names("0")
            return [tuple(names[k * count + i] for k in range(len(self.parts))) for i in range(count)]
        if count == 1:
            return [tuple(self.names("0"))]
        split = g.ints([1] * count, "split")
        per_part = [g.node("Split", [name, split], count, axis=0) for name in self.names("0")]
        return list(zip(*per_part))

    def outputs(self, g: "GraphBuilder", finals: list[tuple[str, ...]]) -> list[onnx.ValueInfoProto]:
        """Name the final states (``h_n``, ``c_n``, ...), stacked or per cell layer."""
        names = iter(self.names("_n"))
        for k in range(len(self.parts)):
            tensors = [final[k] for final in finals]
            if self.stacked:
                g.node("Concat", tensors, [next(names)], axis=0)
                continue
            for tensor in tensors:
                g.node("Identity", [tensor], [next(names)])
        return self.infos("_n")


def _stack(g: "GraphBuilder", stage: Recurrent, x: str, state: _StackState | None, recurrence: str
           ) -> tuple[str, list[tuple[str, ...]]]:
    """Every layer of one stack, each through its cell's ``onnx_layer``. x: (T, B, in) -> (T, B, D * out)."""
    lstm, prefix = stage.module, f"{stage.name}." if stage.name else ""
    starts = state.inputs(g) if state is not None else None
    D, finals = lstm.num_directions, []
    for start in range(0, len(lstm.layers), D):
        layers = list(lstm.layers[start:start + D])
        names = [f"{prefix}layers.{start + d}" for d in range(D)]
        write = cell_part(layers[0], "onnx_layer", names[0], ExportError)
        x, final = write(g, layers, x, starts[start:start + D] if starts else None, names, recurrence)
        finals += final
    return x, finals


def _check_forms(pipeline: Pipeline, recurrence: str) -> None:
    """Fail before building anything if a matrix that must write its own product cannot."""
    missing = []
    for stage in pipeline.stacks:
        lstm, prefix = stage.module, f"{stage.name}." if stage.name else ""
        D = lstm.num_directions
        for start in range(0, len(lstm.layers), D):
            layers, names = list(lstm.layers[start:start + D]), [f"{prefix}layers.{start + d}" for d in range(D)]
            missing += cell_part(layers[0], "onnx_check", names[0], ExportError)(layers, names, recurrence)
    missing += [f"{stage.name}.weight ({type(stage.module.form).__name__})" for stage in pipeline.stages
                if isinstance(stage, Affine) and isinstance(stage.module, FormLinear)
                and type(stage.module.form).onnx_matvec is WeightForm.onnx_matvec]
    if missing:
        raise ExportError(f"cannot export to ONNX: {', '.join(missing)} has no ONNX product. Give the form "
                          f"an onnx_matvec(graph, x) method (see leanlstm.runtime.onnx.GraphBuilder), or "
                          f"convert those matrices first, e.g. lstm.replace_forms('dense')")


# --- the other stages ---------------------------------------------------------------------------------------
def _source(g: "GraphBuilder", pipeline: Pipeline) -> tuple[onnx.ValueInfoProto, str]:
    """The graph input and the (T, B, F) tensor it gives (token ids looked up, batch-first transposed)."""
    dims = [pipeline.input_size if axis == "F" else axis for axis in pipeline.input_layout]
    if pipeline.tokens:
        info = helper.make_tensor_value_info("tokens", TensorProto.INT64, dims)
        x = g.node("Gather", [g.weight("embedding.weight", pipeline.embedding.weight), "tokens"], axis=0)
    else:
        info, x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims), "x"
    if pipeline.input_layout.index("B") < pipeline.input_layout.index("T"):
        x = g.node("Transpose", [x], perm=[1, 0, 2])                                      # (B, T, F) -> (T, B, F)
    return info, x


def _stage(g: "GraphBuilder", stage, x: str) -> str:
    if isinstance(stage, Affine):
        with g.scope(stage.name):
            head = stage.module
            if isinstance(head, FormLinear):
                return _form_affine(g, head, x)
            y = g.node("MatMul", [x, g.weight("weight_t", head.weight.T)])
            return g.node("Add", [y, g.weight("bias", head.bias)]) if head.bias is not None else y
    if isinstance(stage, Activation):
        axis = {"axis": -1} if stage.kind in ("softmax", "log_softmax") else {}
        return g.node(ACTIVATION_OPS[stage.kind], [x], **axis)
    if isinstance(stage, Elementwise):
        constant = g.weight("constant", stage.constant)
        operands = [constant, x] if stage.op in ("rsub", "rdiv") else [x, constant]
        return g.node(ELEMENTWISE_OPS[stage.op], operands)
    if isinstance(stage, LastStep):
        return g.node("Gather", [x, g.weight("last_step", np.array(-1, np.int64), np.int64)], axis=0)  # (B, F)
    raise ExportError(f"{stage.name}: no ONNX writer for {type(stage).__name__}")


def _form_affine(g: "GraphBuilder", head: FormLinear, x: str) -> str:
    """A ``FormLinear`` through its form's own product: x (..., in) flattened to (N, in), multiplied, reshaped back."""
    leading = g.node("Slice", [g.node("Shape", [x]), g.ints([0]), g.ints([-1])])            # (T, B) or (B,)
    flat = g.node("Reshape", [x, g.ints([-1, head.in_features])])
    y = head.form.onnx_matvec(g, flat)                                                   # (N, out)
    y = g.node("Add", [y, g.weight("bias", head.bias)]) if head.bias is not None else y
    return g.node("Reshape", [y, g.node("Concat", [leading, g.ints([head.out_features])], axis=0)])


def _main_output(g: "GraphBuilder", pipeline: Pipeline, x: str) -> onnx.ValueInfoProto:
    """The model's output in its own layout, from the exporter's (T, B, F) or, after the last step, (B, F)."""
    inside = ("B", "F") if pipeline.last_step else ("T", "B", "F")
    target, width = pipeline.output_layout, pipeline.output_size
    merged = [axis for axis in target if len(axis) == 2]                   # "TB"/"BT": a view(-1, F)
    order = (tuple(merged[0]) + ("F",)) if merged else target
    if order != inside:
        x = g.node("Transpose", [x], perm=[inside.index(axis) for axis in order])
    if merged:
        x = g.node("Reshape", [x, g.ints([-1, width])])
    name = "logits" if any(isinstance(stage, Affine) for stage in pipeline.stages) else "y"
    g.node("Identity", [x], [name])
    dims = [width if axis == "F" else axis for axis in target]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


# --- which structure to write: measured in ONNX Runtime ---------------------------------------------------------
@dataclass(frozen=True)
class LayerChoice:
    """What ``structure="auto"`` writes for one layer (all its directions), from ONNX Runtime timings."""

    stack: str                     # the stack's stage name ("" for a bare LSTM)
    start: int                     # flat index of the layer's first direction in ``stack.layers``
    name: str                      # "rnn.layers.0"
    structured: tuple[str, ...]    # matrices written through their structure; the others dense
    us: float                      # median us per step of the chosen variant
    dense_us: float                # ... with every matrix dense (the fused LSTM operator where it applies)
    structure_us: float            # ... with every form's structure (``structure="always"``)
    form: str                      # the forms, e.g. "pruned 3.0x"
    compression: float             # dense bytes over stored bytes of the layer's matrices

    @property
    def slower(self) -> bool:
        """Whether writing every form's structure runs slower than the dense layer."""
        return self.structure_us > self.dense_us

    def slow_down(self):
        from .speed_check import SlowDown

        return SlowDown(self.name, self.form, self.compression, self.structure_us, self.dense_us, "onnxruntime")


def _layer_model(layers: list[nn.Module], dense: list[str]) -> nn.Module:
    """A one-layer stack holding copies of ``layers`` (its directions), ``dense`` matrices made dense."""
    from ..nn import LSTM

    first = layers[0]
    single = LSTM(first.input_size, first.hidden_size, 1, bidirectional=len(layers) == 2,
                  proj_size=getattr(first, "proj_size", 0), cell=first.cell)
    single.layers = nn.ModuleList(copy.deepcopy(layer) for layer in layers)
    return single.replace_forms("dense", matrices=dense) if dense else single


def _describe_layer(layers: list[nn.Module], matrices: list[str]) -> tuple[str, float]:
    from .speed_check import describe

    forms = [layer.form(m) for layer in layers for m in matrices]
    kinds = sorted({describe(form) for form in forms if type(form).__name__ != "Dense"})
    dense = sum(f.out_features * f.in_features * 4 for f in forms)
    compression = dense / sum(f.nbytes() for f in forms)
    return f"{' + '.join(kinds)} {'(' + ', '.join(f'weight_{m}' for m in matrices) + ')'}", compression


def layer_choices(model: nn.Module | Pipeline, repeats: int = 7, seq_len: int = 35) -> list[LayerChoice]:
    """For every layer with a non-dense matrix, the fastest way to write it in ONNX Runtime (batch 1, one thread):
    each subset of its non-dense matrices through their structure, the rest dense, all timed in one interleaved
    run (``runtime.latency.measure``).

    >>> from leanlstm import LSTM
    >>> layer_choices(LSTM(8, 16))      # nothing to choose for dense layers
    []
    """
    from .latency import measure

    pipeline, found = pipeline_of(model, ExportError), []
    for stage in pipeline.stacks:
        lstm, prefix = stage.module, f"{stage.name}." if stage.name else ""
        D = lstm.num_directions
        for start in range(0, len(lstm.layers), D):
            layers = list(lstm.layers[start:start + D])
            matrices = list(layers[0].matrices)
            shaped = [m for m in matrices if any(type(layer.form(m)).__name__ != "Dense" for layer in layers)]
            if not shaped:
                continue
            variants = [tuple(c) for n in range(len(shaped) + 1) for c in itertools.combinations(shaped, n)]
            models = {"+".join(v) or "dense": _layer_model(layers, [m for m in matrices if m not in v])
                      for v in variants}
            timed = measure(models, ("onnxruntime-forms",), seq_len=seq_len, repeats=repeats, warmup=2)["models"]
            us = {v: timed["+".join(v) or "dense"]["backends"]["onnxruntime-forms"]["median"] for v in variants}
            best = min(variants, key=lambda v: (us[v], len(v)))
            form, compression = _describe_layer(layers, shaped)
            found.append(LayerChoice(stage.name, start, f"{prefix}layers.{start}", best, us[best], us[()],
                                     us[variants[-1]], form, compression))
    return found


def with_structure(model: nn.Module | Pipeline, structure: str = "auto") -> Pipeline:
    """The pipeline ``to_onnx`` writes for ``structure`` (see the module doc); the model is left as it is."""
    if structure not in STRUCTURES:
        raise ExportError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    pipeline = pipeline_of(model, ExportError)
    if structure == "always":
        return pipeline
    if structure == "never":
        return pipeline.dense()
    densify: dict[str, list[tuple[int, list[str]]]] = {}
    for choice in layer_choices(pipeline):
        lstm = next(s.module for s in pipeline.stacks if s.name == choice.stack)
        layers = lstm.layers[choice.start:choice.start + lstm.num_directions]
        dense = [m for m in layers[0].matrices if m not in choice.structured]
        log.info("ONNX export: %s (%s %.1fx) written %s: %.2f us per step, dense %.2f, every structure %.2f",
                 choice.name, choice.form, choice.compression,
                 "with " + ", ".join(f"weight_{m}" for m in choice.structured) + " structured"
                 if choice.structured else "dense", choice.us, choice.dense_us, choice.structure_us)
        densify.setdefault(choice.stack, []).append((choice.start, dense))
    stages = []
    for stage in pipeline.stages:
        if isinstance(stage, Recurrent) and densify.get(stage.name):
            module = copy.deepcopy(stage.module)
            for start, dense in densify[stage.name]:
                if dense:
                    flat = list(range(start, start + module.num_directions))
                    module.replace_forms("dense", layers=flat, matrices=dense)
            stage = replace(stage, module=module)
        stages.append(stage)
    return replace(pipeline, stages=stages)


# --- whole models ---------------------------------------------------------------------------------------
def to_onnx(model: nn.Module | Pipeline, *, opset: int = DEFAULT_OPSET, state_inputs: bool = True,
            recurrence: str = "auto", structure: str = "always") -> onnx.ModelProto:
    """The checked ONNX model of any model ``runtime.compile`` runs (see the module doc for its signature).

    ``recurrence``: ``"auto"`` (ONNX LSTM operator for dense layers without projection, a ``Scan`` over the
    forms' products otherwise), ``"lstm"`` (operator only; structured forms and projections are an error) or
    ``"scan"`` (always explicit). Without ``state_inputs`` the recurrence starts from zeros. ``structure``:
    ``"always"`` writes every form's structure, ``"never"`` every matrix dense, ``"auto"`` per layer what ONNX
    Runtime runs fastest (measured; ``layer_choices``).

    >>> from leanlstm import LSTM
    >>> proto = to_onnx(LSTM(8, 16, 2))
    >>> [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    (['x', 'h0', 'c0'], ['y', 'h_n', 'c_n'])
    """
    if recurrence not in RECURRENCES:
        raise ExportError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is not available: leanlstm writes ONNX opsets {MIN_OPSET} to "
                          f"{onnx.defs.onnx_opset_version()} (the newest this onnx {onnx.__version__} knows)")
    pipeline = with_structure(model, structure)
    _check_forms(pipeline, recurrence)
    several = len(pipeline.stacks) > 1
    states = {id(s): _StackState(s, f"{s.name}." if several else "") for s in pipeline.stacks}
    g = GraphBuilder()
    g.reserve("x", "tokens", "y", "logits", *(n for s in states.values() for end in ("0", "_n") for n in s.names(end)))
    with torch.no_grad():
        source, x = _source(g, pipeline)
        inputs, outputs = [source], []
        for stage in pipeline.stages:
            if not isinstance(stage, Recurrent):
                x = _stage(g, stage, x)
                continue
            state = states[id(stage)] if state_inputs else None
            x, finals = _stack(g, stage, x, state, recurrence)
            inputs += state.infos("0") if state else []
            outputs += states[id(stage)].outputs(g, finals)
        outputs.insert(0, _main_output(g, pipeline, x))
    graph = helper.make_graph(g.nodes, "leanlstm", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="leanlstm",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module | Pipeline, path: str | Path, *, opset: int = DEFAULT_OPSET,
                state_inputs: bool = True, recurrence: str = "auto", structure: str = "auto",
                overwrite: bool = True, precision: str = "float32") -> Path:
    """Write ``model`` (anything ``runtime.compile`` runs) to ``path`` as ONNX, atomically.

    Options as in ``to_onnx``, but ``structure`` defaults to ``"auto"``: each layer's forms are written through
    their structure only where ONNX Runtime runs that faster than dense (measured, a second or so per layer).
    ``overwrite=False`` refuses to replace an existing file. ``precision="int8"`` writes ONNX Runtime's dynamic
    int8 quantisation of the dense export (``runtime.onnx_int8``).

    >>> import onnxruntime, tempfile, numpy as np
    >>> from leanlstm import LSTM
    >>> path = export_onnx(LSTM(8, 16, 2), Path(tempfile.mkdtemp()) / "lstm.onnx", state_inputs=False)
    >>> y, h_n, c_n = onnxruntime.InferenceSession(path).run(None, {"x": np.zeros((5, 1, 8), np.float32)})
    >>> y.shape, h_n.shape
    ((5, 1, 16), (2, 1, 16))
    """
    path = Path(path)
    if precision == "int8":                  # ONNX Runtime's quantize_dynamic of the dense export: runtime.onnx_int8
        from .onnx_int8 import export_onnx_int8

        return export_onnx_int8(model, path, opset=opset, state_inputs=state_inputs, recurrence=recurrence,
                                structure=structure, overwrite=overwrite)
    if precision != "float32":
        raise ExportError(f"precision must be 'float32' or 'int8', got {precision!r}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; not overwriting it (pass overwrite=True, or --force)")
    data = to_onnx(model, opset=opset, state_inputs=state_inputs, recurrence=recurrence,
                   structure=structure).SerializeToString()
    atomic_write(path, lambda file: file.write(data))
    return path
