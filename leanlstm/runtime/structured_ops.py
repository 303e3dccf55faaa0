"""Runtime ops composed of other forms' ops: sums (doped ``S + D``) and row stacks (hybrid matrices).

A doped matrix ``S + D`` runs as ``S``'s op followed by ``D``'s op on the same output; a hybrid matrix as a
dense op on its top rows and a low-rank op on the rest. The composed kernels call the parts' kernels by name
(Numba compiles them in as constants) and take the parts' arrays as one flat tuple, cut at a constant
position. One kernel is compiled per combination of part kernels, shared by every matrix that uses it, and
cached on disk like every other kernel (``entry_points.generated_kernels``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .entry_points import generated_kernels
from .kernels import JIT, RuntimeOp, dense_op

_SUM = """
@njit(**OPTIONS)
def matvec(arrays, x, out, flip):
    first_vec(arrays[:CUT], x, out, flip)
    second_vec(arrays[CUT:], x, out, flip)
"""
_SUM_MAT = """
@njit(**OPTIONS)
def matmat(arrays, xs, out):
    first_mat(arrays[:CUT], xs, out)
    second_mat(arrays[CUT:], xs, out)
"""
_STACK = """
@njit(**OPTIONS)
def matvec(arrays, x, out, flip):
    top_vec(arrays[:CUT], x, out[:ROWS], flip)
    rest_vec(arrays[CUT:], x, out[ROWS:], flip)
"""
_STACK_MAT = """
@njit(**OPTIONS)
def matmat(arrays, xs, out):
    top_mat(arrays[:CUT], xs, out[:, :ROWS])
    rest_mat(arrays[CUT:], xs, out[:, ROWS:])
"""


def child_op(form) -> RuntimeOp:
    """A part's op in the precision being compiled (``cells.form_op``: a doped matrix's sparse part in int8 with its
    structured part in whatever that has), or its dense ``materialize()`` when it has none."""
    from .cells import form_op      # cells imports the kernels this module builds on

    return form_op(form, type(form).__name__)


def _composed(matvec_body: str, matmat_body: str, parts: dict[str, RuntimeOp], constants: dict[str, int]):
    """``(matvec, matmat)`` of the bodies with each part's kernels as ``<part>_vec`` / ``<part>_mat``; matmat is
    None unless every part has one."""
    kernels = {f"{name}_vec": op.matvec for name, op in parts.items()}
    with_matmat = all(op.matmat is not None for op in parts.values())
    if with_matmat:
        kernels |= {f"{name}_mat": op.matmat for name, op in parts.items()}
    made = generated_kernels(matvec_body + (matmat_body if with_matmat else ""), kernels, constants, JIT)
    return made.matvec, made.matmat if with_matmat else None


@lru_cache(maxsize=None)
def _sum_kernels(first: RuntimeOp, second: RuntimeOp, cut: int):
    return _composed(_SUM, _SUM_MAT, {"first": first, "second": second}, {"CUT": cut})


def sum_op(first: RuntimeOp, second: RuntimeOp) -> RuntimeOp:
    """The op of ``W1 + W2`` (same shape): both products accumulate into the same output.

    >>> w = np.eye(2, dtype=np.float32); op = sum_op(dense_op(w), dense_op(2 * w)); out = np.zeros(2, np.float32)
    >>> op.matvec(op.arrays, np.ones(2, np.float32), out, False); out.tolist()
    [3.0, 3.0]
    """
    matvec, matmat = _sum_kernels(_kernels_only(first), _kernels_only(second), len(first.arrays))
    return RuntimeOp(first.arrays + second.arrays, matvec, matmat)


@lru_cache(maxsize=None)
def _stack_kernels(top: RuntimeOp, rest: RuntimeOp, cut: int, rows: int):
    return _composed(_STACK, _STACK_MAT, {"top": top, "rest": rest}, {"CUT": cut, "ROWS": rows})


def row_stack_op(top: RuntimeOp, rest: RuntimeOp, rows: int) -> RuntimeOp:
    """The op of ``[W_top; W_rest]``: ``top`` writes output rows ``[0, rows)``, ``rest`` the others.

    >>> w = np.eye(2, dtype=np.float32); op = row_stack_op(dense_op(w[:1]), dense_op(3 * w[1:]), 1)
    >>> out = np.zeros(2, np.float32); op.matvec(op.arrays, np.ones(2, np.float32), out, False); out.tolist()
    [1.0, 3.0]
    """
    matvec, matmat = _stack_kernels(_kernels_only(top), _kernels_only(rest), len(top.arrays), rows)
    return RuntimeOp(top.arrays + rest.arrays, matvec, matmat)


def _kernels_only(op: RuntimeOp) -> RuntimeOp:
    """The op without its arrays: the cache key of a composed kernel (arrays are not hashable)."""
    return RuntimeOp((), op.matvec, op.matmat)
