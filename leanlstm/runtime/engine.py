"""``compile(model) -> Engine``: batch-1 inference of a whole model in compiled code.

The model is read as a pipeline (``runtime.pipeline``): an optional embedding, LSTM stacks, ``nn.Linear`` heads (or
``FormLinear`` ones, multiplied through their weight form's op) and activations, per step or on the last step,
whatever the attributes are called. Each cell layer is compiled by its cell's registered ``compile_layer``
(``runtime.cells``), which asks every weight form for its ``runtime_op()`` (arrays + Numba kernels, see ``kernels``):
a sparse matrix runs as sparse, a Kronecker one through its factors, a low-rank one as two thin products; a form
without an op runs as its dense ``materialize()`` (with a warning). Per layer and direction, ``run`` makes one call
into compiled code that batches the input products of the whole sequence and loops over time; ``step`` advances one
time step. Inference semantics: dropout is off. Everything is float32 NumPy.

State is ``(h, c)``: two lists with one array per cell layer, in each stack's flat order (layer l, direction
d at ``l * D + d``, as PyTorch), stacks in the order the model runs them: ``h`` of the layer's output size
(``proj_size`` or H), ``c`` of H (``Engine.initial_state()``). Stacked ``(L, H)`` or PyTorch's ``(L, 1, H)``
arrays are accepted as input. Calls never modify the state passed in.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from . import kernels, precision as precisions
from ..nn import FormLinear
from .cells import CompiledLayer, EngineError, bind, cell_part, form_op
from .entry_points import specialise
from .pipeline import Activation, Affine, Elementwise, LastStep, Pipeline, Recurrent, Stage, pipeline_of

__all__ = ["Engine", "EngineError", "Stream", "compile", "form_op"]

State = tuple[list[np.ndarray], ...]            # public: one list per state part, e.g. (h, c)
LayerStates = list[tuple[np.ndarray, ...]]      # inside: one tuple of parts per cell layer
PART_NAMES = ("h", "c")


# --- compiling a model -------------------------------------------------------------------------------------
def compile(model: nn.Module | Pipeline, precision: str = "float32",  # noqa: A001 - the issue's name
            choose: str = "fastest") -> "Engine":
    """An inference engine for a model made of an optional ``nn.Embedding``, LSTM stacks (``torch.nn.LSTM``,
    ``leanlstm.LSTM``, any mix of weight forms, bidirectional, projected) and ``nn.Linear`` heads with the usual
    activations, per step or on the last step; a bare LSTM too. Anything else is an ``EngineError`` naming it.

    ``precision="int8"`` stores the weights of every form with an int8 op, and the heads, as int8 with per-row
    scales and quantises what they multiply at every step (``runtime.int8``); ``"bfloat16"`` stores them in
    bfloat16 (``runtime.bf16``). Forms without an op in that precision keep float32, and so do matrices whose op in
    it runs slower than their float32 one (timed while compiling, a few ms a matrix; ``choose="always"`` skips the
    timing and takes the precision's op wherever there is one). State and gates stay float32.

    >>> import leanlstm, numpy as np
    >>> engine = compile(leanlstm.LSTM(8, [16, 12]).replace_forms("lowrank", rank=4))
    >>> y, (h, c) = engine.run(np.zeros((5, 8), np.float32))
    >>> y.shape, [t.shape for t in h]
    ((5, 12), [(16,), (12,)])
    """
    if precision not in precisions.PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(precisions.PRECISIONS)}, got {precision!r}")
    if choose not in precisions.CHOICES:
        raise EngineError(f"choose must be one of {', '.join(precisions.CHOICES)}, got {choose!r}")
    pipeline = pipeline_of(model, EngineError)
    with torch.no_grad(), precisions.precision(precision, choose):
        source = _Tokens(pipeline.embedding, pipeline.input_layout) if pipeline.tokens else \
            _Vectors(pipeline.input_size, pipeline.input_layout)
        stages, layers = [], []
        for stage in pipeline.stages:
            compiled = _compile_stage(stage, len(layers))
            layers += compiled.flat if isinstance(compiled, _Stack) else []
            stages.append(compiled)
    return Engine(pipeline, source, stages, layers)


def _compile_stage(stage: Stage, first: int) -> Any:
    if isinstance(stage, Recurrent):
        return _Stack(stage, first)
    if isinstance(stage, Affine):
        return _FormAffine(stage) if isinstance(stage.module, FormLinear) else _Affine(stage.module)
    if isinstance(stage, Activation):
        return _Function(ACTIVATIONS[stage.kind])
    if isinstance(stage, Elementwise):
        constant = stage.constant
        return _Function(lambda x: ELEMENTWISE[stage.op](x, constant))
    if isinstance(stage, LastStep):
        return _LastStep()
    raise EngineError(f"{stage.name}: no engine stage for {type(stage).__name__}")


# --- stages ------------------------------------------------------------------------------------------------
class _Stack:
    """One recurrent stack: its cell layers, each direction compiled by its cell's ``compile_layer``."""

    def __init__(self, stage: Recurrent, first: int) -> None:
        lstm, prefix = stage.module, f"{stage.name}." if stage.name else ""
        self.name, self.directions, self.first = stage.name, lstm.num_directions, first
        self.flat: list[CompiledLayer] = []
        for index, layer in enumerate(lstm.layers):
            name = f"{prefix}layers.{index}"
            self.flat.append(cell_part(layer, "compile_layer", name, EngineError)(layer, name))
        self._indexed = list(enumerate(self.flat, first))

    def run(self, xs: np.ndarray, states: LayerStates) -> np.ndarray:
        D, index = self.directions, self.first
        if D == 1:
            for index, layer in self._indexed:
                xs = layer.run(xs, states[index])
            return xs
        for start in range(0, len(self.flat), D):
            outputs = [layer.run(xs, states[index + d]) for d, layer in enumerate(self.flat[start:start + D])]
            xs = outputs[0] if D == 1 else np.concatenate(outputs, axis=1)     # (T, D * out): [fwd | rev]
            index += D
        return xs

    def step(self, x: np.ndarray, states: LayerStates) -> np.ndarray:
        for index, layer in self._indexed:
            x = layer.step(x, states[index])
        return x

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.flat)


class _Affine:
    """An ``nn.Linear``: y = x @ W.T + b, through the panel kernels."""

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().cpu().float().numpy()
        bias = linear.bias.detach().cpu().numpy() if linear.bias is not None else np.zeros(linear.out_features)
        self.bias = _float32(bias)
        low = precisions.head_op(weight)
        if low is not None:             # the precision's own head product (int8, bf16)
            self.weight, affine = low
            self._affine = bind(affine, self.weight, self.bias, np.zeros((1, linear.in_features), np.float32))
        else:
            self.weight = kernels.pack_panels(weight)                             # (out, in) as panels
            self._affine = bind(kernels.affine, self.weight, self.bias,
                                np.zeros((1, linear.in_features), np.float32))

    def run(self, xs: np.ndarray, states: LayerStates) -> np.ndarray:
        return self._affine(self.weight, self.bias, xs if _exact(xs) else _float32(xs))   # the bound type only

    def step(self, x: np.ndarray, states: LayerStates) -> np.ndarray:
        return self.run(x.reshape(1, -1), states)[0]

    def nbytes(self) -> int:
        weights = self.weight if isinstance(self.weight, tuple) else (self.weight,)
        return sum(w.nbytes for w in weights) + self.bias.nbytes


class _FormAffine:
    """A ``FormLinear``: y = x @ W.T + b through the weight form's op (sparse, block-sparse, low-rank, ...), in the
    compile's precision where the form has an op in it."""

    def __init__(self, stage: Affine) -> None:
        head = stage.module
        self.op = form_op(head.form, f"{stage.name}.weight" if stage.name else "weight")
        bias = head.bias.detach().cpu().float().numpy() if head.bias is not None else np.zeros(head.out_features)
        self.bias = _float32(bias)
        self._call, self._args = specialise(kernels.form_affine, (self.op.matvec, self.op.matmat, self.op.arrays,
                                                                  self.bias), np.zeros((1, head.in_features),
                                                                                       np.float32))

    def run(self, xs: np.ndarray, states: LayerStates) -> np.ndarray:
        return self._call(*self._args, xs if _exact(xs) else _float32(xs))

    def step(self, x: np.ndarray, states: LayerStates) -> np.ndarray:
        return self.run(x.reshape(1, -1), states)[0]

    def nbytes(self) -> int:
        return self.op.nbytes() + self.bias.nbytes


class _Function:
    """A stateless function of the channels (activations, per-channel constants), on steps or sequences."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def run(self, xs: np.ndarray, states: LayerStates) -> np.ndarray:
        return self.function(xs)

    step = run

    def nbytes(self) -> int:
        return 0


class _LastStep(_Function):
    """``out[:, -1]``: the last step of a sequence; a single step passes through (a stream applies the head
    at every step, as if each step ended the sequence)."""

    def __init__(self) -> None:
        super().__init__(None)

    def run(self, xs: np.ndarray, states: LayerStates) -> np.ndarray:
        if not len(xs):
            raise EngineError("this model reads the last time step (out[:, -1]): give it at least one step")
        return xs[-1:]

    def step(self, x: np.ndarray, states: LayerStates) -> np.ndarray:
        return x


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) * np.tanh(np.float32(0.5) * x) + np.float32(0.5)   # never overflows, unlike 1/(1+e^-x)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


ACTIVATIONS = {"relu": lambda x: np.maximum(x, np.float32(0)), "tanh": np.tanh, "sigmoid": _sigmoid,
               "softmax": lambda x: np.exp(_log_softmax(x)), "log_softmax": _log_softmax}
ELEMENTWISE = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
               "rsub": lambda x, c: c - x, "rdiv": lambda x, c: c / x}


# --- inputs ------------------------------------------------------------------------------------------------
def _float32(array: np.ndarray) -> np.ndarray:
    """C-contiguous, writeable float32: the exact array type the bound kernels were compiled for. Values past
    float32's range become inf here, so check finiteness after this."""
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    return array if array.flags.writeable else array.copy()


def _batch_axis(layout: tuple[str, ...]) -> int:
    """Where a batch of one sits in the model's own input layout: (T, 1, ...) time-major, (1, T, ...) batch-first."""
    return 0 if layout.index("B") < layout.index("T") else 1


def _layout_text(layout: tuple[str, ...], size: int | None) -> str:
    return "(" + ", ".join({"B": "1", "F": str(size)}.get(axis, axis) for axis in layout) + ")"


class _Vectors:
    """Input of a model that reads float vectors of ``size``."""

    def __init__(self, size: int, layout: tuple[str, ...] = ("T", "B", "F")) -> None:
        self.size, self.layout, self.batch_axis = size, layout, _batch_axis(layout)
        self._finite = bind(_all_finite, np.zeros(1, np.float32))   # without Numba's dispatch: a stream's input

    def sequence(self, xs: Any) -> np.ndarray:
        if _exact(xs) and xs.ndim == 2 and xs.shape[1] == self.size and xs.shape[0]:  # check it compiled
            if not self._finite(xs.reshape(-1)):
                _check_finite(xs, "input", "time step ")             # raises, naming the step
            return xs
        xs = _numeric(xs, "input")
        if xs.ndim == 3 and xs.shape[self.batch_axis] == 1:           # a batch of one in the model's layout
            xs = xs[:, 0] if self.batch_axis == 1 else xs[0]
        if xs.ndim != 2 or xs.shape[1] != self.size:
            raise EngineError(f"input must have shape (T, {self.size}) (or {_layout_text(self.layout, self.size)}), "
                              f"got {xs.shape}")
        xs = _float32(xs)
        _check_finite(xs, "input", "time step ")
        return xs

    def single(self, x: Any) -> np.ndarray:
        if _exact(x) and x.shape == (self.size,):                  # the kernels' exact type: check it compiled
            if not self._finite(x):
                raise EngineError("input contains NaN or inf")
            return x
        x = _numeric(x, "input")
        if x.shape not in ((self.size,), (1, self.size)):
            raise EngineError(f"a step's input must have shape ({self.size},), got {x.shape}")
        x = _float32(x.reshape(self.size))
        _check_finite(x.reshape(1, -1), "input", "")
        return x


class _Tokens:
    """Input of a model that starts with an embedding: token ids, looked up in its table."""

    def __init__(self, embedding: nn.Embedding, layout: tuple[str, ...] = ("T", "B")) -> None:
        self.table = _float32(embedding.weight.detach().cpu().numpy())   # (V, E)
        self.layout, self.batch_axis = layout, _batch_axis(layout)
        self.lookup = precisions.embedding_lookup(self.table)            # int8 / bf16 rows, where compiled so
        if self.lookup is not None:
            self.vocab, self.table = len(self.table), None

    def sequence(self, tokens: Any) -> np.ndarray:
        tokens = _array(tokens)
        if tokens.ndim == 2 and tokens.shape[self.batch_axis] == 1:
            tokens = tokens[:, 0] if self.batch_axis == 1 else tokens[0]
        if tokens.ndim != 1:
            raise EngineError(f"token ids must have shape (T,) (or {_layout_text(self.layout, None)}), "
                              f"got {tokens.shape}")
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise EngineError(f"token ids must be integers, got dtype {tokens.dtype}")
        vocab = len(self.table) if self.lookup is None else self.vocab
        outside = np.flatnonzero((tokens < 0) | (tokens >= vocab))
        if outside.size:
            raise EngineError(f"token id {tokens[outside[0]]} at position {outside[0]} is outside the "
                              f"vocabulary [0, {vocab})")
        ids = tokens.astype(np.int64)
        return self.table[ids] if self.lookup is None else self.lookup(ids)    # (T, E)

    def single(self, token: Any) -> np.ndarray:
        return self.sequence(np.reshape(token, (1,)))[0]


def _exact(value: Any) -> bool:
    """Whether ``value`` is already the array type the bound kernels take (C-contiguous, writeable float32):
    then only its values need checking, compiled, which costs a few percent of the conversions' time."""
    return (type(value) is np.ndarray and value.dtype == np.float32 and value.flags.c_contiguous
            and value.flags.writeable)


def _array(value: Any) -> np.ndarray:
    """NumPy view of an array-like; PyTorch tensors are detached and moved to the CPU first."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _numeric(value: Any, what: str) -> np.ndarray:
    array = _array(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise EngineError(f"{what} must be real numbers, got dtype {array.dtype}")
    return array


def _check_finite(rows: np.ndarray, what: str, unit: str) -> None:
    """Raise naming the first row with a NaN or inf: the recurrence would spread it to every later step."""
    if rows.dtype == np.float32 and rows.flags.c_contiguous and _all_finite(rows.reshape(-1)):
        return                                   # the common case, without NumPy's temporaries
    bad = ~np.isfinite(rows).all(axis=-1)
    if bad.any():
        where = f" at {unit}{int(np.flatnonzero(bad)[0])}" if unit else ""
        raise EngineError(f"{what} contains NaN or inf{where}")


@numba.njit(cache=True, error_model="numpy")
def _all_finite(x: np.ndarray) -> bool:
    """Whether a contiguous 1-D float32 array holds no NaN or inf: no exponent field is all ones. Integer
    operations, so the loop vectorises without fastmath (which would fold float NaN checks away): about 5x
    faster than a float test with an early exit."""
    bits = x.view(np.uint32)
    worst = np.uint32(0)
    for i in range(bits.shape[0]):
        exponent = bits[i] & np.uint32(0x7F800000)
        worst = exponent if exponent > worst else worst
    return worst != np.uint32(0x7F800000)


# --- the engine ----------------------------------------------------------------------------------------------
class Engine:
    """Batch-1 inference of a whole model; build it with ``leanlstm.runtime.compile(model)``.

    ``run(xs, state=None) -> (ys, state)``: ``xs`` is (T, input) floats, or (T,) token ids for a model that
    starts with an embedding; ``ys`` is (T, output) for a per-step model, (output,) for one that reads the last
    step. ``step(x, state=None) -> (y, state)`` does one step; ``stream()`` steps with the state kept inside.
    A bidirectional model runs whole sequences only (``run``).
    """

    def __init__(self, pipeline: Pipeline, source: _Vectors | _Tokens, stages: Sequence[Any],
                 layers: Sequence[CompiledLayer]) -> None:
        self.pipeline, self._source, self._stages, self.layers = pipeline, source, list(stages), list(layers)
        parts = {len(layer.state_sizes()) for layer in self.layers}
        if len(parts) != 1:
            raise EngineError(f"the model's cells keep states of different kinds ({sorted(parts)} parts); the engine "
                              f"runs models whose cells all keep the same")
        self._parts, self._last_step = parts.pop(), pipeline.last_step
        self._sizes = [layer.state_sizes() for layer in self.layers]
        last = [stage for stage in self._stages if not isinstance(stage, _LastStep)][-1]
        self._copy_out = isinstance(last, _Stack)        # a stack's step returns its own state array

    @property
    def state_sizes(self) -> list[tuple[int, ...]]:
        """Per cell layer, the sizes of its state parts (``(output_size, H)`` for an LSTM layer)."""
        return list(self._sizes)

    @property
    def hidden_sizes(self) -> list[int]:
        return [sizes[-1] for sizes in self.state_sizes]

    @property
    def input_size(self) -> int:
        return self.pipeline.input_size

    @property
    def output_size(self) -> int:
        return self.pipeline.output_size

    def initial_state(self) -> State:
        """Zero state: ``([h_0, h_1, ...], [c_0, c_1, ...])`` with one array per cell layer."""
        return self._public(self._zeros())

    def run(self, xs: Any, state: Any = None) -> tuple[np.ndarray, State]:
        """Outputs for a whole sequence and the state after its last step."""
        xs = self._source.sequence(xs)
        states = self._state(state)
        for stage in self._stages:
            xs = stage.run(xs, states)
        return (xs[0] if self._last_step else xs), self._public(states)

    def stream(self, state: Any = None) -> "Stream":
        """A ``Stream`` for inputs that arrive one at a time, starting from ``state`` (default zeros)."""
        return Stream(self, state)

    def step(self, x: Any, state: Any = None) -> tuple[np.ndarray, State]:
        """The output of one time step and the state after it (the state passed in is copied and checked on
        every call: for a long stream of steps, ``stream()`` is several times faster). A model that reads the
        last step applies its head to this step."""
        self._check_streamable()
        states = self._state(state)
        return self._advance(self._source.single(x), states), self._public(states)

    def _advance(self, x: np.ndarray, states: LayerStates) -> np.ndarray:
        """One step through every stage, updating ``states`` in place; the output."""
        for stage in self._stages:
            x = stage.step(x, states)
        return x.copy() if self._copy_out else x

    def _check_streamable(self) -> None:
        if self.pipeline.bidirectional:
            names = ", ".join(s.name or "the LSTM" for s in self.pipeline.stacks if s.module.bidirectional)
            raise EngineError(f"{names} is bidirectional: its reverse direction starts from the end of the "
                              f"sequence, so it cannot run step by step; run whole sequences with run()")

    def nbytes(self) -> int:
        """Bytes of every array the engine multiplies by (embedding table excluded: it is only indexed)."""
        return sum(stage.nbytes() for stage in self._stages)

    # --- state ---------------------------------------------------------------------------------------------
    def _zeros(self) -> LayerStates:
        return [tuple([np.zeros(size, np.float32) for size in sizes]) for sizes in self._sizes]

    @staticmethod
    def _public(states: LayerStates) -> State:
        return tuple(list(part) for part in zip(*states))

    def _state(self, state: Any) -> LayerStates:
        """Fresh float32 copies of a given state (checked), or zeros."""
        if state is None:
            return self._zeros()
        if not (isinstance(state, (tuple, list)) and len(state) == self._parts):
            names = ", ".join(_part_name(p) for p in range(self._parts))
            kind = "pair" if self._parts == 2 else "tuple"
            raise EngineError(f"state must be a {kind} ({names}), as returned by run/step or initial_state()")
        parts = [self._state_part(part, p) for p, part in enumerate(state)]
        return list(zip(*parts))

    def _state_part(self, part: Any, which: int) -> list[np.ndarray]:
        name = _part_name(which)
        layers = list(part) if isinstance(part, (list, tuple)) else list(_numeric(part, f"state {name}"))
        if len(layers) != len(self.layers):
            raise EngineError(f"state {name} holds {len(layers)} layers, the model has {len(self.layers)}")
        out = []
        for index, (value, sizes) in enumerate(zip(layers, self._sizes)):
            size = sizes[which]
            if _exact(value) and value.shape == (size,) and _all_finite(value):
                out.append(value.copy())                           # the common case: a state run() returned
                continue
            value = _numeric(value, f"state {name}")
            if value.size != size or value.shape[-1] != size:
                raise EngineError(f"state {name} of layer {index} must have shape ({size},), got {value.shape}")
            with np.errstate(over="ignore"):                         # a copy: never modify the caller's
                value = np.array(value.reshape(size), dtype=np.float32)
            _check_finite(value.reshape(1, size), f"state {name} of layer {index}", "")
            out.append(value)
        return out


def _part_name(which: int) -> str:
    return PART_NAMES[which] if which < len(PART_NAMES) else f"part {which}"


class Stream:
    """Step-by-step inference that keeps its state inside, for inputs that arrive one at a time (audio
    frames, sensor readings, generated tokens): ``stream = engine.stream()``, then ``y = stream.step(x)``.

    ``Engine.step`` copies and checks the whole state on every call, which costs more than the step itself
    for a small LSTM (about 25 us against 3 for 2x32); a stream checks only the input and updates its own
    state arrays in place. ``state`` returns a copy of ``(h, c)``; ``reset()`` starts over from zeros. A model
    that reads the last step (``fc(out[:, -1])``) gives its head's output at every step.

    >>> import leanlstm, numpy as np
    >>> engine = compile(leanlstm.LSTM(4, 6))
    >>> xs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    >>> stream = engine.stream()
    >>> bool(np.allclose(np.stack([stream.step(x) for x in xs]), engine.run(xs)[0], atol=1e-6))
    True
    """

    def __init__(self, engine: Engine, state: Any = None) -> None:
        engine._check_streamable()
        self._engine, self._source = engine, engine._source
        self._states = engine._state(state)

    @property
    def state(self) -> State:
        return self._engine._public([tuple(part.copy() for part in layer) for layer in self._states])

    def reset(self, state: Any = None) -> None:
        """Start again from ``state`` (default zeros)."""
        self._states = self._engine._state(state)

    def step(self, x: Any) -> np.ndarray:
        """The output for input ``x``: a ``(input_size,)`` vector, or one token id."""
        return self._engine._advance(self._source.single(x), self._states)
