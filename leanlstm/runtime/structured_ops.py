"""Runtime ops of the doping forms: sums and row stacks of other forms' ops, and block-circulant products.

A doped matrix ``S + D`` runs as ``S``'s op followed by ``D``'s op on the same output; a hybrid matrix as a
dense op on its top rows and a low-rank op on the rest. The composed kernels close over the parts' kernels
(Numba freezes them as constants) and take the parts' arrays as one flat tuple, cut at a constant
position. One kernel is compiled per combination of part kernels, shared by every matrix that uses it.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

from .kernels import JIT, RuntimeOp, dense_op, f32

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


# --- block circulant ----------------------------------------------------------------------------------------
@njit(**JIT)
def circulant_matvec(arrays, x, out, flip):
    """``out += W @ x``, block by block: ``C x`` adds ``x[j]`` times ``c`` rotated by ``j``, i.e. two
    contiguous runs ``c[:b-j]`` into ``acc[j:]`` and ``c[b-j:]`` into ``acc[:j]``. Direct rather than FFT:
    Numba has no FFT, and for blocks of a few dozen the direct sum over a cached vector is cheap."""
    vectors, sizes = arrays                                  # (P, Q, b); [out, in]
    rows, cols, b = vectors.shape
    n_out, n_in = sizes[0], sizes[1]
    acc = np.empty(b, np.float32)
    for p in range(rows):
        acc[:] = 0.0
        for q in range(cols):
            c = vectors[p, q]
            for j in range(min(b, n_in - q * b)):
                xj = x[q * b + j]
                head, tail, low, high = acc[j:], c[: b - j], acc[:j], c[b - j:]
                for i in range(b - j):
                    head[i] += xj * tail[i]
                for i in range(j):
                    low[i] += xj * high[i]
        for i in range(min(b, n_out - p * b)):
            out[p * b + i] += acc[i]


def circulant_op(vectors: np.ndarray, out_features: int, in_features: int) -> RuntimeOp:
    """The op of a block-circulant matrix from its ``(P, Q, b)`` block vectors, cropped to ``(out, in)``."""
    arrays = (np.ascontiguousarray(vectors, dtype=f32), np.array([out_features, in_features], np.int64))
    return RuntimeOp(arrays, circulant_matvec)
