"""Kronecker factors in int8 (``nn.forms.kronecker.Kronecker``): ``(A kron B) x`` as two int8 products.

The float32 op (``kernels.kron_op``) reads ``x`` as a grid ``X`` (k x s) and computes ``Y = L X R^T`` (p x q) in the
cheaper of two orders, ``L`` and ``R`` being the factors in the orientation ``kernels.kron_plan`` picks
(``kernels.kron_layout``, shared by both ops). Here both factors are stored as int8 with a scale per row
(``int8.pack_int8``) and each stage is the dense int8 product (``int8.int8_gemm``) of a factor with the rows of the
grid it multiplies, every row quantised on its own, as the engine quantises every vector a weight multiplies:

    left first    V^T = X^T L^T  (s x p),  then  Y   = V R^T    (p x q)
    right first   Z   = X R^T    (k x q),  then  Y^T = Z^T L^T  (q x p)

The intermediate is re-quantised between the stages (as a low-rank product's thin vector is). The factors are
small (a 20x Kronecker matrix of PTB ``medium-cpu`` stores tens of kB), so the op is bound by arithmetic and per-call
work rather than bytes; ``compile`` keeps whichever of int8 and float32 runs faster for each matrix.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..nn.forms.kronecker import Kronecker
from .int8 import _check_cpu, int8_gemm, pack_int8
from .kernels import JIT, RuntimeOp, _gather_grid, _scatter_add, kron_layout
from .precision import register_op


@njit(**JIT)
def int8_kron_matvec(arrays, x, out, flip):
    """One step: ``Y = L X R^T`` through two int8 products, then added to ``out`` (cropped, reordered)."""
    lp, ls, lc, rp, rs, rc, gather, scatter, dims = arrays
    p, k, s, q, left_first = dims[0], dims[1], dims[2], dims[3], dims[4]
    grid = np.zeros((k, s), np.float32)
    _gather_grid(x, gather, grid)
    y = np.zeros((p, q), np.float32)
    if left_first == 1:
        vt = np.zeros((s, p), np.float32)
        int8_gemm(lp, ls, lc, np.ascontiguousarray(grid.T), vt)          # V^T = X^T L^T
        int8_gemm(rp, rs, rc, np.ascontiguousarray(vt.T), y)             # Y = V R^T
    else:
        z = np.zeros((k, q), np.float32)
        int8_gemm(rp, rs, rc, grid, z)                                   # Z = X R^T
        yt = np.zeros((q, p), np.float32)
        int8_gemm(lp, ls, lc, np.ascontiguousarray(z.T), yt)             # Y^T = Z^T L^T
        y[:] = yt.T
    _scatter_add(y, scatter, out)


@njit(**JIT)
def int8_kron_matmat(arrays, xs, out):
    for t in range(xs.shape[0]):
        int8_kron_matvec(arrays, xs[t], out[t], False)


def int8_kron_op(a: np.ndarray, b: np.ndarray, out_features: int, in_features: int) -> RuntimeOp:
    """The int8 op of ``(a kron b)`` cropped to ``(out_features, in_features)``, in ``kron_plan``'s order.

    >>> a, b = np.array([[1.0, -1.0]], np.float32), np.array([[2.0], [1.0]], np.float32)  # a kron b: [[2, -2], [1, -1]]
    >>> op = int8_kron_op(a, b, 2, 2); out = np.zeros(2, np.float32)
    >>> op.matvec(op.arrays, np.array([1.0, -1.0], np.float32), out, False)
    >>> out.tolist()                                        # values on the int8 grids: exact
    [4.0, 2.0]
    """
    left, right, gather, scatter, left_first = kron_layout(a, b, out_features, in_features)   # L (p x k), R (q x s)
    dims = np.array([left.shape[0], left.shape[1], right.shape[1], right.shape[0], int(left_first)], np.int64)
    arrays = pack_int8(np.asarray(left, np.float32)) + pack_int8(np.asarray(right, np.float32)) + (
        gather, scatter, dims)
    return RuntimeOp(arrays, int8_kron_matvec, int8_kron_matmat)


@register_op("int8", Kronecker)
def _int8(form: Kronecker) -> RuntimeOp:
    _check_cpu()
    return int8_kron_op(form.a.detach().cpu().float().numpy(), form.b.detach().cpu().float().numpy(),
                        form.out_features, form.in_features)


__all__ = ["int8_kron_op"]
