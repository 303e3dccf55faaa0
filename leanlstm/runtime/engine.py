"""``compile(model) -> Engine``: batch-1 streaming inference of a leanlstm model in compiled code.

The engine asks every weight form for its ``runtime_op()`` (arrays + Numba kernels, see ``kernels``), so a
sparse matrix runs as sparse, a Kronecker one through its factors, a low-rank one as two thin products; a
form without an op runs as its dense ``materialize()`` (with a warning). Per layer, ``run`` makes one call
into compiled code that batches the input products of the whole sequence and loops over time; ``step``
advances one time step. Inference semantics: dropout is off. Everything is float32 NumPy.

State is ``(h, c)``: two lists with one ``(H_l,)`` array per layer (``Engine.initial_state()``); stacked
``(L, H)`` or PyTorch's ``(L, 1, H)`` arrays are accepted as input. Calls never modify the state passed in.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from ..nn import LSTM, LSTMLayer, WeightForm
from . import kernels
from .kernels import RuntimeOp

log = logging.getLogger(__name__)

State = tuple[list[np.ndarray], list[np.ndarray]]


class EngineError(ValueError):
    """The model or an input cannot be run as given; the message names the part and the problem."""


# --- compiling a model -------------------------------------------------------------------------------------
def compile(model: nn.Module) -> "Engine":  # noqa: A001 - the issue's name for it
    """An inference engine for a ``leanlstm.LSTM``, a ``torch.nn.LSTM`` or a language model
    (``embedding`` -> ``lstm`` -> ``decoder``, such as ``WordLM``), in any mix of weight forms.

    >>> import leanlstm, numpy as np
    >>> engine = compile(leanlstm.LSTM(8, [16, 12]).replace_forms("lowrank", rank=4))
    >>> y, (h, c) = engine.run(np.zeros((5, 8), np.float32))
    >>> y.shape, [t.shape for t in h]
    ((5, 12), [(16,), (12,)])
    """
    lstm, embedding, decoder = _parts(model)
    _check_sizes(lstm, embedding, decoder)
    with torch.no_grad():
        layers = [_compile_layer(layer, index) for index, layer in enumerate(lstm.layers)]
        source = _Tokens(embedding) if embedding is not None else _Vectors(lstm.input_size)
        sink = _Decoder(decoder) if decoder is not None else None
    return Engine(layers, source, sink)


def _parts(model: nn.Module) -> tuple[LSTM, nn.Embedding | None, nn.Linear | None]:
    if isinstance(model, nn.LSTM):
        return LSTM.from_torch(model), None, None
    if isinstance(model, LSTM):
        return model, None, None
    if all(hasattr(model, part) for part in ("embedding", "lstm", "decoder")):
        lstm, embedding, decoder = model.lstm, model.embedding, model.decoder
        lstm, _, _ = _parts(lstm) if isinstance(lstm, (LSTM, nn.LSTM)) else _unsupported("model.lstm", lstm)
        if not isinstance(embedding, nn.Embedding):
            _unsupported("model.embedding", embedding)
        if not isinstance(decoder, nn.Linear):
            _unsupported("model.decoder", decoder)
        return lstm, embedding, decoder
    return _unsupported("the model", model)


def _check_sizes(lstm: LSTM, embedding: nn.Embedding | None, decoder: nn.Linear | None) -> None:
    """Every part must fit the next: the kernels multiply through raw addresses without bounds checks, where
    PyTorch would raise, so a mismatch (a form assigned by hand, a swapped decoder) must be refused here."""
    inputs = lstm.input_size
    if embedding is not None and embedding.embedding_dim != inputs:
        raise EngineError(f"the embedding is {embedding.embedding_dim} wide, the LSTM takes inputs of {inputs}")
    for index, layer in enumerate(lstm.layers):
        size = layer.hidden_size
        for matrix, expected in (("ih", (4 * size, inputs)), ("hh", (4 * size, size))):
            shape = tuple(layer.form(matrix).shape)
            if shape != expected:
                raise EngineError(f"layer {index}: weight_{matrix} is {shape[0]}x{shape[1]}, the layer needs "
                                  f"{expected[0]}x{expected[1]} (hidden size {size}, input size {inputs})")
        for name in ("bias_ih", "bias_hh"):
            bias = getattr(layer, name)
            if bias is not None and tuple(bias.shape) != (4 * size,):
                raise EngineError(f"layer {index}: {name} has shape {tuple(bias.shape)}, not ({4 * size},)")
        inputs = size
    if decoder is not None and decoder.in_features != inputs:
        raise EngineError(f"the decoder takes {decoder.in_features} inputs, the top LSTM layer gives {inputs}")


def _unsupported(part: str, module: Any):
    raise EngineError(f"leanlstm.runtime.compile cannot run {part}, a {type(module).__name__}: it takes a "
                      f"leanlstm.LSTM, a torch.nn.LSTM, or a language model whose embedding is nn.Embedding, "
                      f"lstm one of those two LSTMs and decoder nn.Linear")


def form_op(form: WeightForm, name: str = "weight") -> RuntimeOp:
    """The form's ``runtime_op()``, or, if it has none, its dense ``materialize()`` with a logged warning."""
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


def _bind(dispatcher: Any, *example: Any) -> Callable:
    """The compiled entry point of ``dispatcher`` for the types of ``example``.

    Calling it skips Numba's per-call type dispatch (about 6 us with function-valued arguments, more than
    a whole step of a small LSTM). It does not check types: callers pass arrays of the example's types.
    """
    return dispatcher.compile(tuple(numba.typeof(value) for value in example))


# --- layers ------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    input_size: int
    hidden_size: int
    ih: RuntimeOp
    hh: RuntimeOp
    bias: np.ndarray                 # bias_ih + bias_hh, (4H,)
    _run: Callable | None = None     # bound on first use: each costs a second of Numba compilation
    _step: Callable | None = None

    def run(self, xs: np.ndarray, h: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = np.empty((xs.shape[0], self.hidden_size), np.float32)
        args = (self.ih.matvec, self.ih.matmat, self.ih.arrays, self.hh.matvec, self.hh.arrays, self.bias,
                xs, h, c, out)
        if self._run is None:
            self._run = _bind(kernels.layer_run, *args)
        self._run(*args)
        return out

    def step(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        args = (self.ih.matvec, self.ih.arrays, self.hh.matvec, self.hh.arrays, self.bias, x, h, c)
        if self._step is None:
            self._step = _bind(kernels.layer_step, *args)
        self._step(*args)

    def nbytes(self) -> int:
        return self.ih.nbytes() + self.hh.nbytes() + self.bias.nbytes


def _compile_layer(layer: LSTMLayer, index: int) -> _Layer:
    ih = form_op(layer.weight_ih, f"layers.{index}.weight_ih")
    hh = form_op(layer.weight_hh, f"layers.{index}.weight_hh")
    bias = np.zeros(4 * layer.hidden_size, np.float32)
    if layer.bias_ih is not None:
        bias += (layer.bias_ih + layer.bias_hh).detach().cpu().numpy()
    return _Layer(layer.input_size, layer.hidden_size, ih, hh, bias)


# --- inputs and outputs --------------------------------------------------------------------------------------
def _float32(array: np.ndarray) -> np.ndarray:
    """C-contiguous, writeable float32: the exact array type the bound kernels were compiled for. Values past
    float32's range become inf here, so check finiteness after this."""
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    return array if array.flags.writeable else array.copy()


class _Vectors:
    """Input of an LSTM: float vectors of ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def sequence(self, xs: Any) -> np.ndarray:
        if _exact(xs) and xs.ndim == 2 and xs.shape[1] == self.size and xs.shape[0]:  # check it compiled
            if not _all_finite(xs.reshape(-1)):
                _check_finite(xs, "input", "time step ")             # raises, naming the step
            return xs
        xs = _numeric(xs, "input")
        if xs.ndim == 3 and xs.shape[1] == 1:        # PyTorch's (T, 1, in) batch-1 layout
            xs = xs[:, 0]
        if xs.ndim != 2 or xs.shape[1] != self.size:
            raise EngineError(f"input must have shape (T, {self.size}) (or (T, 1, {self.size})), "
                              f"got {xs.shape}")
        xs = _float32(xs)
        _check_finite(xs, "input", "time step ")
        return xs

    def single(self, x: Any) -> np.ndarray:
        if _exact(x) and x.shape == (self.size,):                  # the kernels' exact type: check it compiled
            if not _all_finite(x):
                raise EngineError("input contains NaN or inf")
            return x
        x = _numeric(x, "input")
        if x.shape not in ((self.size,), (1, self.size)):
            raise EngineError(f"a step's input must have shape ({self.size},), got {x.shape}")
        x = _float32(x.reshape(self.size))
        _check_finite(x.reshape(1, -1), "input", "")
        return x


class _Tokens:
    """Input of a language model: token ids, looked up in the embedding table."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.table = _float32(embedding.weight.detach().cpu().numpy())   # (V, E)

    def sequence(self, tokens: Any) -> np.ndarray:
        tokens = _array(tokens)
        if tokens.ndim == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        if tokens.ndim != 1:
            raise EngineError(f"token ids must have shape (T,) (or (T, 1)), got {tokens.shape}")
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise EngineError(f"token ids must be integers, got dtype {tokens.dtype}")
        outside = np.flatnonzero((tokens < 0) | (tokens >= len(self.table)))
        if outside.size:
            raise EngineError(f"token id {tokens[outside[0]]} at position {outside[0]} is outside the "
                              f"vocabulary [0, {len(self.table)})")
        return self.table[tokens.astype(np.int64)]                 # (T, E)

    def single(self, token: Any) -> np.ndarray:
        return self.sequence(np.reshape(token, (1,)))[0]


class _Decoder:
    """The language model's output layer: logits = h @ W.T + b."""

    def __init__(self, decoder: nn.Linear) -> None:
        self.weight = kernels.pack_panels(decoder.weight.detach().cpu().numpy())      # (V, H) as panels
        bias = decoder.bias.detach().cpu().numpy() if decoder.bias is not None else np.zeros(decoder.out_features)
        self.bias = _float32(bias)
        self._affine = _bind(kernels.affine, self.weight, self.bias, np.zeros((1, decoder.in_features),
                                                                           np.float32))

    def __call__(self, hs: np.ndarray) -> np.ndarray:
        return self._affine(self.weight, self.bias, hs)

    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes


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
    """Batch-1 streaming inference; build it with ``leanlstm.runtime.compile(model)``.

    ``run(xs, state=None) -> (ys, state)``: ``xs`` is (T, input) floats, or (T,) token ids for a language
    model; ``ys`` is (T, H_last), or logits (T, vocab). ``step(x, state=None) -> (y, state)`` does one step.
    """

    def __init__(self, layers: Sequence[_Layer], source: _Vectors | _Tokens, sink: _Decoder | None) -> None:
        self.layers, self._source, self._sink = list(layers), source, sink

    @property
    def hidden_sizes(self) -> list[int]:
        return [layer.hidden_size for layer in self.layers]

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    def initial_state(self) -> State:
        """Zero state: ``([h_0, h_1, ...], [c_0, c_1, ...])`` with one (H_l,) array per layer."""
        return ([np.zeros(s, np.float32) for s in self.hidden_sizes],
                [np.zeros(s, np.float32) for s in self.hidden_sizes])

    def run(self, xs: Any, state: Any = None) -> tuple[np.ndarray, State]:
        """Outputs (or logits) for a whole sequence and the state after its last step."""
        xs = self._source.sequence(xs)
        h, c = self._state(state)
        for layer, h_l, c_l in zip(self.layers, h, c):
            xs = layer.run(xs, h_l, c_l)                           # (T, H_l)
        return (xs if self._sink is None else self._sink(xs)), (h, c)

    def stream(self, state: Any = None) -> "Stream":
        """A ``Stream`` for inputs that arrive one at a time, starting from ``state`` (default zeros)."""
        return Stream(self, state)

    def step(self, x: Any, state: Any = None) -> tuple[np.ndarray, State]:
        """The output (or logits) of one time step and the state after it (the state passed in is copied
        and checked on every call: for a long stream of steps, ``stream()`` is several times faster)."""
        h, c = self._state(state)
        return self._advance(self._source.single(x), h, c), (h, c)

    def _advance(self, x: np.ndarray, h: list[np.ndarray], c: list[np.ndarray]) -> np.ndarray:
        """One step through every layer, updating ``h`` and ``c`` in place; the output (or logits)."""
        for layer, h_l, c_l in zip(self.layers, h, c):
            layer.step(x, h_l, c_l)
            x = h_l
        return x.copy() if self._sink is None else self._sink(x.reshape(1, -1))[0]

    def nbytes(self) -> int:
        """Bytes of every array the engine multiplies by (embedding table excluded: it is only indexed)."""
        return sum(layer.nbytes() for layer in self.layers) + (self._sink.nbytes() if self._sink else 0)

    def _state(self, state: Any) -> State:
        """Fresh float32 copies of a given state (checked), or zeros."""
        if state is None:
            return self.initial_state()
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise EngineError("state must be a pair (h, c), as returned by run/step or initial_state()")
        return tuple(self._state_part(part, name) for part, name in zip(state, "hc"))

    def _state_part(self, part: Any, name: str) -> list[np.ndarray]:
        layers = list(part) if isinstance(part, (list, tuple)) else list(_numeric(part, f"state {name}"))
        if len(layers) != len(self.layers):
            raise EngineError(f"state {name} holds {len(layers)} layers, the model has {len(self.layers)}")
        out = []
        for index, (value, size) in enumerate(zip(layers, self.hidden_sizes)):
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


class Stream:
    """Step-by-step inference that keeps its state inside, for inputs that arrive one at a time (audio
    frames, sensor readings, generated tokens): ``stream = engine.stream()``, then ``y = stream.step(x)``.

    ``Engine.step`` copies and checks the whole state on every call, which costs more than the step itself
    for a small LSTM (about 30 us against 3 for 2x32); a stream checks only the input and updates its own
    state arrays in place. ``state`` returns a copy of ``(h, c)``; ``reset()`` starts over from zeros.

    >>> import leanlstm, numpy as np
    >>> engine = compile(leanlstm.LSTM(4, 6))
    >>> xs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    >>> stream = engine.stream()
    >>> bool(np.allclose(np.stack([stream.step(x) for x in xs]), engine.run(xs)[0], atol=1e-6))
    True
    """

    def __init__(self, engine: Engine, state: Any = None) -> None:
        self._engine = engine
        self._h, self._c = engine._state(state)

    @property
    def state(self) -> State:
        return [h.copy() for h in self._h], [c.copy() for c in self._c]

    def reset(self, state: Any = None) -> None:
        """Start again from ``state`` (default zeros)."""
        self._h, self._c = self._engine._state(state)

    def step(self, x: Any) -> np.ndarray:
        """The output (or logits) for input ``x``: a ``(input_size,)`` vector, or one token id."""
        return self._engine._advance(self._engine._source.single(x), self._h, self._c)
