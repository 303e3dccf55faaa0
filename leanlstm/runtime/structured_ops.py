"""Runtime ops composed of other forms' ops: sums (doped ``S + D``) and row stacks (hybrid matrices).

A doped matrix ``S + D`` runs as ``S``'s op followed by ``D``'s op on the same output; a hybrid matrix as a
dense op on its top rows and a low-rank op on the rest. The composed kernels close over the parts' kernels
(Numba freezes them as constants) and take the parts' arrays as one flat tuple, cut at a constant
position. One kernel is compiled per combination of part kernels, shared by every matrix that uses it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

from .kernels import JIT, RuntimeOp, dense_op

# Closures over other kernels cannot be cached on disk; everything else as in ``kernels.JIT``.
COMPOSED = {key: value for key, value in JIT.items() if key != "cache"}


def child_op(form) -> RuntimeOp:
    """A part's own op, or its dense ``materialize()`` when it has none."""
    op = form.runtime_op()
    return op if op is not None else dense_op(form.materialize().detach().cpu().numpy())


@lru_cache(maxsize=None)
def _sum_kernels(first: RuntimeOp, second: RuntimeOp, cut: int):
    first_vec, second_vec, first_mat, second_mat = first.matvec, second.matvec, first.matmat, second.matmat

    @njit(**COMPOSED)
    def matvec(arrays, x, out, flip):
        first_vec(arrays[:cut], x, out, flip)
        second_vec(arrays[cut:], x, out, flip)

    if first_mat is None or second_mat is None:
        return matvec, None

    @njit(**COMPOSED)
    def matmat(arrays, xs, out):
        first_mat(arrays[:cut], xs, out)
        second_mat(arrays[cut:], xs, out)

    return matvec, matmat


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
    top_vec, rest_vec, top_mat, rest_mat = top.matvec, rest.matvec, top.matmat, rest.matmat

    @njit(**COMPOSED)
    def matvec(arrays, x, out, flip):
        top_vec(arrays[:cut], x, out[:rows], flip)
        rest_vec(arrays[cut:], x, out[rows:], flip)

    if top_mat is None or rest_mat is None:
        return matvec, None

    @njit(**COMPOSED)
    def matmat(arrays, xs, out):
        top_mat(arrays[:cut], xs, out[:, :rows])
        rest_mat(arrays[cut:], xs, out[:, rows:])

    return matvec, matmat


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
