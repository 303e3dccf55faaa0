"""Numba kernels of the batch-1 engine: weight products per storage layout, LSTM gates and the recurrence.

Every weight form hands the engine a ``RuntimeOp``: a tuple of NumPy arrays plus two kernels,

- ``matvec(arrays, x, out, flip)``: ``out += W @ x`` for one time step, ``x`` (in,), ``out`` (out,);
- ``matmat(arrays, X, out)`` (optional): ``out += X @ W.T`` for a whole sequence, ``X`` (T, in), ``out`` (T, out).

``flip`` asks a kernel to walk its weights in reverse. The engine alternates it every step: a matrix larger
than the cache then starts where the previous step stopped, on rows that are still cached (about 20% less
traffic from L3 for a 2600x650 dense matrix). Kernels for which order does not matter ignore it.

The recurrence (``layer_run``) takes the kernels as first-class function arguments; Numba compiles one
specialisation per kernel pair, so the loop over time runs entirely in compiled code. The engine calls it
through ``entry_points.specialise``, which fixes the kernels in generated code that Numba caches on disk.

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
from numba.core import cgutils
from numba.extending import intrinsic, overload

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

    def __post_init__(self) -> None:
        # Kernels load whole 64-byte vectors of the weights; NumPy starts a large array 16 bytes past a cache line,
        # so every such load straddled two lines: aligned, a dense 2600x650 int8 matvec ran 17.8 us, not 26.3
        # (Intel Xeon; BENCHMARKS.md, "Weights on cache lines").
        arrays = tuple(a if not isinstance(a, np.ndarray) or a.ctypes.data % CACHE_LINE == 0 else aligned(a)
                       for a in self.arrays)
        object.__setattr__(self, "arrays", arrays)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy or an unpickled op gets arrays of exactly their size, without the slack that ``_combine``
        # reads past a buffer's end (``padded_rows``), nor the alignment: give every array both again.
        self.__dict__.update(state, arrays=tuple(aligned(a) for a in state["arrays"]))


# --- helpers ----------------------------------------------------------------------------------------------
@intrinsic
def _stack_f32(typingctx, n):
    """A pointer to ``n`` float32 on the caller's stack (an ``alloca``, which LLVM knows aliases nothing).

    Only valid inside the calling function: wrap it with ``carray`` there, never return it.
    """
    def codegen(context, builder, signature, args):
        return builder.alloca(ir.FloatType(), size=args[0])
    return types.CPointer(types.float32)(types.intp), codegen


# --- dense products: W^T in 64-wide panels, accumulated in vector registers --------------------------------
# The weight is stored as W^T cut into panels of 64 output columns, each panel's rows contiguous, so a product
# streams memory in order. For a block of outputs the kernel keeps rows x vectors accumulators of 16 floats in
# registers and adds x[p] * (row p of the panel) for every input p: no horizontal sums, which cost a dot-product
# kernel most of its time on narrow matrices (a 428x107 product reduces rows only 7 vectors long). Numba has no
# SIMD types, so the block is written in LLVM IR (``_outer_block_intrinsic``). Against the previous row-dot
# kernels the sequence product is 1.1-2.8x faster (about 50 GMAC/s on one core), the one-step product 1.1-1.6x
# on matrices up to 128 wide and within 16% on wider ones, where both are bound by reading the weights
# (BENCHMARKS.md, "Panel kernels").
PANEL = 64                       # output columns per panel: 4 vectors of 16 floats
_LANES = 16
CACHE_LINE = 64                  # bytes: weights start on one, as the kernels load 64-byte vectors
_I64 = ir.IntType(64)
_VEC = ir.VectorType(ir.FloatType(), _LANES)


def _outer_block_intrinsic(rows: int, vectors: int):
    """An intrinsic ``block(w, w_stride, x, x_stride, out, out_stride, k, tail)`` on raw float addresses:
    ``out[r, :16 * vectors] += sum_p x[r, p] * w[p, :16 * vectors]`` for ``r < rows``; strides count floats.
    The last vector writes only its first ``tail`` lanes (the matrix's last, partial vector)."""
    @intrinsic
    def block(typingctx, w, w_stride, x, x_stride, out, out_stride, k, tail):
        signature = types.void(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            w, w_stride, x, x_stride, out, out_stride, k, tail = args
            w, x, out = (builder.inttoptr(a, ir.FloatType().as_pointer()) for a in (w, x, out))
            fast = ("fast",)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(_VEC, None)) for _ in range(vectors)]
                    for _ in range(rows)]
            with cgutils.for_range(builder, k) as loop:
                p = loop.index
                row = builder.gep(w, [builder.mul(p, w_stride)])
                loaded = [builder.load(_vector_at(builder, row, _LANES * v), align=4) for v in range(vectors)]
                for r in range(rows):
                    coef = builder.load(builder.gep(x, [builder.add(builder.mul(_I64(r), x_stride), p)]))
                    coef = _splat(builder, coef, _VEC)
                    for v in range(vectors):
                        product = builder.fmul(loaded[v], coef, flags=fast)
                        builder.store(builder.fadd(builder.load(accs[r][v]), product, flags=fast), accs[r][v])
            whole = builder.icmp_signed("==", tail, _I64(_LANES))
            for r in range(rows):
                out_row = builder.gep(out, [builder.mul(_I64(r), out_stride)])
                for v in range(vectors):
                    acc, ptr = builder.load(accs[r][v]), _vector_at(builder, out_row, _LANES * v)
                    if v < vectors - 1:
                        builder.store(builder.fadd(builder.load(ptr, align=4), acc), ptr, align=4)
                        continue
                    with builder.if_else(whole) as (full, partial):
                        with full:
                            builder.store(builder.fadd(builder.load(ptr, align=4), acc), ptr, align=4)
                        with partial:       # never reads or writes past the end of ``out``
                            for lane in range(_LANES - 1):
                                with builder.if_then(builder.icmp_signed("<", _I64(lane), tail)):
                                    slot = builder.gep(out_row, [_I64(_LANES * v + lane)])
                                    value = builder.extract_element(acc, ir.IntType(32)(lane))
                                    builder.store(builder.fadd(builder.load(slot), value), slot)
            return context.get_dummy_value()
        return signature, codegen
    return block


def _vector_at(builder, base, offset: int):
    return builder.bitcast(builder.gep(base, [_I64(offset)]), _VEC.as_pointer())


def _splat(builder, value, vector_type):
    single = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(single, ir.Constant(vector_type, ir.Undefined), zeros)


_block_4x4 = _outer_block_intrinsic(4, 4)   # four time steps x one panel: 16 accumulators
_block_4x1 = _outer_block_intrinsic(4, 1)
_block_1x4 = _outer_block_intrinsic(1, 4)   # one step x one panel (the one-step product)
_block_1x1 = _outer_block_intrinsic(1, 1)


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """``weight`` (out, in) as ``(ceil(out / 64), in, 64)`` panels of its transpose, zero padded."""
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    count = -(-rows // PANEL)
    padded = np.zeros((count * PANEL, cols), np.float32)
    padded[:rows] = weight
    return aligned(padded.reshape(count, PANEL, cols).transpose(0, 2, 1))


@njit(inline="always", **JIT)
def _combine_at(coef_at, coef_step, rows_at, rows_step, out_at, out_step, m, k, width):
    """``out[i, :width] += sum_p coef[i, p] * rows[p, :width]`` for ``i < m``, on raw float addresses with row
    steps in floats: four output rows by 64 columns per register block, each row of ``rows`` loaded once a block.

    Rows of ``rows`` are read in whole 16-float vectors; lanes past ``width`` are never written.
    """
    for j in range(0, width, PANEL):
        whole = j + PANEL <= width
        for i in range(0, m - m % 4, 4):
            source, target = coef_at + 4 * i * coef_step, out_at + 4 * (i * out_step + j)
            if whole:
                _block_4x4(rows_at + 4 * j, rows_step, source, coef_step, target, out_step, k, _LANES)
            else:
                for v in range(j, width, _LANES):
                    _block_4x1(rows_at + 4 * v, rows_step, source, coef_step, target + 4 * (v - j), out_step, k,
                               min(_LANES, width - v))
        for i in range(m - m % 4, m):
            source, target = coef_at + 4 * i * coef_step, out_at + 4 * (i * out_step + j)
            if whole:
                _block_1x4(rows_at + 4 * j, rows_step, source, 0, target, 0, k, _LANES)
            else:
                for v in range(j, width, _LANES):
                    _block_1x1(rows_at + 4 * v, rows_step, source, 0, target + 4 * (v - j), 0, k,
                               min(_LANES, width - v))


def _float32_c(x):
    """``x`` as a C-contiguous float32 array: itself when it is one (decided at compile time), else a copy.
    The panel products read inputs through raw addresses, where any other type would be misread."""


@overload(_float32_c, inline="always")
def _float32_c_overload(x):
    if isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C":
        return lambda x: x
    return lambda x: np.ascontiguousarray(x).astype(np.float32)


@njit(**JIT)
def panel_gemv(panels, x, out, flip):
    """``out += W @ x`` for ``pack_panels(W)``; ``flip`` walks the panels backwards."""
    if x.shape[0] != panels.shape[1] or out.shape[0] > panels.shape[0] * PANEL:
        raise ValueError("panel_gemv: x or out does not match the matrix")
    if out.strides[0] != 4:                                # a strided view: work on a copy, then add
        result = np.zeros(out.shape[0], np.float32)
        _panel_gemv(panels, _float32_c(x), result, flip)
        out += result
    else:
        _panel_gemv(panels, _float32_c(x), out, flip)


@njit(**JIT)
def _panel_gemv(panels, x, out, flip):
    count, k, m = panels.shape[0], panels.shape[1], out.shape[0]
    for index in range(count):
        b = count - 1 - index if flip else index
        start = b * PANEL                                  # panel rows are 64 wide: whole-vector reads stay inside
        _combine_at(x.ctypes.data, 0, panels.ctypes.data + 4 * b * k * PANEL, PANEL,
                    out.ctypes.data + 4 * start, 0, 1, k, min(PANEL, m - start))


@njit(**JIT)
def panel_gemm(panels, xs, out):
    """``out += xs @ W.T`` for ``pack_panels(W)``, ``xs`` (T, in), ``out`` (T, out): four steps per block."""
    if (xs.shape[1] != panels.shape[1] or out.shape[0] != xs.shape[0]
            or out.shape[1] > panels.shape[0] * PANEL):
        raise ValueError("panel_gemm: xs or out does not match the matrix")
    if out.strides[1] != 4:                                # a transposed view: work on a copy, then add
        result = np.zeros(out.shape, np.float32)
        _panel_gemm(panels, _float32_c(xs), result)
        out += result
    else:
        _panel_gemm(panels, _float32_c(xs), out)


@njit(**JIT)
def _panel_gemm(panels, xs, out):
    count, k, m = panels.shape[0], panels.shape[1], out.shape[1]
    for b in range(count):
        start = b * PANEL
        _combine_at(xs.ctypes.data, xs.shape[1], panels.ctypes.data + 4 * b * k * PANEL, PANEL,
                    out.ctypes.data + 4 * start, out.strides[0] // 4, xs.shape[0], k, min(PANEL, m - start))


@njit(**JIT)
def dense_matvec(arrays, x, out, flip):
    panel_gemv(arrays[0], x, out, flip)


@njit(**JIT)
def dense_matmat(arrays, xs, out):
    panel_gemm(arrays[0], xs, out)


def dense_op(weight: np.ndarray) -> RuntimeOp:
    """The op of a dense ``(out, in)`` matrix (also the fallback for forms without their own op)."""
    return RuntimeOp((pack_panels(weight),), dense_matvec, dense_matmat)


# --- low rank: two thin products ----------------------------------------------------------------------------
@njit(**JIT)
def lowrank_matvec(arrays, x, out, flip):
    left, right = arrays                                   # panels of U (out, r) and V (r, in)
    thin = np.zeros(left.shape[1], np.float32)
    panel_gemv(right, x, thin, flip)
    panel_gemv(left, thin, out, flip)


@njit(**JIT)
def lowrank_matmat(arrays, xs, out):
    left, right = arrays
    thin = np.zeros((xs.shape[0], left.shape[1]), np.float32)  # (T, r)
    panel_gemm(right, xs, thin)
    panel_gemm(left, thin, out)


def lowrank_op(left: np.ndarray, right: np.ndarray) -> RuntimeOp:
    """The op of ``left @ right`` (``left`` (out, r), ``right`` (r, in)): two panel products through the rank."""
    return RuntimeOp((pack_panels(left), pack_panels(right)), lowrank_matvec, lowrank_matmat)


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
    """``out += coef @ rows[:, :width]`` as row combinations (``_combine_at``, the panel products' blocks).

    Rows are read in whole 16-float vectors, so ``rows`` must be readable up to 15 floats past its last row's
    end (``_scratch`` and ``padded_rows`` buffers are); lanes past ``width`` are never written. Every array's
    rows must be contiguous (any row stride).
    """
    if ((coef.shape[1] > 1 and coef.strides[1] != 4) or (rows.shape[1] > 1 and rows.strides[1] != 4)
            or (out.shape[1] > 1 and out.strides[1] != 4)):                   # a 1-wide array has any stride
        raise ValueError("_combine needs rows contiguous in memory (a C-ordered float32 array)")
    _combine_at(coef.ctypes.data, coef.strides[0] // 4, rows.ctypes.data, rows.strides[0] // 4, out.ctypes.data,
                out.strides[0] // 4, coef.shape[0], coef.shape[1], out.shape[1])


def padded_rows(matrix: np.ndarray) -> np.ndarray:
    """A float32 copy of ``matrix`` with 16 floats of slack after its end, as ``_combine`` reads rows."""
    return aligned(np.asarray(matrix, np.float32))


def aligned(array: np.ndarray) -> np.ndarray:
    """A C-ordered copy of ``array`` (same dtype) that starts on a 64-byte cache line and is followed by 16
    elements of zeros in the same buffer (``_combine`` reads rows whole).

    >>> a = aligned(np.arange(3, dtype=np.int8)); a.tolist(), a.ctypes.data % CACHE_LINE
    ([0, 1, 2], 0)
    """
    array = np.asarray(array)
    buffer = np.zeros((array.size + _LANES) * array.itemsize + CACHE_LINE, np.uint8)
    start = -buffer.ctypes.data % CACHE_LINE
    out = buffer[start:start + array.size * array.itemsize].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


@njit(inline="always", **JIT)
def _zeros_padded(shape):
    """Zeros of ``shape`` on the heap, with 16 floats of slack after the end for ``_combine``."""
    size = 1
    for extent in shape:
        size *= extent
    return np.zeros(size + _LANES, np.float32)[:size].reshape(shape)


@njit(inline="always", **JIT)
def _scratch(rows, cols):
    """A zeroed (rows, cols) float32 buffer: on the stack when small (no allocator call), else on the heap."""
    if rows * cols <= SCRATCH_STACK_FLOATS:      # 16 floats of slack after the end: ``_combine`` reads rows whole
        buffer = carray(_stack_f32(rows * cols + _LANES), (rows, cols))
        buffer[:] = 0.0
    else:
        buffer = _zeros_padded((rows, cols))
    return buffer


@njit(inline="always", **JIT)
def _gather_grid(x, gather, grid):
    """``grid.flat[i] = x[gather[i]]``; entries with ``gather < 0`` (padding) stay as they are (zero). An empty
    ``gather`` is the identity: ``grid.flat[i] = x[i]`` while ``i < len(x)``, copied row by row."""
    k, s = grid.shape
    if gather.shape[0] == 0:
        n = x.shape[0]
        for g in range(k):
            part = x[g * s: min(n, g * s + s)]
            for j in range(part.shape[0]):
                grid[g, j] = part[j]
        return
    for g in range(k):
        for j in range(s):
            source = gather[g * s + j]
            if source >= 0:
                grid[g, j] = x[source]


@njit(inline="always", **JIT)
def _scatter_add(y, scatter, out):
    """``out[scatter[i]] += y.flat[i]``; entries with ``scatter < 0`` (cropped rows) are dropped. An empty
    ``scatter`` is the identity, cropped where ``out`` ends."""
    p, q = y.shape
    if scatter.shape[0] == 0:
        n = out.shape[0]
        for r in range(p):
            part = out[r * q: min(n, r * q + q)]
            for c in range(part.shape[0]):
                part[c] += y[r, c]
        return
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
    remainder rows than per step); the product with L runs per step."""
    left, right_t, gather, scatter, plan = arrays
    (p, k), (s, q), steps = left.shape, right_t.shape, xs.shape[0]
    grids = _zeros_padded((steps, k, s))
    for t in range(steps):
        _gather_grid(xs[t], gather, grids[t])
    ys = np.zeros((steps, p, q), np.float32)
    if plan[0] == 1:
        vs = _zeros_padded((steps, p, s))
        for t in range(steps):
            _combine(left, grids[t], vs[t])                # V = L X, per step
        _combine(vs.reshape(steps * p, s), right_t, ys.reshape(steps * p, q))  # Y = V R^T, all steps
    else:
        zs = _zeros_padded((steps, k, q))
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


def kron_layout(a: np.ndarray, b: np.ndarray, out_features: int, in_features: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """``(left, right, gather, scatter, left_first)`` of ``(a kron b)`` cropped to ``(out_features, in_features)``:
    the factors in the orientation ``kron_plan`` picks (``Y = L X R^T``, L (p x k), R (q x s)), the maps from the
    input to the grid ``X`` and from ``Y`` to the output, and the plan's order. Shared by every precision's op."""
    (m1, n1), (m2, n2) = a.shape, b.shape
    transposed, left_first = kron_plan(m1, n1, m2, n2)
    left, right = (b, a) if transposed else (a, b)
    # Input g*n2+j is X[g, j] and output i*m2+j is Y[i, j]: in the direct orientation both maps are the
    # identity (empty: copied row by row, no index loads); the transposed one needs index maps.
    no_map = np.zeros(0, np.int32)
    gather = grid_index(n1, n2, in_features, transposed=True) if transposed else no_map
    scatter = grid_index(m1, m2, out_features, transposed=True) if transposed else no_map
    return left, right, gather, scatter, left_first


def kron_op(a: np.ndarray, b: np.ndarray, out_features: int, in_features: int) -> RuntimeOp:
    """The op of ``(a kron b)`` cropped to ``(out_features, in_features)``, in the plan ``kron_plan`` picks."""
    left, right, gather, scatter, left_first = kron_layout(a, b, out_features, in_features)
    arrays = (np.ascontiguousarray(left, dtype=f32), padded_rows(np.transpose(right)),
              gather, scatter, np.array([int(left_first)], np.int64))
    return RuntimeOp(arrays, kron_matvec, kron_matmat)


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
    count = ptr.shape[0] - 1
    filled = ptr[1] - ptr[0] if count else 0               # rows with an entry: a prefix of perm
    acc = carray(_stack_f32(filled), filled)               # in sorted row order; 4 bytes a row
    acc[:] = 0.0
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
    for r in range(filled):                                # empty rows add nothing
        out[perm[r]] += acc[r]


@njit(**JIT)
def jds_matmat(arrays, xs, out):
    """All steps at once: each stored entry scales one input row across time (contiguous, no gather)."""
    perm, ptr, cols, vals = arrays
    steps, width = xs.shape[0], (xs.shape[0] + 7) // 8 * 8   # padded so the time loop has no remainder
    by_input = np.zeros((xs.shape[1], width), np.float32)   # X^T: (in, T)
    by_input[:, :steps] = xs.T
    filled = ptr[1] - ptr[0] if ptr.shape[0] > 1 else 0    # rows with an entry: a prefix of perm
    acc = np.zeros((filled, width), np.float32)             # sorted rows x time
    for d in range(ptr.shape[0] - 1):
        v, c = vals[ptr[d]:ptr[d + 1]], cols[ptr[d]:ptr[d + 1]]
        for r in range(v.shape[0]):
            value, source = v[r], c[r]
            for t in range(width):
                acc[r, t] += value * by_input[source, t]
    for r in range(filled):
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


# The same arithmetic on whole 16-float vectors, written in IR: Numba's loop vectoriser stops at 8 lanes on these
# CPUs, and the gates' five rational functions a unit are bound by arithmetic (a 650-unit cell: 1.33-1.38 us on 8
# lanes, 0.99 on 16; 256 units: 0.52 against 0.31; Intel Xeon, one thread, in one process, training paused).
_FAST = ("fast",)


def _constant(value: float):
    return ir.Constant(_VEC, [ir.Constant(ir.FloatType(), float(value))] * _LANES)


def _emit_tanh(builder, x):
    """``tanh32`` on a vector of 16 floats."""
    high, low = _constant(_CLAMP), _constant(-_CLAMP)
    x = builder.select(builder.fcmp_ordered("<", x, high, flags=_FAST), x, high)
    x = builder.select(builder.fcmp_ordered(">", x, low, flags=_FAST), x, low)
    x2 = builder.fmul(x, x, flags=_FAST)
    p = _constant(A13)
    for a in (A11, A9, A7, A5, A3, A1):
        p = builder.fadd(builder.fmul(p, x2, flags=_FAST), _constant(a), flags=_FAST)
    q = _constant(B6)
    for b in (B4, B2, B0):
        q = builder.fadd(builder.fmul(q, x2, flags=_FAST), _constant(b), flags=_FAST)
    return builder.fdiv(builder.fmul(p, x, flags=_FAST), q, flags=_FAST)


def _emit_sigmoid(builder, x):
    half = _constant(0.5)
    return builder.fadd(builder.fmul(half, _emit_tanh(builder, builder.fmul(half, x, flags=_FAST)), flags=_FAST),
                        half, flags=_FAST)


@intrinsic
def _cell_vectors(typingctx, gates, h, c, size, vectors):
    """The cell (``lstm_cell``) for units ``0 .. 16 * vectors`` on raw float addresses; ``size`` units a gate."""
    signature = types.void(*([types.intp] * 5))

    def codegen(context, builder, signature, args):
        gates, h, c, size, vectors = args
        gates, h, c = (builder.inttoptr(a, ir.FloatType().as_pointer()) for a in (gates, h, c))

        def vector(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), _VEC.as_pointer())

        with cgutils.for_range(builder, vectors) as loop:
            j = builder.mul(loop.index, _I64(_LANES))
            gi, gf, gg, go = (builder.load(vector(gates, builder.add(builder.mul(_I64(k), size), j)), align=4)
                              for k in range(4))
            state = vector(c, j)
            cell = builder.fadd(builder.fmul(_emit_sigmoid(builder, gf), builder.load(state, align=4), flags=_FAST),
                                builder.fmul(_emit_sigmoid(builder, gi), _emit_tanh(builder, gg), flags=_FAST),
                                flags=_FAST)
            builder.store(cell, state, align=4)
            builder.store(builder.fmul(_emit_sigmoid(builder, go), _emit_tanh(builder, cell), flags=_FAST),
                          vector(h, j), align=4)
        return context.get_dummy_value()
    return signature, codegen


@njit(inline="always", **JIT)
def _packed32(a):
    return a.itemsize == 4 and a.strides[0] == 4


@njit(**JIT)
def lstm_cell(gates, h, c):
    """Gates packed ``[i|f|g|o]`` as in ``leanlstm.nn.gates``: ``c = f*c + i*g``, ``h = o*tanh(c)``. Whole vectors
    of 16 units in IR where all three are contiguous float32, the rest (or everything) in a loop."""
    size = h.shape[0]
    packed = _packed32(gates) and _packed32(h) and _packed32(c)
    whole = size // _LANES if packed else 0
    _cell_vectors(gates.ctypes.data, h.ctypes.data, c.ctypes.data, size, whole)
    gi, gf = gates[:size], gates[size:2 * size]
    gg, go = gates[2 * size:3 * size], gates[3 * size:]
    for j in range(whole * _LANES, size):
        cell = sigmoid32(gf[j]) * c[j] + sigmoid32(gi[j]) * tanh32(gg[j])
        c[j] = cell
        h[j] = sigmoid32(go[j]) * tanh32(cell)


@njit(inline="always", fastmath=True, error_model="numpy", nogil=True)
def input_products(ih_matvec, ih_matmat, ih_arrays, bias, xs):
    """``bias`` plus the input product of every step of ``xs`` (T, in): (T, rows), batched by ``ih_matmat`` (per
    step when it is None, a branch Numba prunes at compile time). Inlined, so that the kernels stay compile-time
    constants of the layer loops that call it (``entry_points.specialise`` caches those)."""
    out = np.empty((xs.shape[0], bias.shape[0]), np.float32)
    for t in range(xs.shape[0]):
        out[t] = bias
    if ih_matmat is None:
        for t in range(xs.shape[0]):
            ih_matvec(ih_arrays, xs[t], out[t], False)
    else:
        ih_matmat(ih_arrays, xs, out)
    return out


# --- one layer over a sequence, and one step -----------------------------------------------------------------
# A projected layer (``proj_size`` P, as torch.nn.LSTM) keeps h = W_hr (o * tanh(c)): the cell writes o * tanh(c)
# into a scratch vector of H and the projection's own op multiplies it into h (P), so a sparse or low-rank
# ``weight_hr`` runs through its structure like every other matrix. Without a projection ``hr_matvec`` is None
# and Numba prunes the branch at compile time: the unprojected loop is the same code as before.
@njit(fastmath=True, error_model="numpy", nogil=True)
def layer_run(ih_matvec, ih_matmat, ih_arrays, hh_matvec, hh_arrays, hr_matvec, hr_arrays, bias, xs, h, c, out,
              reverse):
    """``out[t]`` = h after step t for inputs ``xs`` (T, in); ``h`` (out,), ``c`` (H,) are updated in place.
    ``reverse`` runs over time backwards (t = T-1 .. 0), as the reverse direction of a bidirectional layer.

    The input products of all steps go first, batched (``ih_matmat``; per step when it is None, a branch
    Numba prunes at compile time); the loop over time then only adds the recurrent product.
    Numba cannot cache it as it is (its arguments are compiled functions): the engine runs it through
    ``entry_points.specialise``, whose generated entry points are cached.
    """
    steps = xs.shape[0]
    gates = input_products(ih_matvec, ih_matmat, ih_arrays, bias, xs)       # (T, 4H)
    cell_out = np.empty(c.shape[0], np.float32)             # o * tanh(c) before the projection
    for k in range(steps):
        t = steps - 1 - k if reverse else k
        flip = (k & 1) == 1
        hh_matvec(hh_arrays, h, gates[t], flip)
        if hr_matvec is None:
            lstm_cell(gates[t], h, c)
        else:
            lstm_cell(gates[t], cell_out, c)
            h[:] = 0.0
            hr_matvec(hr_arrays, cell_out, h, flip)
        out[t] = h


@njit(fastmath=True, error_model="numpy", nogil=True)
def layer_step(ih_matvec, ih_arrays, hh_matvec, hh_arrays, hr_matvec, hr_arrays, bias, x, h, c):
    """One time step of one layer: ``h``, ``c`` are updated in place."""
    gates = bias.copy()
    ih_matvec(ih_arrays, x, gates, False)
    hh_matvec(hh_arrays, h, gates, False)
    if hr_matvec is None:
        lstm_cell(gates, h, c)
    else:
        cell_out = np.empty(c.shape[0], np.float32)
        lstm_cell(gates, cell_out, c)
        h[:] = 0.0
        hr_matvec(hr_arrays, cell_out, h, False)


@njit(fastmath=True, error_model="numpy", nogil=True)
def form_affine(matvec, matmat, arrays, bias, xs):
    """``xs @ W.T + bias`` for a (T, in) batch and ``W`` a weight form's op: a ``FormLinear`` head or decoder
    (run through ``entry_points.specialise``, like the layer loops)."""
    return input_products(matvec, matmat, arrays, bias, xs)


@njit(**JIT)
def affine(weight, bias, xs):
    """``xs @ weight.T + bias`` for a (T, in) batch: an ``nn.Linear`` head or decoder."""
    out = np.empty((xs.shape[0], bias.shape[0]), np.float32)
    for t in range(xs.shape[0]):
        out[t] = bias
    panel_gemm(weight, xs, out)
    return out
