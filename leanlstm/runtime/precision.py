"""The precision the engine compiles weight products in, and the registry of low-precision ops per form type.

``compile(model, precision=...)`` sets the precision for the duration of the compile; ``cells.form_op`` then asks
this registry for the form's op in that precision (``register_op("int8", Dense)(build)``; ``build(form) ->
RuntimeOp``) and keeps the form's float32 op where none is registered. A new precision or a new form's
low-precision op is a new registration, nothing else edited.
"""
from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

from .kernels import RuntimeOp

PRECISIONS = ("float32", "int8", "bfloat16")
# the modules that register the built-in ops of each precision
BUILTIN = {"int8": "leanlstm.runtime.int8", "bfloat16": "leanlstm.runtime.bf16"}
OPS: dict[str, dict[type, Callable[[Any], RuntimeOp]]] = {name: {} for name in PRECISIONS}
CHOICES = ("fastest", "always")     # per matrix: the faster of the precision's op and float32 (timed), or always it
_current: contextvars.ContextVar[str] = contextvars.ContextVar("leanlstm_engine_precision", default="float32")
_choice: contextvars.ContextVar[str] = contextvars.ContextVar("leanlstm_engine_choice", default="fastest")


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


@contextmanager
def precision(name: str, choose: str = "fastest") -> Iterator[None]:
    """Compile the engine's weight products in ``name`` inside the block (``compile`` uses it); ``choose="fastest"``
    keeps a matrix in float32 where its op in ``name`` runs slower (timed when compiling), ``"always"`` never does.

    >>> with precision("int8"):
    ...     current_precision(), current_choice()
    ('int8', 'fastest')
    """
    if choose not in CHOICES:
        raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {choose!r}")
    tokens = _current.set(check_precision(name)), _choice.set(choose)
    try:
        yield
    finally:
        _current.reset(tokens[0])
        _choice.reset(tokens[1])


def current_precision() -> str:
    return _current.get()


def current_choice() -> str:
    return _choice.get()


def register_op(precision_name: str, form_type: type) -> Callable[[Callable[[Any], RuntimeOp]], Callable]:
    """Register ``build(form) -> RuntimeOp``: the op of ``form_type`` (subclasses included) in ``precision_name``."""
    def register(build: Callable[[Any], RuntimeOp]) -> Callable[[Any], RuntimeOp]:
        OPS[check_precision(precision_name)][form_type] = build
        return build
    return register


HEADS: dict[str, Callable[[Any], tuple[Any, Any]]] = {}     # precision -> pack(weight) -> (arrays, affine kernel)


def register_head(precision_name: str) -> Callable[[Callable], Callable]:
    """Register ``pack(weight (out, in) float32) -> (arrays, affine)`` for ``nn.Linear`` heads in a precision;
    ``affine(arrays, bias, xs)`` is an njit kernel returning ``xs @ W.T + bias``."""
    def register(pack: Callable) -> Callable:
        HEADS[check_precision(precision_name)] = pack
        return pack
    return register


def head_op(weight: Any) -> tuple[Any, Any] | None:
    """The head's arrays and kernel in the current precision, or None (float32 panels)."""
    name = current_precision()
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    pack = HEADS.get(name)
    return pack(weight) if pack is not None else None


EMBEDDINGS: dict[str, Callable[[Any], Callable[[Any], Any]]] = {}   # precision -> pack(table) -> lookup(ids)


def register_embedding(precision_name: str) -> Callable[[Callable], Callable]:
    """Register ``pack(table (V, E) float32) -> lookup``, with ``lookup(ids) -> (T, E) float32`` rows of the table
    as stored in that precision (an int8 table with a scale per row, a bfloat16 one)."""
    def register(pack: Callable) -> Callable:
        EMBEDDINGS[check_precision(precision_name)] = pack
        return pack
    return register


def embedding_lookup(table: Any) -> Callable[[Any], Any] | None:
    """The embedding table's lookup in the current precision, or None (the float32 table)."""
    name = current_precision()
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    pack = EMBEDDINGS.get(name)
    return pack(table) if pack is not None else None


def op_in(precision_name: str, form: Any) -> RuntimeOp | None:
    """``form``'s op in ``precision_name`` from the registry, or None when its type has none."""
    if precision_name in BUILTIN:
        importlib.import_module(BUILTIN[precision_name])        # registers the built-in forms' ops
    table = OPS[check_precision(precision_name)]
    for kind in type(form).__mro__:
        if kind in table:
            return table[kind](form)
    return None
