"""What the runtime runs: a user's model read from its module graph as a straight pipeline of stages.

The runtime (``compile``), the ONNX exporter and the latency backends all take a model as a ``Pipeline``:
an input (float vectors, or token ids looked up in an ``nn.Embedding``) followed by stages, each one of

- ``Recurrent``: an LSTM stack (``torch.nn.LSTM`` or ``leanlstm.LSTM``), whole sequences in and out;
- ``Affine``: an ``nn.Linear`` head or decoder, at every step;
- ``Activation``: ReLU, Tanh, Sigmoid, Softmax, LogSoftmax over the channels;
- ``Elementwise``: ``x - mean``, ``x / std``... with a constant per channel (input normalisation);
- ``LastStep``: the output of the last time step only (``out[:, -1]``, ``h_n[-1]``).

The pipeline is found from a ``torch.fx`` trace (``leanlstm.graph.trace``): the path from the model's output (or
the first element of the tuple it returns) back to its input, whatever the modules are called. Dropout is
the identity at inference; views and transposes only move the batch and time axes, which the pipeline tracks
(``input_layout``, ``output_layout``: ``T`` time, ``B`` batch, ``F`` channels, ``TB``/``BT`` the two merged by
a ``view(-1, F)``). Anything else on that path is refused, naming the module or operation.

The state a recurrent stack is called with in ``forward`` (a ``hidden`` argument, zeros) is not part of the
pipeline: the runtime takes the state as an argument of ``run``. A state computed from the input by some
module would change the result, so it is refused.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..graph import LINEAR_TYPES, RECURRENT_TYPES, GraphError, trace
from ..nn import LSTM, FormLinear

ErrorType = type[Exception]


# --- stages ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str                           # the module's qualified name, or the operation as written


@dataclass(frozen=True)
class Recurrent(Stage):
    module: LSTM                        # a torch.nn.LSTM arrives converted (dense forms, same weights)


@dataclass(frozen=True)
class Affine(Stage):
    module: nn.Linear | FormLinear      # a FormLinear multiplies through its weight form's structure


@dataclass(frozen=True)
class Activation(Stage):
    kind: str                           # one of ACTIVATIONS


@dataclass(frozen=True)
class Elementwise(Stage):
    op: str                             # one of ELEMENTWISE: "sub" is x - c, "rsub" c - x
    constant: np.ndarray = field(compare=False)   # float32, () or (F,)


@dataclass(frozen=True)
class LastStep(Stage):
    pass


ACTIVATIONS = ("relu", "tanh", "sigmoid", "softmax", "log_softmax")
ELEMENTWISE = ("add", "sub", "rsub", "mul", "div", "rdiv")


@dataclass
class Pipeline:
    """A model as the runtime runs it: ``embedding`` (or float inputs of ``input_size``), then ``stages``.

    >>> lstm = torch.nn.LSTM(4, 8, 2, batch_first=True)
    >>> pipe = pipeline_of(lstm)
    >>> [type(s).__name__ for s in pipe.stages], pipe.input_layout, pipe.output_size
    (['Recurrent'], ('B', 'T', 'F'), 8)
    """

    embedding: nn.Embedding | None
    input_size: int                     # float input width, or the embedding's width
    stages: list[Stage]
    input_layout: tuple[str, ...]       # the model's input axes: ("T", "B", "F"), ("B", "T") for token ids...
    output_layout: tuple[str, ...]      # the main output's axes, e.g. ("B", "F") after the last step

    @property
    def tokens(self) -> bool:
        return self.embedding is not None

    @property
    def stacks(self) -> list[Recurrent]:
        return [stage for stage in self.stages if isinstance(stage, Recurrent)]

    @property
    def last_step(self) -> bool:
        return any(isinstance(stage, LastStep) for stage in self.stages)

    @property
    def bidirectional(self) -> bool:
        return any(stage.module.bidirectional for stage in self.stacks)

    @property
    def output_size(self) -> int:
        width = self.input_size
        for stage in self.stages:
            width = _width_after(stage, width)
        return width

    def recurrent_only(self) -> "Pipeline":
        """The LSTM stacks alone, reading float vectors and returning every step (time-major)."""
        stacks = self.stacks
        return Pipeline(None, stacks[0].module.input_size, list(stacks), ("T", "B", "F"), ("T", "B", "F"))

    def dense(self) -> "Pipeline":
        """A copy whose ``leanlstm.LSTM`` stacks and ``FormLinear`` heads have every matrix dense (materialised), for
        dense baselines."""
        return replace(self, stages=[_dense_stage(s) for s in self.stages])

    def batch_of_one(self, inputs: np.ndarray) -> np.ndarray:
        """One sequence ``(T, ...)`` laid out as the model's input, with a batch axis of one."""
        axis = self.input_layout.index("B")
        time_axis = self.input_layout.index("T")
        return np.expand_dims(inputs, axis) if axis > time_axis else np.expand_dims(inputs, 0)

    def describe(self) -> str:
        """One line: the stages in order, e.g. ``embedding -> rnn (LSTM 2x24) -> decoder -> log_softmax``."""
        parts = ["tokens" if self.tokens else f"x ({self.input_size})"] + [_describe(s) for s in self.stages]
        return " -> ".join(parts)


def _width_after(stage: Stage, width: int) -> int:
    if isinstance(stage, Recurrent):
        return stage.module.output_size
    if isinstance(stage, Affine):
        return stage.module.out_features
    return width


def _describe(stage: Stage) -> str:
    if isinstance(stage, Recurrent):
        lstm = stage.module
        extra = ((", bidirectional" if lstm.bidirectional else "")
                 + (f", proj {lstm.proj_size}" if lstm.proj_size else ""))
        return f"{stage.name} (LSTM {'x'.join(map(str, lstm.hidden_sizes))}{extra})"
    if isinstance(stage, Affine):
        return f"{stage.name} (Linear {stage.module.in_features}->{stage.module.out_features})"
    if isinstance(stage, Activation):
        return stage.kind
    if isinstance(stage, Elementwise):
        return f"{stage.op} constant"
    return "last step"


def _dense_stage(stage: Stage) -> Stage:
    if isinstance(stage, Recurrent):
        return replace(stage, module=copy.deepcopy(stage.module).replace_forms("dense"))
    if isinstance(stage, Affine) and isinstance(stage.module, FormLinear):
        return replace(stage, module=stage.module.to_linear())
    return stage


# --- reading a model --------------------------------------------------------------------------------------------
SUPPORTED = ("an optional nn.Embedding, LSTM stacks (torch.nn.LSTM, leanlstm.LSTM), nn.Linear (or FormLinear) heads, "
             "and between them Dropout, ReLU, Tanh, Sigmoid, (Log)Softmax over the channels, per-channel constants "
             "(x - mean) / std, views and transposes of the batch and time axes, and out[:, -1] or h_n[-1] for the "
             "last step")


def pipeline_of(model: nn.Module | Pipeline, error: ErrorType = ValueError) -> Pipeline:
    """The model as a pipeline of stages; ``error`` is raised (naming the module or operation) when it cannot be.

    >>> class Spotter(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.rnn, self.fc = nn.LSTM(40, 64, 2, batch_first=True), nn.Linear(64, 12)
    ...     def forward(self, x):
    ...         out, _ = self.rnn(x)
    ...         return self.fc(out[:, -1])
    >>> pipeline_of(Spotter()).describe()
    'x (40) -> rnn (LSTM 64x64) -> last step -> fc (Linear 64->12)'
    """
    if isinstance(model, Pipeline):
        return model
    if not isinstance(model, nn.Module):
        raise error(f"leanlstm.runtime takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, RECURRENT_TYPES):
        lstm = _as_leanlstm(model)
        layout = ("B", "T", "F") if model.batch_first else ("T", "B", "F")
        return Pipeline(None, lstm.input_size, [Recurrent("", lstm)], layout, layout)
    if fx.Tracer().is_leaf_module(model, ""):           # a torch.nn building block that is not an LSTM
        raise error(f"leanlstm.runtime cannot run the model itself, a {type_name(model)}; it runs {SUPPORTED}")
    try:
        graph = trace(model)
    except GraphError as failure:
        raise error(str(failure)) from None
    return _Reader(graph, error, type(model).__name__).read()


def _as_leanlstm(module: nn.Module) -> LSTM:
    return LSTM.from_torch(module).eval() if isinstance(module, nn.LSTM) else module


def type_name(module: Any) -> str:
    """``torch.nn.Conv1d`` rather than ``torch.nn.modules.conv.Conv1d`` where the short name exists."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    if cls is LSTM:
        return "leanlstm.LSTM"
    return f"{cls.__module__}.{cls.__qualname__}"


# Modules and operations that act on the channels only, one time step at a time.
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Softmax: "softmax",
                       nn.LogSoftmax: "log_softmax"}
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", nn.functional.relu: "relu", torch.tanh: "tanh",
                         nn.functional.tanh: "tanh", torch.sigmoid: "sigmoid", nn.functional.sigmoid: "sigmoid",
                         torch.softmax: "softmax", nn.functional.softmax: "softmax",
                         torch.log_softmax: "log_softmax", nn.functional.log_softmax: "log_softmax"}
_ACTIVATION_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid", "softmax": "softmax",
                       "log_softmax": "log_softmax"}
_RUNNABLE = (nn.Embedding, *LINEAR_TYPES, *RECURRENT_TYPES, *_IDENTITY_MODULES, *_ACTIVATION_MODULES)
_IDENTITY_FUNCTIONS = {nn.functional.dropout}
_IDENTITY_METHODS = {"contiguous", "float", "clone", "detach"}
_BINARY = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
           torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div"}
_REVERSED = {"add": "add", "sub": "rsub", "mul": "mul", "div": "rdiv"}


class _Reader:
    """Walks the traced graph from the output back to the input, then reads the stages forwards, tracking
    the axes of the tensor on the path (``layout``) and its channel count (``width``)."""

    def __init__(self, graph: fx.GraphModule, error: ErrorType, model_name: str) -> None:
        self.graph, self.error, self.model_name = graph, error, model_name
        self.stages: list[Stage] = []
        self.layout: tuple[str, ...] = ("?0", "?1", "F")     # the input's axes, unknown until an LSTM reads them
        self.input_layout = self.layout
        self.width: int | None = None
        self.input_size: int | None = None
        self.embedding: nn.Embedding | None = None
        self.kind = "tensor"            # or "lstm" (an LSTM's (output, state) tuple), "state", "h_n"
        self.stack: LSTM | None = None  # the LSTM whose tuple or state is on the path

    # --- the path ---------------------------------------------------------------------------------------------
    def read(self) -> Pipeline:
        placeholder, path = self._path()
        self.placeholder = placeholder
        for node in path:                        # a module it cannot run says more than an operation around it
            if node.op == "call_module" and not isinstance(self.graph.get_submodule(node.target), _RUNNABLE):
                self._refuse(node)
        for node in path:
            self._read(node)
        if self.kind in ("state", "h_n"):
            raise self.error("the model's output is an LSTM's state, not its output: leanlstm.runtime runs models "
                             "whose output comes from " + SUPPORTED)
        if not any(isinstance(stage, Recurrent) for stage in self.stages):
            raise self.error(f"{self.model_name}: no LSTM on the path from the model's input to its output; "
                             f"leanlstm.runtime runs {SUPPORTED}")
        inputs = tuple(axis for axis in self.input_layout if not (self.embedding is not None and axis == "F"))
        return Pipeline(self.embedding, self.input_size, self.stages, inputs, self.layout)

    def _path(self) -> tuple[fx.Node, list[fx.Node]]:
        output = next(node for node in self.graph.graph.nodes if node.op == "output")
        main = _main_output(output.args[0])
        if main is None:
            raise self.error("the model returns no tensor (or a tuple without one) to run")
        path, node = [], main
        while node.op != "placeholder":
            path.append(node)
            node = self._data_input(node)
        return node, path[::-1]

    def _data_input(self, node: fx.Node) -> fx.Node:
        """The node whose tensor ``node`` transforms (its first tensor argument that is not a constant)."""
        if node.op == "call_function" and node.target in _BINARY:
            inputs = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
            if len(inputs) == 1:
                return inputs[0]
        elif node.args and isinstance(node.args[0], fx.Node):
            return node.args[0]
        raise self.error(f"leanlstm.runtime cannot run {self._what(node)}: it does not transform one tensor on "
                         f"the path from the model's input; it runs {SUPPORTED}")

    def _read(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self._module(node, self.graph.get_submodule(node.target))
        elif node.op == "call_function" and node.target is operator.getitem:
            self._getitem(node)
        elif node.op in ("call_function", "call_method"):
            self._operation(node)
        else:
            self._refuse(node)

    # --- modules ------------------------------------------------------------------------------------------------
    def _module(self, node: fx.Node, module: nn.Module) -> None:
        name = str(node.target)
        if isinstance(module, nn.Embedding):
            return self._embedding(node, module)
        self._need_tensor(node)
        if isinstance(module, RECURRENT_TYPES):
            return self._recurrent(node, name, module)
        if isinstance(module, LINEAR_TYPES):
            kind = "nn.Linear" if isinstance(module, nn.Linear) else type(module).__name__
            self._fit(module.in_features, node, f"{name} ({kind}) takes {module.in_features} inputs")
            self.stages.append(Affine(name, module))
            self.width = module.out_features
        elif isinstance(module, _IDENTITY_MODULES):
            pass
        elif type(module) in _ACTIVATION_MODULES:
            kind = _ACTIVATION_MODULES[type(module)]
            if kind in ("softmax", "log_softmax"):
                self._channel_dim(node, getattr(module, "dim", None))
            self.stages.append(Activation(name, kind))
        else:
            self._refuse(node)

    def _embedding(self, node: fx.Node, module: nn.Embedding) -> None:
        if module.max_norm is not None:         # renormalises the table on every lookup: not a plain table
            raise self.error(f"leanlstm.runtime cannot run {node.target} (nn.Embedding with max_norm): its lookups "
                             f"rewrite the table; set max_norm=None for inference")
        if self.stages or node.args[0] is not self.placeholder or self.embedding is not None:
            raise self.error(f"leanlstm.runtime runs an nn.Embedding only as the model's first step, reading the "
                             f"token ids it is given; {node.target} (nn.Embedding) reads something else")
        self.embedding, self.input_size, self.width = module, module.embedding_dim, module.embedding_dim

    def _recurrent(self, node: fx.Node, name: str, module: nn.Module) -> None:
        if len(self.layout) != 3 or "T" not in self.layout and not self._unbound():
            raise self.error(f"{name} ({type_name(module)}) reads a tensor with axes {self._shown()}, not a sequence "
                             f"(time, batch, channels)")
        self._check_state(node, name, module)
        lstm = _as_leanlstm(module)
        self._fit(lstm.input_size, node, f"{name} ({type_name(module)}) takes inputs of {lstm.input_size}")
        expected = ("B", "T", "F") if module.batch_first else ("T", "B", "F")
        if self._unbound():
            self._bind(expected)
        elif self.layout != expected:
            raise self.error(f"{name} ({type_name(module)}, batch_first={module.batch_first}) reads a tensor laid "
                             f"out {self._shown()}; it expects {expected}")
        self.stages.append(Recurrent(name, lstm))
        self.kind, self.stack, self.width = "lstm", lstm, lstm.output_size

    def _check_state(self, node: fx.Node, name: str, module: nn.Module) -> None:
        """The initial state may be an argument of ``forward`` or zeros, never computed from the input."""
        state = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
        seen, stack = set(), [a for a in _nodes_in(state)]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "call_module" or current is self.placeholder:
                raise self.error(f"{name} ({type_name(module)}) starts from a state computed from the model's input "
                                 f"({self._what(current)}); leanlstm.runtime takes the initial state as an argument "
                                 f"of run() instead")
            if _is_shape_read(current):
                continue                                   # x.shape[1], x.size(1): a batch size for zeros
            stack.extend(current.all_input_nodes)

    # --- indexing ----------------------------------------------------------------------------------------------
    def _getitem(self, node: fx.Node) -> None:
        index = node.args[1]
        if self.kind == "lstm":
            if index not in (0, 1):
                self._refuse(node)
            self.kind = "tensor" if index == 0 else "state"
            return
        if self.kind == "state":
            if index != 0:
                raise self.error(f"{self._what(node)} reads the LSTM's cell state c_n; leanlstm.runtime runs "
                                 f"models reading its output or its final hidden state h_n[-1]")
            self.kind, self.layout = "h_n", ("S", "B", "F")
            self.width = self.stack.layers[-1].output_size
            return
        if self.kind == "h_n":
            return self._final_state(node, index)
        self._index(node, index if isinstance(index, tuple) else (index,))

    def _final_state(self, node: fx.Node, index: Any) -> None:
        """``h_n[-1]``: the last layer's final hidden state, the last step of the output (one direction only)."""
        if index not in (-1, (-1,)) or self.stack.bidirectional or not self.stack.uniform_sizes:
            raise self.error(f"{self._what(node)} reads h_n[{index}]; leanlstm.runtime runs h_n[-1] of a "
                             f"unidirectional LSTM with one layer size (the last step of its output), or "
                             f"out[:, -1]")
        self.stages.append(LastStep(self._what(node)))
        self.kind, self.layout = "tensor", ("B", "F")

    def _index(self, node: fx.Node, index: tuple) -> None:
        if sum(i is Ellipsis for i in index) > 1:
            self._refuse(node)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (len(self.layout) - len(index) + 1) + index[at + 1:]
        if len(index) > len(self.layout):
            self._refuse(node)
        layout = []
        for axis, item in zip(self.layout, index + (slice(None),) * (len(self.layout) - len(index))):
            if item == slice(None):
                layout.append(axis)
            elif isinstance(item, int) and item == -1 and axis in ("T", "TB", "BT"):
                self.stages.append(LastStep(self._what(node)))
            else:
                what = {"F": "the channel axis", "B": "the batch axis"}.get(axis, f"axis {axis}")
                raise self.error(f"{self._what(node)} indexes {what} with {item!r}; leanlstm.runtime runs "
                                 f"out[:, -1] (the last step) and full slices only")
        self.layout = tuple(layout)

    # --- operations ----------------------------------------------------------------------------------------------
    def _operation(self, node: fx.Node) -> None:
        self._need_tensor(node)
        target = node.target
        if node.op == "call_function" and target in _ACTIVATION_FUNCTIONS:
            return self._activation(node, _ACTIVATION_FUNCTIONS[target])
        if node.op == "call_method" and target in _ACTIVATION_METHODS:
            return self._activation(node, _ACTIVATION_METHODS[target])
        if node.op == "call_function" and target in _IDENTITY_FUNCTIONS:
            return None
        if node.op == "call_function" and target in _BINARY:
            return self._elementwise(node, _BINARY[target])
        if node.op == "call_method" and target in _IDENTITY_METHODS:
            return None
        if node.op == "call_method" and target in ("view", "reshape"):
            return self._reshape(node, node.args[1:])
        if (node.op == "call_method" and target == "transpose") or (node.op == "call_function"
                                                                     and target is torch.transpose):
            return self._transpose(node, node.args[1], node.args[2])
        if node.op == "call_method" and target == "permute":
            return self._permute(node, node.args[1:])
        self._refuse(node)

    def _activation(self, node: fx.Node, kind: str) -> None:
        if kind in ("softmax", "log_softmax"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            self._channel_dim(node, dim)
        self.stages.append(Activation(self._what(node), kind))

    def _elementwise(self, node: fx.Node, op: str) -> None:
        first, second = node.args[0], node.args[1]
        data_first = isinstance(first, fx.Node) and first.op != "get_attr"
        constant = self._constant(node, second if data_first else first)
        op = op if data_first else _REVERSED[op]
        self.stages.append(Elementwise(self._what(node), op, constant))

    def _constant(self, node: fx.Node, value: Any) -> np.ndarray:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.asarray(value, np.float32)
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = _attribute(self.graph, value.target)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                array = tensor.detach().cpu().float().numpy()
                while array.ndim > 1 and array.shape[0] == 1:
                    array = array[0]
                if array.ndim == 0 or (array.ndim == 1 and (self.width is None or array.shape[0] == self.width)):
                    if array.ndim == 1:
                        self.width = array.shape[0]
                    return np.ascontiguousarray(array, np.float32)
        raise self.error(f"leanlstm.runtime cannot run {self._what(node)}: it combines the path's tensor with "
                         f"something other than a number or one constant per channel")

    def _reshape(self, node: fx.Node, shape: tuple) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not shape or not self._is_width(shape[-1]):
            raise self.error(f"{self._what(node)} reshapes the channel axis (to {shape}); leanlstm.runtime runs "
                             f"views that keep the channels last, e.g. view(-1, {self.width})")
        leading = self.layout[:-1]
        if len(shape) - 1 == len(leading):
            return None
        if len(shape) == 2 and set(leading) <= {"T", "B"} and len(leading) == 2:
            self.layout = ("".join(leading), "F")
            return None
        raise self.error(f"{self._what(node)} reshapes axes {self._shown()} to {len(shape)} axes; leanlstm.runtime "
                         f"runs views that keep the axes or merge time and batch, e.g. view(-1, {self.width})")

    def _transpose(self, node: fx.Node, a: int, b: int) -> None:
        order = list(range(len(self.layout)))
        a, b = (self._axis(node, d) for d in (a, b))
        order[a], order[b] = order[b], order[a]
        self._reorder(node, order)

    def _permute(self, node: fx.Node, dims: tuple) -> None:
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        self._reorder(node, [self._axis(node, d) for d in dims])

    def _reorder(self, node: fx.Node, order: list[int]) -> None:
        if sorted(order) != list(range(len(self.layout))) or order[-1] != len(self.layout) - 1:
            raise self.error(f"{self._what(node)} moves the channel axis of {self._shown()}; leanlstm.runtime runs "
                             f"transposes of the batch and time axes only")
        self.layout = tuple(self.layout[i] for i in order)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _need_tensor(self, node: fx.Node) -> None:
        if self.kind != "tensor":
            what = {"lstm": "the (output, state) tuple an LSTM returns", "state": "an LSTM's state (h_n, c_n)",
                    "h_n": "an LSTM's final hidden states h_n"}[self.kind]
            raise self.error(f"{self._what(node)} reads {what}; leanlstm.runtime runs the LSTM's output "
                             f"(out, _ = lstm(x)) or h_n[-1]")

    def _fit(self, size: int, node: fx.Node, message: str) -> None:
        if self.width is None:
            self.width = size
        if self.input_size is None:
            self.input_size = size
        if size != self.width:
            raise self.error(f"{message}, but the tensor it reads has {self.width} channels")

    def _is_width(self, value: Any) -> bool:
        if isinstance(value, int):
            return value == self.width
        return isinstance(value, fx.Node) and _reads_last_axis(value)

    def _axis(self, node: fx.Node, dim: Any) -> int:
        if not isinstance(dim, int) or not -len(self.layout) <= dim < len(self.layout):
            self._refuse(node)
        return dim % len(self.layout)

    def _channel_dim(self, node: fx.Node, dim: Any) -> None:
        if dim is None or self._axis(node, dim) != len(self.layout) - 1:
            raise self.error(f"{self._what(node)} normalises over dim={dim} of {self._shown()}; leanlstm.runtime "
                             f"runs (log-)softmax over the channels (the last axis) only")

    def _unbound(self) -> bool:
        return any(axis.startswith("?") for axis in self.layout)

    def _bind(self, expected: tuple[str, ...]) -> None:
        names = {axis: want for axis, want in zip(self.layout, expected) if axis.startswith("?")}
        self.input_layout = tuple(names.get(axis, axis) for axis in self.input_layout)
        self.layout = expected

    def _shown(self) -> str:
        return "(" + ", ".join("?" if axis.startswith("?") else axis for axis in self.layout) + ")"

    def _what(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.graph.get_submodule(node.target)
            return f"{node.target} ({type_name(module)})"
        if node.op == "call_method":
            return f".{node.target}() ({node.name})"
        if node.op == "call_function":
            target = node.target
            module = getattr(target, "__module__", None) or ""
            return f"{getattr(target, '__name__', target)}() ({node.name}{', ' + module if module else ''})"
        return f"{node.op} {node.target}"

    def _refuse(self, node: fx.Node) -> None:
        raise self.error(f"leanlstm.runtime cannot run {self._what(node)}; it runs {SUPPORTED}")


def _main_output(value: Any) -> fx.Node | None:
    """The model's output, or the first tensor of the tuple (or list) it returns."""
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in (_main_output(item) for item in value) if v is not None), None)
    return None


def _nodes_in(value: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return iter(found)


def _is_shape_read(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))
            or (node.op == "call_method" and node.target in ("size", "dim")))


def _reads_last_axis(node: fx.Node) -> bool:
    """``x.size(-1)``, ``x.shape[-1]`` (the channel count of some tensor on the path)."""
    if node.op == "call_method" and node.target == "size":
        return len(node.args) > 1 and node.args[1] == -1
    return (node.op == "call_function" and node.target is operator.getitem and node.args[1] == -1
            and isinstance(node.args[0], fx.Node) and _is_shape_read(node.args[0]))


def _attribute(graph: fx.GraphModule, target: str) -> Any:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value
