"""Numba kernels of the batch-1 engine: weight products per storage layout, LSTM gates and the recurrence.

Every weight form hands the engine a ``RuntimeOp``: a tuple of NumPy arrays plus two kernels,

- ``matvec(arrays, x, out, flip)``: ``out += W @ x`` for one time step, ``x`` (in,), ``out`` (out,);
- ``matmat(arrays, X, out)`` (optional): ``out += X @ W.T`` for a whole sequence, ``X`` (T, in), ``out`` (T, out).

``flip`` asks a kernel to walk its weights in reverse. The engine alternates it every step: a matrix larger
than the cache then starts where the previous step stopped, on rows that are still cached (about 20% less
traffic from L3 for a 2600x650 dense matrix). Kernels for which order does not matter ignore it.

The recurrence (``layer_run``) takes the kernels as first-class function arguments; Numba compiles one
specialisation per kernel pair, so the loop over time runs entirely in compiled code.

Numba idioms that decide vectorisation here (each cost 3-5x when missing):
- ``error_model="numpy"``: otherwise every division checks for zero and no loop with one vectorises;
- rows and diagonals are taken as slices and indexed by ``range`` variables: a computed index such as
  ``vals[base + r]`` keeps Numba's negative-index wraparound and blocks contiguous vector loads;
- the sparse kernel accumulates into a stack buffer: LLVM cannot prove a heap buffer does not alias the
  gathered input, and then refuses to vectorise the gather at all;
- inner loops index 2-D arrays as ``w[i, j]`` rather than through row views ``w[i]``: every view costs
  two atomic reference-count updates, which dominated products of small matrices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)
f32 = np.float32


@dataclass(frozen=True)
class RuntimeOp:
    """What the engine needs from a weight form: its arrays and the Numba kernels that multiply by it.

    >>> op = dense_op(np.eye(2, dtype=np.float32)); out = np.zeros(2, np.float32)
    >>> op.matvec(op.arrays, np.ones(2, np.float32), out, False); out.tolist()
    [1.0, 1.0]
    """

    arrays: tuple[np.ndarray, ...]   # passed unchanged to the kernels
    matvec: Any                      # njit: matvec(arrays, x, out, flip), out += W @ x
    matmat: Any = None               # njit: matmat(arrays, X, out), out += X @ W.T; None: matvec per step

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


# --- helpers ----------------------------------------------------------------------------------------------
@intrinsic
def _stack_f32(typingctx, n):
    """A pointer to ``n`` float32 on the caller's stack (an ``alloca``, which LLVM knows aliases nothing).

    Only valid inside the calling function: wrap it with ``carray`` there, never return it.
    """
    def codegen(context, builder, signature, args):
        return builder.alloca(ir.FloatType(), size=args[0])
    return types.CPointer(types.float32)(types.intp), codegen


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorise the calling function with 512-bit registers where the CPU has them.

    LLVM defaults to 256 bits on Intel CPUs. For the compute-bound batched product, 512 bits over aligned
    rows in 6x4 tiles reach 125 GFLOP/s where 256 bits over unaligned rows in 4x4 tiles reached 90.
    (A string function attribute: llvmlite has no API for those.)
    """
    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except Exception:  # noqa: BLE001 - only a speed hint; never fail compilation over it
            pass
        return context.get_dummy_value()
    return types.none(), codegen


def aligned_matrix(matrix: np.ndarray, multiple: int = 16) -> np.ndarray:
    """A float32 copy whose rows start on 64-byte boundaries: columns zero-padded to ``multiple``.

    Vector loads then never straddle two cache lines; the padding is zero, so products are unchanged.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    rows, cols = matrix.shape
    width = -(-cols // multiple) * multiple
    buffer = np.zeros(rows * width + 16, np.float32)
    start = (-buffer.ctypes.data % 64) // 4
    out = buffer[start:start + rows * width].reshape(rows, width)
    out[:, :cols] = matrix
    return out


@njit(**JIT)
def _aligned_rows(xs, steps, width):
    """``xs`` copied into ``steps`` zero-padded rows of ``width`` that start on 64-byte boundaries."""
    buffer = np.zeros(steps * width + 16, np.float32)
    start = ((64 - buffer.ctypes.data % 64) % 64) // 4
    out = buffer[start:start + steps * width].reshape(steps, width)
    out[: xs.shape[0], : xs.shape[1]] = xs
    return out


# --- dense products ---------------------------------------------------------------------------------------
@njit(inline="always", **JIT)
def _dot4(w, x, out, i):
    a0 = a1 = a2 = a3 = f32(0.0)
    for j in range(x.shape[0]):
        xj = x[j]
        a0 += w[i, j] * xj
        a1 += w[i + 1, j] * xj
        a2 += w[i + 2, j] * xj
        a3 += w[i + 3, j] * xj
    out[i] += a0
    out[i + 1] += a1
    out[i + 2] += a2
    out[i + 3] += a3


@njit(**JIT)
def gemv(w, x, out, flip):
    """``out += w @ x``; four rows share each load of ``x``. ``flip`` walks the row blocks backwards."""
    blocks = w.shape[0] // 4
    for b in range(blocks):
        _dot4(w, x, out, 4 * (blocks - 1 - b) if flip else 4 * b)
    for i in range(4 * blocks, w.shape[0]):
        acc = f32(0.0)
        for j in range(x.shape[0]):
            acc += w[i, j] * x[j]
        out[i] += acc


@njit(inline="always", **JIT)
def _tile6x4(w, xs, out, i, t, width, to):
    """out[to:to+4, i:i+6] += xs[t:t+4] @ w[i:i+6].T: 24 accumulators, 10 loads per 24 multiply-adds."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = f32(0.0)
    a30 = a31 = a32 = a33 = a40 = a41 = a42 = a43 = a50 = a51 = a52 = a53 = f32(0.0)
    for j in range(width):
        v0, v1, v2, v3, v4, v5 = w[i, j], w[i + 1, j], w[i + 2, j], w[i + 3, j], w[i + 4, j], w[i + 5, j]
        y0, y1, y2, y3 = xs[t, j], xs[t + 1, j], xs[t + 2, j], xs[t + 3, j]
        a00 += v0 * y0; a01 += v0 * y1; a02 += v0 * y2; a03 += v0 * y3  # noqa: E702
        a10 += v1 * y0; a11 += v1 * y1; a12 += v1 * y2; a13 += v1 * y3  # noqa: E702
        a20 += v2 * y0; a21 += v2 * y1; a22 += v2 * y2; a23 += v2 * y3  # noqa: E702
        a30 += v3 * y0; a31 += v3 * y1; a32 += v3 * y2; a33 += v3 * y3  # noqa: E702
        a40 += v4 * y0; a41 += v4 * y1; a42 += v4 * y2; a43 += v4 * y3  # noqa: E702
        a50 += v5 * y0; a51 += v5 * y1; a52 += v5 * y2; a53 += v5 * y3  # noqa: E702
    out[to, i] += a00; out[to + 1, i] += a01; out[to + 2, i] += a02; out[to + 3, i] += a03  # noqa: E702
    out[to, i + 1] += a10; out[to + 1, i + 1] += a11; out[to + 2, i + 1] += a12; out[to + 3, i + 1] += a13  # noqa: E702
    out[to, i + 2] += a20; out[to + 1, i + 2] += a21; out[to + 2, i + 2] += a22; out[to + 3, i + 2] += a23  # noqa: E702
    out[to, i + 3] += a30; out[to + 1, i + 3] += a31; out[to + 2, i + 3] += a32; out[to + 3, i + 3] += a33  # noqa: E702
    out[to, i + 4] += a40; out[to + 1, i + 4] += a41; out[to + 2, i + 4] += a42; out[to + 3, i + 4] += a43  # noqa: E702
    out[to, i + 5] += a50; out[to + 1, i + 5] += a51; out[to + 2, i + 5] += a52; out[to + 3, i + 5] += a53  # noqa: E702


@njit(**JIT)
def gemm(w, xs, out):
    """``out += xs @ w[:, :n].T`` with ``xs`` (T, n), ``w`` (m, >= n, zero beyond n), ``out`` (T, m).

    6x4 register tiles over 64-byte aligned rows (``aligned_matrix`` weights; the inputs are copied so),
    vectorised 512 bits wide: about 125 GFLOP/s on one core of the development machine, 90 without.
    """
    _wide_vectors()
    m, steps, width = w.shape[0], xs.shape[0], w.shape[1]
    full = steps - steps % 4
    xp = _aligned_rows(xs, full + 4, width)                # a zero step block past the end
    tail = np.zeros((4, m), np.float32)                    # the last 1-3 steps, computed as a whole tile
    for i in range(0, m - m % 6, 6):
        for t in range(0, full, 4):
            _tile6x4(w, xp, out, i, t, width, t)
        if full < steps:
            _tile6x4(w, xp, tail, i, full, width, 0)
    for t in range(full, steps):
        out[t] += tail[t - full]
    for t in range(steps):                                 # the last 1-5 rows
        for i in range(m - m % 6, m):
            acc = f32(0.0)
            for j in range(width):
                acc += w[i, j] * xp[t, j]
            out[t, i] += acc


@njit(**JIT)
def dense_matvec(arrays, x, out, flip):
    gemv(arrays[0], x, out, flip)


@njit(**JIT)
def dense_matmat(arrays, xs, out):
    gemm(arrays[0], xs, out)


def dense_op(weight: np.ndarray) -> RuntimeOp:
    """The op of a dense ``(out, in)`` matrix (also the fallback for forms without their own op)."""
    return RuntimeOp((aligned_matrix(weight),), dense_matvec, dense_matmat)


# --- low rank: two thin products ----------------------------------------------------------------------------
@njit(**JIT)
def gemv_t(wt, x, out):
    """``out += wt.T @ x`` for ``wt`` (k, m): four scaled rows of ``wt`` added per pass over ``out``.

    For a tall thin matrix (2600 x 64) this runs along the long side, where ``gemv`` would reduce
    thousands of short rows (about 3x slower).
    """
    k = wt.shape[0]
    for p in range(0, k - k % 4, 4):
        x0, x1, x2, x3 = x[p], x[p + 1], x[p + 2], x[p + 3]
        for i in range(out.shape[0]):
            out[i] += x0 * wt[p, i] + x1 * wt[p + 1, i] + x2 * wt[p + 2, i] + x3 * wt[p + 3, i]
    for p in range(k - k % 4, k):
        xp = x[p]
        for i in range(out.shape[0]):
            out[i] += xp * wt[p, i]


@njit(inline="always", **JIT)
def _combine4x4(wt, xs, out, t, p):
    """out[t:t+4] += xs[t:t+4, p:p+4] @ wt[p:p+4]: each loaded row of ``wt`` feeds four output rows."""
    c00, c01, c02, c03 = xs[t, p], xs[t, p + 1], xs[t, p + 2], xs[t, p + 3]
    c10, c11, c12, c13 = xs[t + 1, p], xs[t + 1, p + 1], xs[t + 1, p + 2], xs[t + 1, p + 3]
    c20, c21, c22, c23 = xs[t + 2, p], xs[t + 2, p + 1], xs[t + 2, p + 2], xs[t + 2, p + 3]
    c30, c31, c32, c33 = xs[t + 3, p], xs[t + 3, p + 1], xs[t + 3, p + 2], xs[t + 3, p + 3]
    for i in range(out.shape[1]):
        w0, w1, w2, w3 = wt[p, i], wt[p + 1, i], wt[p + 2, i], wt[p + 3, i]
        out[t, i] += c00 * w0 + c01 * w1 + c02 * w2 + c03 * w3
        out[t + 1, i] += c10 * w0 + c11 * w1 + c12 * w2 + c13 * w3
        out[t + 2, i] += c20 * w0 + c21 * w1 + c22 * w2 + c23 * w3
        out[t + 3, i] += c30 * w0 + c31 * w1 + c32 * w2 + c33 * w3


@njit(**JIT)
def gemm_t(wt, xs, out):
    """``out += xs @ wt`` for ``xs`` (T, k), ``wt`` (k, m): ``gemv_t`` four steps at a time."""
    steps, k = xs.shape[0], wt.shape[0]
    for t in range(0, steps - steps % 4, 4):
        for p in range(0, k - k % 4, 4):
            _combine4x4(wt, xs, out, t, p)
        for p in range(k - k % 4, k):
            for tt in range(t, t + 4):
                coef = xs[tt, p]
                for i in range(out.shape[1]):
                    out[tt, i] += coef * wt[p, i]
    for t in range(steps - steps % 4, steps):
        gemv_t(wt, xs[t], out[t])


@njit(**JIT)
def lowrank_matvec(arrays, x, out, flip):
    left_t, right = arrays                                 # U^T (r, out), V (r, in)
    thin = np.zeros(right.shape[0], np.float32)
    gemv(right, x, thin, flip)
    gemv_t(left_t, thin, out)


@njit(**JIT)
def lowrank_matmat(arrays, xs, out):
    left_t, right = arrays
    thin = np.zeros((xs.shape[0], right.shape[0]), np.float32)  # (T, r)
    gemm(right, xs, thin)
    gemm_t(left_t, thin, out)


def lowrank_op(left: np.ndarray, right: np.ndarray) -> RuntimeOp:
    """The op of ``left @ right``; ``left`` is stored transposed for ``gemv_t``."""
    arrays = tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (np.transpose(left), right))
    return RuntimeOp(arrays, lowrank_matvec, lowrank_matmat)


# --- Kronecker: (A kron B) x = vec(A X B^T), never forming the big matrix ---------------------------------------
# Every plan computes Y = L X R^T as row combinations (``_combine``), whose inner loop runs along a row
# of the right-hand matrix and vectorises when that row is long. Two orientations: direct (L = A, R = B,
# X the input as an (n1, n2) grid, Y's rows m2 wide) or transposed (L = B, R = A, X^T, Y^T's rows m1 wide),
# by the identity vec(Y^T) = (B kron A) vec(X^T); and two orders: X R^T first or L X first. ``kron_op``
# picks the cheapest of the four for the factor shapes: a lopsided pair such as (275x29) kron (3x7) runs
# along its 275-wide side, where the direct plan would combine rows 3 wide (about 10x slower).
SCRATCH_STACK_FLOATS = 16384    # scratch up to 64 KB goes on the stack; more (huge factors) on the heap


@njit(inline="always", **JIT)
def _combine(coef, rows, out):
    """``out += coef @ rows`` as row combinations: four output rows at a time share each load of four rows of
    ``rows`` (16 multiply-adds per 12 loads and stores; twice as fast as one output row at a time)."""
    m, k, width = coef.shape[0], coef.shape[1], out.shape[1]
    for i in range(0, m - m % 4, 4):
        for p in range(0, k - k % 4, 4):
            a0, a1, a2, a3 = coef[i, p], coef[i, p + 1], coef[i, p + 2], coef[i, p + 3]
            b0, b1, b2, b3 = coef[i + 1, p], coef[i + 1, p + 1], coef[i + 1, p + 2], coef[i + 1, p + 3]
            c0, c1, c2, c3 = coef[i + 2, p], coef[i + 2, p + 1], coef[i + 2, p + 2], coef[i + 2, p + 3]
            d0, d1, d2, d3 = coef[i + 3, p], coef[i + 3, p + 1], coef[i + 3, p + 2], coef[i + 3, p + 3]
            for q in range(width):
                r0, r1, r2, r3 = rows[p, q], rows[p + 1, q], rows[p + 2, q], rows[p + 3, q]
                out[i, q] += a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3
                out[i + 1, q] += b0 * r0 + b1 * r1 + b2 * r2 + b3 * r3
                out[i + 2, q] += c0 * r0 + c1 * r1 + c2 * r2 + c3 * r3
                out[i + 3, q] += d0 * r0 + d1 * r1 + d2 * r2 + d3 * r3
        for p in range(k - k % 4, k):
            a, b, c, d = coef[i, p], coef[i + 1, p], coef[i + 2, p], coef[i + 3, p]
            for q in range(width):
                r = rows[p, q]
                out[i, q] += a * r
                out[i + 1, q] += b * r
                out[i + 2, q] += c * r
                out[i + 3, q] += d * r
    for i in range(m - m % 4, m):
        for p in range(0, k - k % 4, 4):
            c0, c1, c2, c3 = coef[i, p], coef[i, p + 1], coef[i, p + 2], coef[i, p + 3]
            for q in range(width):
                out[i, q] += c0 * rows[p, q] + c1 * rows[p + 1, q] + c2 * rows[p + 2, q] + c3 * rows[p + 3, q]
        for p in range(k - k % 4, k):
            cp = coef[i, p]
            for q in range(width):
                out[i, q] += cp * rows[p, q]


@njit(inline="always", **JIT)
def _scratch(rows, cols):
    """A zeroed (rows, cols) float32 buffer: on the stack when small (no allocator call), else on the heap."""
    if rows * cols <= SCRATCH_STACK_FLOATS:
        buffer = carray(_stack_f32(rows * cols), (rows, cols))
        buffer[:] = 0.0
    else:
        buffer = np.zeros((rows, cols), np.float32)
    return buffer


@njit(inline="always", **JIT)
def _gather_grid(x, gather, grid):
    """``grid.flat[i] = x[gather[i]]``; entries with ``gather < 0`` (padding) stay as they are (zero)."""
    k, s = grid.shape
    for g in range(k):
        for j in range(s):
            source = gather[g * s + j]
            if source >= 0:
                grid[g, j] = x[source]


@njit(inline="always", **JIT)
def _scatter_add(y, scatter, out):
    """``out[scatter[i]] += y.flat[i]``; entries with ``scatter < 0`` (cropped rows) are dropped."""
    p, q = y.shape
    for r in range(p):
        for c in range(q):
            target = scatter[r * q + c]
            if target >= 0:
                out[target] += y[r, c]


@njit(**JIT)
def kron_matvec(arrays, x, out, flip):
    """One step: ``Y = L X R^T`` in the plan's order, every buffer on the stack."""
    left, right_t, gather, scatter, plan = arrays
    (p, k), (s, q) = left.shape, right_t.shape
    grid = _scratch(k, s)
    _gather_grid(x, gather, grid)
    y = _scratch(p, q)
    if plan[0] == 1:
        v = _scratch(p, s)
        _combine(left, grid, v)                            # V = L X
        _combine(v, right_t, y)                            # Y = V R^T
    else:
        z = _scratch(k, q)
        _combine(grid, right_t, z)                         # Z = X R^T
        _combine(left, z, y)                               # Y = L Z
    _scatter_add(y, scatter, out)


@njit(**JIT)
def kron_matmat(arrays, xs, out):
    """All steps: the product with R^T, the larger stage, runs once over the steps' stacked rows (fewer
    remainder rows than per step; the tiled ``gemm`` was slower here, its tiles being too big for factors
    this small); the product with L runs per step."""
    left, right_t, gather, scatter, plan = arrays
    (p, k), (s, q), steps = left.shape, right_t.shape, xs.shape[0]
    grids = np.zeros((steps, k, s), np.float32)
    for t in range(steps):
        _gather_grid(xs[t], gather, grids[t])
    ys = np.zeros((steps, p, q), np.float32)
    if plan[0] == 1:
        vs = np.zeros((steps, p, s), np.float32)
        for t in range(steps):
            _combine(left, grids[t], vs[t])                # V = L X, per step
        _combine(vs.reshape(steps * p, s), right_t, ys.reshape(steps * p, q))  # Y = V R^T, all steps
    else:
        zs = np.zeros((steps, k, q), np.float32)
        _combine(grids.reshape(steps * k, s), right_t, zs.reshape(steps * k, q))  # Z = X R^T, all steps
        for t in range(steps):
            _combine(left, zs[t], ys[t])                   # Y = L Z, per step
    for t in range(steps):
        _scatter_add(ys[t], scatter, out[t])


def grid_index(rows: int, cols: int, limit: int, transposed: bool = False) -> np.ndarray:
    """Flat positions of a row-major ``(rows, cols)`` grid, in the grid's order or its transpose's, with
    those at or past ``limit`` (padding, cropped outputs) as -1: the gather and scatter maps of
    ``_gather_grid`` and ``_scatter_add``.

    >>> grid_index(2, 3, 5).tolist(), grid_index(2, 3, 5, transposed=True).tolist()
    ([0, 1, 2, 3, 4, -1], [0, 3, 1, 4, 2, -1])
    """
    index = np.arange(rows * cols).reshape(rows, cols)
    index = (index.T if transposed else index).ravel()
    return np.where(index < limit, index, -1).astype(np.int32)


def _combine_cost(rows: int, terms: int, width: int) -> float:
    """Relative cost of ``_combine`` for ``rows`` output rows of ``terms`` terms ``width`` wide: 16-float
    vectors (a block of four output rows costs about half as much per row as a single one) plus a fixed cost
    per pass (loop set-up, coefficient loads)."""
    blocks, single = divmod(rows, 4)
    passes = (blocks + single) * -(-terms // 4)
    return (blocks * 2 + single) * terms * -(-width // 16) + passes * 4


def kron_plan(m1: int, n1: int, m2: int, n2: int) -> tuple[bool, bool]:
    """``(transposed, left_first)``: the cheapest way to run ``(A kron B) x`` for these factor shapes.

    >>> kron_plan(275, 29, 3, 7), kron_plan(6, 5, 134, 40)
    ((True, True), (False, False))
    """
    costs = {}
    for transposed in (False, True):
        (p, k), (q, s) = ((m2, n2), (m1, n1)) if transposed else ((m1, n1), (m2, n2))
        costs[transposed, True] = _combine_cost(p, k, s) + _combine_cost(p, s, q)      # V = L X, then V R^T
        costs[transposed, False] = _combine_cost(k, s, q) + _combine_cost(p, k, q)     # Z = X R^T, then L Z
    return min(costs, key=costs.get)


def kron_op(a: np.ndarray, b: np.ndarray, out_features: int, in_features: int) -> RuntimeOp:
    """The op of ``(a kron b)`` cropped to ``(out_features, in_features)``, in the plan ``kron_plan`` picks."""
    (m1, n1), (m2, n2) = a.shape, b.shape
    transposed, left_first = kron_plan(m1, n1, m2, n2)
    left, right = (b, a) if transposed else (a, b)
    gather = grid_index(n1, n2, in_features, transposed)   # input g*n2+j is X[g, j]
    scatter = grid_index(m1, m2, out_features, transposed)  # output i*m2+j is Y[i, j]
    arrays = (np.ascontiguousarray(left, dtype=f32), np.ascontiguousarray(np.transpose(right), dtype=f32),
              gather, scatter, np.array([int(left_first)], np.int64))
    return RuntimeOp(arrays, kron_matvec, kron_matmat)


def _places_in_rows(rows: np.ndarray, row_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Entries per row, and each entry's place within its row, for row indices in row-major order."""
    counts = np.bincount(rows, minlength=row_count)
    return counts, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


# --- sparse: jagged diagonals ---------------------------------------------------------------------------------
def jagged_diagonals(weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """A sparse matrix as jagged diagonals (JDS): ``(perm, ptr, cols, vals)``.

    Rows are sorted by entry count (``perm[r]`` is the r-th longest row); diagonal ``d`` holds the d-th
    entry of every row that has one, contiguously, at ``ptr[d]:ptr[d+1]``. A product then runs long
    contiguous loops that vectorise with gathers of ``x``, where CSR runs one short loop per row (about 3x
    slower at 10% density). Column indices are uint16 where they fit (as in ``csr_nbytes``).

    >>> perm, ptr, cols, vals = jagged_diagonals(np.array([[0, 2.0], [3.0, 4.0]]))
    >>> perm.tolist(), ptr.tolist(), cols.tolist(), vals.tolist()
    ([1, 0], [0, 2, 3], [0, 1, 1], [3.0, 2.0, 4.0])
    """
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = np.nonzero(weight)                         # row-major: columns ascend within a row
    counts, slot = _places_in_rows(rows, weight.shape[0])   # slot d: the entry's place in its row
    perm = np.argsort(-counts, kind="stable").astype(np.int32)
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm), dtype=np.int32)        # sorted position of each row
    per_diagonal = np.bincount(slot, minlength=int(counts.max(initial=0)))
    ptr = np.concatenate([[0], np.cumsum(per_diagonal)]).astype(np.int64)
    where = ptr[slot] + rank[rows]                          # rows with a d-th entry are a prefix of perm
    index_type = np.uint16 if weight.shape[1] <= 2**16 else np.int32
    packed_cols = np.empty(len(rows), index_type)
    packed_vals = np.empty(len(rows), np.float32)
    packed_cols[where], packed_vals[where] = cols, weight[rows, cols]
    return perm, ptr, packed_cols, packed_vals


@njit(**JIT)
def jds_matvec(arrays, x, out, flip):
    """Two diagonals per pass over the accumulator (8% faster than one: half its loads and stores)."""
    perm, ptr, cols, vals = arrays
    acc = carray(_stack_f32(perm.shape[0]), perm.shape[0])  # in sorted row order; 4 bytes a row
    acc[:] = 0.0
    count = ptr.shape[0] - 1
    for d in range(0, count - count % 2, 2):
        v0, c0 = vals[ptr[d]:ptr[d + 1]], cols[ptr[d]:ptr[d + 1]]
        v1, c1 = vals[ptr[d + 1]:ptr[d + 2]], cols[ptr[d + 1]:ptr[d + 2]]   # no longer than diagonal d
        for r in range(v1.shape[0]):
            acc[r] += v0[r] * x[c0[r]] + v1[r] * x[c1[r]]
        for r in range(v1.shape[0], v0.shape[0]):
            acc[r] += v0[r] * x[c0[r]]
    if count % 2:
        v, c = vals[ptr[count - 1]:ptr[count]], cols[ptr[count - 1]:ptr[count]]
        for r in range(v.shape[0]):
            acc[r] += v[r] * x[c[r]]
    for r in range(perm.shape[0]):
        out[perm[r]] += acc[r]


@njit(**JIT)
def jds_matmat(arrays, xs, out):
    """All steps at once: each stored entry scales one input row across time (contiguous, no gather)."""
    perm, ptr, cols, vals = arrays
    steps, width = xs.shape[0], (xs.shape[0] + 7) // 8 * 8   # padded so the time loop has no remainder
    by_input = np.zeros((xs.shape[1], width), np.float32)   # X^T: (in, T)
    by_input[:, :steps] = xs.T
    acc = np.zeros((perm.shape[0], width), np.float32)      # sorted rows x time
    for d in range(ptr.shape[0] - 1):
        v, c = vals[ptr[d]:ptr[d + 1]], cols[ptr[d]:ptr[d + 1]]
        for r in range(v.shape[0]):
            value, source = v[r], c[r]
            for t in range(width):
                acc[r, t] += value * by_input[source, t]
    for r in range(perm.shape[0]):
        row = perm[r]
        for t in range(steps):
            out[t, row] += acc[r, t]


def jds_op(weight: np.ndarray) -> RuntimeOp:
    """The op of a sparse matrix given densely (zeros are structural)."""
    return RuntimeOp(jagged_diagonals(weight), jds_matvec, jds_matmat)


# --- very sparse: a plain entry list --------------------------------------------------------------------------
@njit(**JIT)
def entries_matvec(arrays, x, out, flip):
    """``out[rows[e]] += vals[e] * x[cols[e]]`` over the entries only: below about 1.5 entries a row (a doping
    matrix at 99% sparsity has one or two), JDS's pass over every row's accumulator costs more than this."""
    rows, cols, vals = arrays
    for e in range(vals.shape[0]):
        out[rows[e]] += vals[e] * x[cols[e]]


@njit(**JIT)
def entries_matmat(arrays, xs, out):
    """All steps at once, time innermost: each entry scales one input row across time (contiguous)."""
    rows, cols, vals = arrays
    steps, width = xs.shape[0], (xs.shape[0] + 15) // 16 * 16
    by_input = np.zeros((xs.shape[1], width), np.float32)   # X^T: (in, T)
    by_input[:, :steps] = xs.T
    by_output = np.zeros((out.shape[1], width), np.float32)
    for e in range(vals.shape[0]):
        row, col, value = rows[e], cols[e], vals[e]
        for t in range(width):
            by_output[row, t] += value * by_input[col, t]
    for t in range(steps):
        for row in range(out.shape[1]):
            out[t, row] += by_output[row, t]


# The crossover with JDS measured on 800x200 and 2600x650 matrices: below it the entry list is faster (twice
# as fast at 0.5 entries a row), above it JDS (1.7x faster at 6 a row).
ENTRY_LIST_MAX_PER_ROW = 1.5


def sparse_op(weight: np.ndarray) -> RuntimeOp:
    """The op of a sparse matrix given densely: an entry list when it has fewer than
    ``ENTRY_LIST_MAX_PER_ROW`` entries a row, jagged diagonals otherwise."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = np.nonzero(weight)
    if len(rows) >= ENTRY_LIST_MAX_PER_ROW * weight.shape[0]:
        return jds_op(weight)
    # Every row's first entry, then every row's second...: consecutive updates then hit different rows, so
    # none waits for the previous one's store (row order would chain them through the same out[row]).
    _, slot = _places_in_rows(rows, weight.shape[0])
    order = np.lexsort((rows, slot))
    rows, cols = rows[order], cols[order]
    arrays = (rows.astype(np.int32), cols.astype(np.int32), weight[rows, cols].astype(np.float32))
    return RuntimeOp(arrays, entries_matvec, entries_matmat)


# --- LSTM gates ---------------------------------------------------------------------------------------------
# tanh as Eigen's float rational approximation (max error 3e-7 against float64): plain arithmetic, so the
# gate loop vectorises; libm's tanh/exp are scalar calls that would cost more than the whole product for
# a 2x32 LSTM.
_CLAMP = f32(7.90531110763549805)
_A = tuple(f32(v) for v in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                            5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                            -2.76076847742355e-16))
_B = tuple(f32(v) for v in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                            1.19825839466702e-06))
A1, A3, A5, A7, A9, A11, A13 = _A
B0, B2, B4, B6 = _B


@njit(inline="always", **JIT)
def tanh32(value):
    x = min(max(value, -_CLAMP), _CLAMP)
    x2 = x * x
    p = ((((((A13 * x2 + A11) * x2 + A9) * x2 + A7) * x2 + A5) * x2 + A3) * x2 + A1) * x
    q = ((B6 * x2 + B4) * x2 + B2) * x2 + B0
    return p / q


@njit(inline="always", **JIT)
def sigmoid32(value):
    return f32(0.5) * tanh32(f32(0.5) * value) + f32(0.5)


@njit(**JIT)
def lstm_cell(gates, h, c):
    """Gates packed ``[i|f|g|o]`` as in ``leanlstm.nn.gates``: ``c = f*c + i*g``, ``h = o*tanh(c)``."""
    size = h.shape[0]
    gi, gf = gates[:size], gates[size:2 * size]
    gg, go = gates[2 * size:3 * size], gates[3 * size:]
    for j in range(size):
        cell = sigmoid32(gf[j]) * c[j] + sigmoid32(gi[j]) * tanh32(gg[j])
        c[j] = cell
        h[j] = sigmoid32(go[j]) * tanh32(cell)


# --- one layer over a sequence, and one step -----------------------------------------------------------------
@njit(fastmath=True, error_model="numpy", nogil=True)
def layer_run(ih_matvec, ih_matmat, ih_arrays, hh_matvec, hh_arrays, bias, xs, h, c, out):
    """``out[t]`` = h after step t for inputs ``xs`` (T, in); ``h``, ``c`` (H,) are updated in place.

    The input products of all steps go first, batched (``ih_matmat``; per step when it is None, a branch
    Numba prunes at compile time); the loop over time then only adds the recurrent product.
    Not cached: Numba cannot cache functions that take other compiled functions as arguments.
    """
    steps = xs.shape[0]
    gates = np.empty((steps, bias.shape[0]), np.float32)    # (T, 4H)
    for t in range(steps):
        gates[t] = bias
    if ih_matmat is None:
        for t in range(steps):
            ih_matvec(ih_arrays, xs[t], gates[t], False)
    else:
        ih_matmat(ih_arrays, xs, gates)
    for t in range(steps):
        hh_matvec(hh_arrays, h, gates[t], (t & 1) == 1)
        lstm_cell(gates[t], h, c)
        out[t] = h


@njit(fastmath=True, error_model="numpy", nogil=True)
def layer_step(ih_matvec, ih_arrays, hh_matvec, hh_arrays, bias, x, h, c):
    """One time step of one layer: ``h``, ``c`` (H,) are updated in place."""
    gates = bias.copy()
    ih_matvec(ih_arrays, x, gates, False)
    hh_matvec(hh_arrays, h, gates, False)
    lstm_cell(gates, h, c)


@njit(**JIT)
def affine(weight, bias, xs):
    """``xs @ weight.T + bias`` for a (T, in) batch: the language model's dense decoder."""
    out = np.empty((xs.shape[0], bias.shape[0]), np.float32)
    for t in range(xs.shape[0]):
        out[t] = bias
    gemm(weight, xs, out)
    return out
