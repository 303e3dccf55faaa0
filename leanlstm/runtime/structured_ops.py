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

from .kernels import (JIT, RuntimeOp, _combine, _gather_grid, _scatter_add, _scratch, dense_op, f32,
                      grid_index)

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


# --- block circulant: products in the frequency domain ------------------------------------------------------
# C x = irfft(rfft(c) * rfft(x)) per block. Numba has no FFT, and blocks are a few dozen wide, so both
# transforms are small real matrices (``F`` stacks the cosine and sine rows of the real DFT, ``G`` inverts
# it using the spectrum's symmetry), applied with the row-combination kernel; the spectra of the stored
# vectors are computed once. Per block pair the product is then b/2+1 complex multiply-adds where a dense
# block costs b^2, run along the P output blocks so the loop vectorises.
@njit(**JIT)
def _circulant_apply(forward, inverse, c_real, c_imag, gather, scatter, x, out):
    half, b = forward.shape[0] // 2, forward.shape[1]
    cols, rows = c_real.shape[0], c_real.shape[2]           # Q input blocks, P output blocks
    blocks = _scratch(b, cols)                               # x as columns of blocks
    _gather_grid(x, gather, blocks)
    x_freq = _scratch(2 * half, cols)                        # [Re; Im] of each block's rfft
    _combine(forward, blocks, x_freq)
    y_freq = _scratch(2 * half, rows)
    for q in range(cols):
        for k in range(half):
            xr, xi = x_freq[k, q], x_freq[half + k, q]
            for p in range(rows):
                cr, ci = c_real[q, k, p], c_imag[q, k, p]
                y_freq[k, p] += cr * xr - ci * xi
                y_freq[half + k, p] += cr * xi + ci * xr
    y = _scratch(b, rows)                                    # y[i, p]: element i of output block p
    _combine(inverse, y_freq, y)
    _scatter_add(y, scatter, out)


@njit(**JIT)
def circulant_matvec(arrays, x, out, flip):
    forward, inverse, c_real, c_imag, gather, scatter = arrays
    _circulant_apply(forward, inverse, c_real, c_imag, gather, scatter, x, out)


@njit(**JIT)
def circulant_matmat(arrays, xs, out):
    forward, inverse, c_real, c_imag, gather, scatter = arrays
    for t in range(xs.shape[0]):
        _circulant_apply(forward, inverse, c_real, c_imag, gather, scatter, xs[t], out[t])


def real_dft(b: int) -> tuple[np.ndarray, np.ndarray]:
    """``F`` (2h, b) with ``F @ x = [Re; Im] rfft(x)`` and ``G`` (b, 2h) with ``G @ [Re; Im] = irfft``, h = b//2+1.

    >>> f, g = real_dft(6); x = np.arange(6.0)
    >>> bool(np.allclose(f @ x, np.concatenate([np.fft.rfft(x).real, np.fft.rfft(x).imag])))
    True
    >>> bool(np.allclose(g @ f @ x, x))
    True
    """
    half = b // 2 + 1
    angle = 2 * np.pi * np.outer(np.arange(half), np.arange(b)) / b           # (h, b)
    forward = np.concatenate([np.cos(angle), -np.sin(angle)])
    weight = np.full(half, 2.0)                                                # each bin stands for its mirror too
    weight[0] = 1.0
    if b % 2 == 0:
        weight[-1] = 1.0                                                       # the Nyquist bin has no mirror
    inverse = np.concatenate([np.cos(angle).T * weight, -np.sin(angle).T * weight], axis=1) / b
    return forward, inverse


def circulant_op(vectors: np.ndarray, out_features: int, in_features: int) -> RuntimeOp:
    """The op of a block-circulant matrix from its ``(P, Q, b)`` block vectors, cropped to ``(out, in)``."""
    rows, cols, b = vectors.shape
    forward, inverse = real_dft(b)
    spectrum = np.fft.rfft(np.asarray(vectors, np.float64), axis=-1).transpose(1, 2, 0)  # (Q, h, P)
    gather = grid_index(cols, b, in_features, transposed=True)     # blocks[j, q] holds x[q*b + j]
    scatter = grid_index(rows, b, out_features, transposed=True)   # y[i, p] is output p*b + i
    contiguous = [np.ascontiguousarray(a, f32) for a in (forward, inverse, spectrum.real, spectrum.imag)]
    return RuntimeOp((*contiguous, gather, scatter), circulant_matvec, circulant_matmat)  # ``_combine`` reads rows
