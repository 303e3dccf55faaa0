"""Block-sparse products of the batch-1 engine, float32 and int8 (``nn.forms.blocksparse.BlockSparse``).

A matrix is cut into tiles of 16 output rows x 4 inputs (the last tile row and column padded with zeros) and only
the tiles holding a kept entry are stored, as block CSR by tile row: the tiles' values contiguously, one column
index per tile (uint16 where it fits) and tile-row pointers. A tile is one AVX-512 VNNI instruction in int8:
``vpdpbusd`` adds, into each of 16 int32 lanes, the products of a row's 4 bytes with the 4 input bytes broadcast as
one 32-bit word. So the product streams whole 64-byte tiles and reads one word of the input per tile, where an
unstructured int8 product gathers single inputs per entry (at 10% density it ran slower than the dense int8 one).
Forms with other block shapes run on the same tiles (those their blocks touch; exact when a multiple of 16x4).

- float32: tiles ``(nb, 4, 16)`` (per input, its 16 rows: four 16-float vectors), each input broadcast against
  its vector, summed in a few independent vector accumulators per tile row.
- int8: tiles ``(nb, 16, 4)`` (per row, its 4 bytes: one 64-byte vector), quantised per output row as
  ``int8.quantise_rows`` does on the whole matrix, with the same per-row ``corrections`` (``128 * row sum``) and
  the same per-call input quantisation: the output equals the dense int8 product's (``int8.int8_dense_op``) on the
  same matrix. One 16-lane accumulator per tile row on VNNI; exact integer loops without it.
- 4 bits (a form with ``value_bits`` 4, its values on the ``[-7, 7]`` grid): tiles ``(nb, 32)`` of packed nibbles,
  32 bytes a tile: byte ``i`` holds ``q[i] + 8`` in its low half and ``q[i + 32] + 8`` in its high half (``q`` the
  tile's 64 int8 values in the int8 layout). The kernel unpacks a tile in registers (a mask, a shift, one
  concatenation and a subtraction) into the int8 tile and runs the same ``vpdpbusd``: the same integer sums as the
  int8 op on those integers, from half the bytes.

The sequence products (``matmat``) run four time steps per pass over a tile row, each tile loaded once for all four.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..nn.forms.blocksparse import BlockSparse
from ..nn.quant import levels
from .int8 import (VNNI, ZERO_POINT, _check_cpu, _poison, _quantise_input, _splat, emit_scaled_add, packed_rows,
                   quantise_rows, quantise_steps, whole_vectors)
from .kernels import JIT, RuntimeOp, _scratch, _stack_f32
from .precision import register_op

TILE_ROWS = 16                  # output rows per tile: one vector of 16 lanes
TILE_COLS = 4                   # inputs per tile: one 32-bit word of input bytes
TILE_VALUES = TILE_ROWS * TILE_COLS       # 64: bytes of an int8 tile, one zmm vector
PACKED_BYTES = TILE_VALUES // 2           # 32: bytes of a 4-bit tile, two values a byte
NIBBLE_OFFSET = 8                         # a 4-bit value q in [-7, 7] is stored as q + 8
STEPS = 4                       # time steps per pass of the sequence products
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"        # unsigned bytes (the input) times signed bytes (the weights)
_I32x16 = ir.VectorType(ir.IntType(32), 16)
_I8x32 = ir.VectorType(ir.IntType(8), PACKED_BYTES)
_I64 = ir.IntType(64)


# --- packing ------------------------------------------------------------------------------------------------
def tiles(weight: np.ndarray, mask: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(values, cols, ptr, grid)`` of the 16x4 tiles of ``weight`` (out, in) that hold an entry of ``mask`` or a
    nonzero: ``values`` (nb, 16, 4) in ``weight``'s dtype, tile-column indices (uint16 where they fit, else
    int32), int32 tile-row pointers and the tile mask ``grid`` (tile rows, tile columns); tiles in row-major order.

    >>> w = np.zeros((20, 8), np.float32); w[0, 0] = w[17, 5] = w[18, 1] = 1.0
    >>> values, cols, ptr, _ = tiles(w)
    >>> values.shape, cols.tolist(), ptr.tolist()
    ((3, 16, 4), [0, 0, 1], [0, 1, 3])
    """
    rows, width = weight.shape
    grid_rows, grid_cols = -(-rows // TILE_ROWS), -(-width // TILE_COLS)
    padded = np.zeros((grid_rows * TILE_ROWS, grid_cols * TILE_COLS), weight.dtype)
    padded[:rows, :width] = weight
    kept = padded != 0
    if mask is not None:
        kept[:rows, :width] |= np.asarray(mask, bool)
    grid = kept.reshape(grid_rows, TILE_ROWS, grid_cols, TILE_COLS).any(axis=(1, 3))
    tile_rows, tile_cols = np.nonzero(grid)
    values = padded.reshape(grid_rows, TILE_ROWS, grid_cols, TILE_COLS).transpose(0, 2, 1, 3)[tile_rows, tile_cols]
    ptr = np.zeros(grid_rows + 1, np.int32)
    ptr[1:] = np.cumsum(grid.sum(axis=1))
    cols = tile_cols.astype(np.uint16 if grid_cols <= 2**16 else np.int32)
    return np.ascontiguousarray(values), cols, ptr, grid


def _shape(weight: np.ndarray) -> np.ndarray:
    return np.array(weight.shape, np.int64)


# --- float32 --------------------------------------------------------------------------------------------------
def _f32_tile_row(steps: int, index_bits: int):
    """An intrinsic ``dot(w, cols, first, last, x, x_stride, out, out_stride)`` on raw addresses: for ``s <
    steps``, ``out[s * out_stride + 0:16] += sum_k sum_j x[s, 4 cols[k] + j] * w[k, j, 0:16]`` over tiles ``first
    <= k < last``. ``w`` holds (4, 16) float32 tiles, ``cols`` tile-column indices of ``index_bits``, ``x`` float32
    rows ``x_stride`` floats apart, ``out`` float32. Each tile is loaded once for all ``steps``; the sums run in 4
    (one step) or 8 independent chains, so an add rarely waits for the previous one. Adding into the output rows
    here, in vector registers, rather than in a scalar loop after the call, took a 2600x650 matvec at 6% density
    from 9.4 to 5.8 us, and its sequence product from 6.5 to 2.7 us per step."""
    split = min(TILE_COLS, 8 // steps)             # chains per step
    vector = ir.VectorType(ir.FloatType(), TILE_ROWS)

    @intrinsic
    def dot(typingctx, w, cols, first, last, x, x_stride, out, out_stride):
        signature = types.void(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            w, cols, first, last, x, x_stride, out, out_stride = args
            w = builder.inttoptr(w, ir.FloatType().as_pointer())
            cols = builder.inttoptr(cols, ir.IntType(index_bits).as_pointer())
            x = builder.inttoptr(x, ir.FloatType().as_pointer())
            out = builder.inttoptr(out, ir.FloatType().as_pointer())
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(vector, None)) for _ in range(split)]
                    for _ in range(steps)]
            with cgutils.for_range(builder, builder.sub(last, first)) as loop:
                k = builder.add(first, loop.index)
                tile = builder.gep(w, [builder.mul(k, _I64(TILE_VALUES))])
                weights = [builder.load(builder.bitcast(builder.gep(tile, [_I64(TILE_ROWS * j)]), vector.as_pointer()),
                                        align=4) for j in range(TILE_COLS)]
                column = builder.zext(builder.load(builder.gep(cols, [k]), align=index_bits // 8), _I64)
                base = builder.mul(column, _I64(TILE_COLS))
                for s in range(steps):
                    row = builder.add(builder.mul(_I64(s), x_stride), base)
                    for j in range(TILE_COLS):
                        value = builder.load(builder.gep(x, [builder.add(row, _I64(j))]), align=4)
                        chain = sums[s][j % split]
                        product = builder.fmul(weights[j], _splat(builder, value, vector), flags=("fast",))
                        builder.store(builder.fadd(builder.load(chain), product, flags=("fast",)), chain)
            for s in range(steps):
                total = builder.load(sums[s][0])
                for chain in sums[s][1:]:
                    total = builder.fadd(total, builder.load(chain), flags=("fast",))
                target = builder.bitcast(builder.gep(out, [builder.mul(_I64(s), out_stride)]), vector.as_pointer())
                builder.store(builder.fadd(builder.load(target, align=4), total), target, align=4)
            return context.get_dummy_value()
        return signature, codegen
    return dot


_f32_1_u16, _f32_4_u16 = _f32_tile_row(1, 16), _f32_tile_row(STEPS, 16)
_f32_1_i32, _f32_4_i32 = _f32_tile_row(1, 32), _f32_tile_row(STEPS, 32)


@njit(inline="always", **JIT)
def _f32_row(values, cols, first, last, xp, step, x_stride, steps, out, out_stride):
    """Add one tile row for rows ``step..step+steps`` of ``xp`` (1 or 4 steps) into the 16 floats at address
    ``out`` (steps ``out_stride`` floats apart)."""
    w, c, x = values.ctypes.data, cols.ctypes.data, xp.ctypes.data + step * x_stride * 4
    if cols.itemsize == 2:
        if steps == STEPS:
            _f32_4_u16(w, c, first, last, x, x_stride, out, out_stride)
        else:
            _f32_1_u16(w, c, first, last, x, x_stride, out, out_stride)
    elif steps == STEPS:
        _f32_4_i32(w, c, first, last, x, x_stride, out, out_stride)
    else:
        _f32_1_i32(w, c, first, last, x, x_stride, out, out_stride)


@njit(inline="always", **JIT)
def _f32_add(values, cols, first, last, xp, step, x_stride, steps, valid, out, start, rows, whole, acc):
    """Rows ``start..start+16`` of steps ``step..step+valid`` of ``out`` (2-D) += one tile row's products for
    ``steps`` rows of ``xp`` (``valid <= steps``; the rest is padding): straight into ``out`` for a whole tile row
    of contiguous floats, else through ``acc`` (steps, 16) and a loop."""
    if start // TILE_ROWS < whole and valid == steps:
        _f32_row(values, cols, first, last, xp, step, x_stride, steps,
                 out.ctypes.data + step * out.strides[0] + start * 4, out.strides[0] // 4)
        return
    acc[:] = 0
    _f32_row(values, cols, first, last, xp, step, x_stride, steps, acc.ctypes.data, TILE_ROWS)
    for i in range(valid):
        for r in range(min(TILE_ROWS, rows - start)):
            out[step + i, start + r] += acc[i, r]


@njit(**JIT)
def blocksparse_matvec(arrays, x, out, flip):
    """``out += W @ x`` for ``blocksparse_op(W)``; ``flip`` walks the tile rows backwards."""
    values, cols, ptr, shape = arrays
    rows, width, grid = shape[0], shape[1], ptr.shape[0] - 1
    if x.shape[0] != width or out.shape[0] != rows:
        raise ValueError("block-sparse matvec: x or out does not match the matrix")
    xp = _scratch(1, -(-width // TILE_COLS) * TILE_COLS)  # whole tile columns: tiles read past the last input
    for i in range(width):
        xp[0, i] = x[i]
    acc = carray(_stack_f32(TILE_ROWS), TILE_ROWS)
    whole = whole_vectors(out, rows, TILE_ROWS)
    for index in range(grid):
        b = grid - 1 - index if flip else index
        if ptr[b] == ptr[b + 1]:
            continue
        start = b * TILE_ROWS
        if b < whole:
            _f32_row(values, cols, ptr[b], ptr[b + 1], xp, 0, 0, 1, out.ctypes.data + start * 4, 0)
            continue
        acc[:] = 0
        _f32_row(values, cols, ptr[b], ptr[b + 1], xp, 0, 0, 1, acc.ctypes.data, 0)
        for r in range(min(TILE_ROWS, rows - start)):
            out[start + r] += acc[r]


@njit(**JIT)
def blocksparse_matmat(arrays, xs, out):
    """``out += xs @ W.T`` for ``xs`` (T, in): four steps per pass over a tile row (each tile loaded once)."""
    values, cols, ptr, shape = arrays
    rows, width, grid, steps = shape[0], shape[1], ptr.shape[0] - 1, xs.shape[0]
    if xs.shape[1] != width or out.shape[1] != rows or out.shape[0] != steps:
        raise ValueError("block-sparse matmat: xs or out does not match the matrix")
    words = -(-width // TILE_COLS) * TILE_COLS
    xp = np.zeros((-(-steps // STEPS) * STEPS, words), np.float32)       # whole passes, whole tile columns
    xp[:steps, :width] = xs
    acc = carray(_stack_f32(STEPS * TILE_ROWS), (STEPS, TILE_ROWS))
    whole = whole_vectors(out, rows, TILE_ROWS)
    for b in range(grid):
        if ptr[b] != ptr[b + 1]:
            for t in range(0, steps, STEPS):
                _f32_add(values, cols, ptr[b], ptr[b + 1], xp, t, words, STEPS, min(STEPS, steps - t), out,
                         b * TILE_ROWS, rows, whole, acc)


def blocksparse_op(weight: np.ndarray, mask: np.ndarray | None = None) -> RuntimeOp:
    """The float32 op of a block-sparse matrix given densely: the 16x4 tiles holding an entry of ``mask`` or a
    nonzero.

    >>> w = np.zeros((20, 6), np.float32); w[17, 5] = 2.0; out = np.zeros(20, np.float32)
    >>> op = blocksparse_op(w); op.matvec(op.arrays, np.ones(6, np.float32), out, False)
    >>> float(out[17]), len(op.arrays[1])                # one tile stored
    (2.0, 1)
    """
    weight = np.asarray(weight, np.float32)
    values, cols, ptr, _ = tiles(weight, mask)
    return RuntimeOp((np.ascontiguousarray(values.transpose(0, 2, 1)), cols, ptr, _shape(weight)),
                     blocksparse_matvec, blocksparse_matmat)


# --- int8: one vpdpbusd per tile -----------------------------------------------------------------------------
def _emit_tile_sums(builder, w, cols, first, last, x, x_stride, steps: int, index_bits: int, packed: bool) -> list:
    """The IR of ``sum_k vpdpbusd(word(x[s], cols[k]), w[k])`` over tiles ``first <= k < last`` for ``s < steps``,
    from zero: one <16 x i32> per step. ``w`` holds 64-byte tiles (``packed``: 32-byte 4-bit tiles, unpacked by
    ``_emit_unpack``), ``cols`` tile-column indices of ``index_bits``, ``x`` input bytes as 32-bit words (steps
    ``x_stride`` words apart; tile column ``c`` reads word ``c``). Each tile is loaded once for all ``steps``.
    (Dealing a step's tiles to 2 or 4 accumulators measured no faster.)"""
    w = builder.inttoptr(w, ir.IntType(8).as_pointer())
    cols = builder.inttoptr(cols, ir.IntType(index_bits).as_pointer())
    x = builder.inttoptr(x, ir.IntType(32).as_pointer())
    vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32x16, [_I32x16] * 3), _VPDPBUSD)
    sums = [cgutils.alloca_once_value(builder, ir.Constant(_I32x16, None)) for _ in range(steps)]
    with cgutils.for_range(builder, builder.sub(last, first)) as loop:
        k = builder.add(first, loop.index)
        tile = builder.gep(w, [builder.mul(k, _I64(PACKED_BYTES if packed else TILE_VALUES))])
        if packed:
            weights = _emit_unpack(builder, builder.load(builder.bitcast(tile, _I8x32.as_pointer()), align=1))
        else:
            weights = builder.load(builder.bitcast(tile, _I32x16.as_pointer()), align=1)
        column = builder.zext(builder.load(builder.gep(cols, [k]), align=index_bits // 8), _I64)
        for s in range(steps):
            word = builder.load(builder.gep(x, [builder.add(builder.mul(_I64(s), x_stride), column)]), align=1)
            builder.store(builder.call(vnni, [builder.load(sums[s]), _splat(builder, word, _I32x16), weights]),
                          sums[s])
    return [builder.load(total) for total in sums]


def _emit_unpack(builder, packed):
    """The IR of a 4-bit tile's 64 int8 values (as <16 x i32>) from its 32 bytes: the low halves are values 0-31,
    the high halves 32-63, each less ``NIBBLE_OFFSET``."""
    low = builder.and_(packed, ir.Constant(_I8x32, [0x0F] * PACKED_BYTES))
    high = builder.lshr(packed, ir.Constant(_I8x32, [4] * PACKED_BYTES))
    both = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), TILE_VALUES),
                                                         list(range(TILE_VALUES))))
    offset = ir.Constant(ir.VectorType(ir.IntType(8), TILE_VALUES), [NIBBLE_OFFSET] * TILE_VALUES)
    return builder.bitcast(builder.sub(both, offset), _I32x16)


def _tile_row_dot(steps: int, index_bits: int, packed: bool = False):
    """An intrinsic ``dot(w, cols, first, last, x, x_stride, acc)`` on raw addresses storing ``_emit_tile_sums``
    in ``acc`` (steps, 16) int32: for a tile row not 16 rows high (the last one), or an ``out`` with gaps."""
    @intrinsic
    def dot(typingctx, w, cols, first, last, x, x_stride, acc):
        signature = types.void(*([types.intp] * 7))

        def codegen(context, builder, signature, args):
            w, cols, first, last, x, x_stride, acc = args
            acc = builder.inttoptr(acc, _I32x16.as_pointer())
            for s, total in enumerate(_emit_tile_sums(builder, w, cols, first, last, x, x_stride, steps, index_bits,
                                                      packed)):
                builder.store(total, builder.gep(acc, [_I64(s)]), align=4)
            return context.get_dummy_value()
        return signature, codegen
    return dot


def _tile_row_scaled(steps: int, index_bits: int, packed: bool = False):
    """An intrinsic ``dot(w, cols, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales)``
    on raw addresses: for ``s < steps``, ``out[s * out_stride + 0:16] += scales[0:16] * step_scales[s] *
    float(sums[s] - corrections[0:16])`` (``int8.emit_scaled_add``) with ``_emit_tile_sums`` left in registers.
    The scalar loop of ``_add_scaled`` after each tile row cost about 15 ns, more than the row's tiles at 5%
    density (a 2600x650 matvec ran 4.9 us with it, 2.5 us with this)."""
    @intrinsic
    def dot(typingctx, w, cols, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales):
        signature = types.void(*([types.intp] * 11))

        def codegen(context, builder, signature, args):
            w, cols, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales = args
            out = builder.inttoptr(out, ir.FloatType().as_pointer())
            scales = builder.inttoptr(scales, ir.FloatType().as_pointer())
            corrections = builder.inttoptr(corrections, ir.IntType(32).as_pointer())
            step_scales = builder.inttoptr(step_scales, ir.FloatType().as_pointer())
            sums = _emit_tile_sums(builder, w, cols, first, last, x, x_stride, steps, index_bits, packed)
            for s, total in enumerate(sums):
                emit_scaled_add(builder, total, builder.gep(out, [builder.mul(_I64(s), out_stride)]), scales,
                                corrections, builder.load(builder.gep(step_scales, [_I64(s)])))
            return context.get_dummy_value()
        return signature, codegen
    return dot


def _tile_row_calls(packed: bool):
    """``(row, row_scaled)``: compiled functions that call the tile-row intrinsic of ``packed`` tiles (4-bit, or
    int8) for the index width of ``cols`` and 1 or ``STEPS`` steps: ``row(w, cols, first, last, x, x_stride,
    steps, acc)`` (``_tile_row_dot``) and ``row_scaled(w, cols, first, last, x, x_stride, steps, out, out_stride,
    scales, corrections, step_scales)`` (``_tile_row_scaled``), every pointer a raw address but ``cols``."""
    dot_1_u16, dot_4_u16 = _tile_row_dot(1, 16, packed), _tile_row_dot(STEPS, 16, packed)
    dot_1_i32, dot_4_i32 = _tile_row_dot(1, 32, packed), _tile_row_dot(STEPS, 32, packed)
    scaled_1_u16, scaled_4_u16 = _tile_row_scaled(1, 16, packed), _tile_row_scaled(STEPS, 16, packed)
    scaled_1_i32, scaled_4_i32 = _tile_row_scaled(1, 32, packed), _tile_row_scaled(STEPS, 32, packed)

    @njit(inline="always", **JIT)
    def row(w, cols, first, last, x, x_stride, steps, acc):
        c = cols.ctypes.data
        if cols.itemsize == 2:
            if steps == STEPS:
                dot_4_u16(w, c, first, last, x, x_stride, acc)
            else:
                dot_1_u16(w, c, first, last, x, x_stride, acc)
        elif steps == STEPS:
            dot_4_i32(w, c, first, last, x, x_stride, acc)
        else:
            dot_1_i32(w, c, first, last, x, x_stride, acc)

    @njit(inline="always", **JIT)
    def row_scaled(w, cols, first, last, x, x_stride, steps, out, out_stride, scales, corrections, step_scales):
        c = cols.ctypes.data
        if cols.itemsize == 2:
            if steps == STEPS:
                scaled_4_u16(w, c, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales)
            else:
                scaled_1_u16(w, c, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales)
        elif steps == STEPS:
            scaled_4_i32(w, c, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales)
        else:
            scaled_1_i32(w, c, first, last, x, x_stride, out, out_stride, scales, corrections, step_scales)
    return row, row_scaled


_int8_row, _int8_row_scaled = _tile_row_calls(packed=False)
_4bit_row, _4bit_row_scaled = _tile_row_calls(packed=True)


@njit(inline="always", **JIT)
def _vnni_row(values, cols, first, last, xq, step, x_stride, steps, acc):
    """``acc[:steps]`` of one tile row for input rows ``step..step+steps`` of ``xq`` (1 or 4 steps); ``values``
    int8 tiles (nb, 16, 4) or 4-bit ones (nb, 32)."""
    w, x, a = values.ctypes.data, xq.ctypes.data + step * x_stride * 4, acc.ctypes.data
    if values.ndim == 2:
        _4bit_row(w, cols, first, last, x, x_stride, steps, a)
    else:
        _int8_row(w, cols, first, last, x, x_stride, steps, a)


@njit(inline="always", **JIT)
def _vnni_row_scaled(values, cols, first, last, xq, step, x_stride, steps, out, out_stride, scales, corrections,
                     row, step_scales):
    """One whole tile row (output rows ``row..row+16``) added, scaled, into ``out`` (float32, rows
    ``out_stride`` floats apart; ``out[0]`` is ``out``'s address for this step) for input rows ``step..step+steps``
    of ``xq`` (1 or 4 steps), with ``step_scales[0:steps]`` their input scales."""
    w, x = values.ctypes.data, xq.ctypes.data + step * x_stride * 4
    o, s, k = out + row * 4, scales.ctypes.data + row * 4, corrections.ctypes.data + row * 4
    if values.ndim == 2:
        _4bit_row_scaled(w, cols, first, last, x, x_stride, steps, o, out_stride, s, k, step_scales)
    else:
        _int8_row_scaled(w, cols, first, last, x, x_stride, steps, o, out_stride, s, k, step_scales)


def tile_value(values, k, r, j):
    """The int8 value at row ``r``, input ``j`` of tile ``k``, from int8 tiles (nb, 16, 4) or 4-bit ones (nb, 32);
    compiled code only (``overload``)."""
    raise NotImplementedError


@overload(tile_value, inline="always")
def _tile_value(values, k, r, j):
    if values.ndim == 3:
        return lambda values, k, r, j: np.int32(values[k, r, j])

    def packed(values, k, r, j):
        i = r * TILE_COLS + j
        byte = np.int32(values[k, i % PACKED_BYTES])
        return (byte >> 4 if i >= PACKED_BYTES else byte & 15) - NIBBLE_OFFSET
    return packed


@njit(inline="always", **JIT)
def _portable_row(values, cols, first, last, xq, acc):
    """The same tile row without VNNI: exact int32 arithmetic in plain loops (one step)."""
    for r in range(TILE_ROWS):
        acc[r] = 0
    for k in range(first, last):
        base = np.int64(cols[k]) * TILE_COLS
        for r in range(TILE_ROWS):
            total = np.int32(0)
            for j in range(TILE_COLS):
                total += np.int32(xq[base + j]) * tile_value(values, k, r, j)
            acc[r] += total


@njit(inline="always", **JIT)
def _add_scaled(out, start, rows, acc, scales, scale, corrections):
    """``out[row] += scales[row] * scale * (acc - corrections[row])`` for the tile row from ``start`` (a whole
    one: a loop of constant length)."""
    height = TILE_ROWS if start + TILE_ROWS <= rows else rows - start
    if height == TILE_ROWS:
        for r in range(TILE_ROWS):
            out[start + r] += scales[start + r] * scale * np.float32(acc[r] - corrections[start + r])
    else:
        for r in range(height):
            out[start + r] += scales[start + r] * scale * np.float32(acc[r] - corrections[start + r])


def _make_gemv(vnni: bool):
    @njit(**JIT)
    def gemv(values, cols, ptr, scales, corrections, shape, x, out, flip):
        """``out += W @ x`` for ``int8_blocksparse_op(W)``'s arrays; ``flip`` walks the tile rows backwards."""
        rows, width, grid = shape[0], shape[1], ptr.shape[0] - 1
        if x.shape[0] != width or out.shape[0] != rows:
            raise ValueError("int8 block-sparse matvec: x or out does not match the matrix")
        xq = np.empty(-(-width // TILE_COLS) * TILE_COLS, np.uint8)
        scale = _quantise_input(x, xq)
        if scale == 0:
            return                                          # a zero input adds nothing
        if scale < 0:
            _poison(out)
            return
        acc = np.empty(TILE_ROWS, np.int32)
        step_scale = np.full(1, scale, np.float32)
        whole = whole_vectors(out, rows, TILE_ROWS) if vnni and packed_rows(scales, corrections) else 0
        for index in range(grid):
            b = grid - 1 - index if flip else index
            if ptr[b] == ptr[b + 1]:
                continue                                    # an empty tile row adds nothing (its correction is 0)
            if b < whole:
                _vnni_row_scaled(values, cols, ptr[b], ptr[b + 1], xq, 0, 0, 1, out.ctypes.data, 0, scales,
                                 corrections, b * TILE_ROWS, step_scale.ctypes.data)
                continue
            if vnni:
                _vnni_row(values, cols, ptr[b], ptr[b + 1], xq, 0, 0, 1, acc)
            else:
                _portable_row(values, cols, ptr[b], ptr[b + 1], xq, acc)
            _add_scaled(out, b * TILE_ROWS, rows, acc, scales, scale, corrections)
    return gemv


int8_blocksparse_gemv = _make_gemv(VNNI)
portable_blocksparse_gemv = _make_gemv(False)   # the exact reference of the VNNI kernel (tests)


def _make_gemm(vnni: bool):
    if not vnni:                     # no VNNI code at all in a kernel a CPU without it compiles
        @njit(**JIT)
        def stepped(values, cols, ptr, scales, corrections, shape, xs, out):
            for t in range(xs.shape[0]):
                int8_blocksparse_gemv(values, cols, ptr, scales, corrections, shape, xs[t], out[t], False)
        return stepped

    @njit(**JIT)
    def gemm(values, cols, ptr, scales, corrections, shape, xs, out):
        """``out += xs @ W.T``, ``xs`` (T, in): every step quantised on its own (so a sequence equals stepping),
        four steps per pass over a tile row."""
        rows, width, grid, steps = shape[0], shape[1], ptr.shape[0] - 1, xs.shape[0]
        if xs.shape[1] != width or out.shape[1] != rows or out.shape[0] != steps:
            raise ValueError("int8 block-sparse matmat: xs or out does not match the matrix")
        words = -(-width // TILE_COLS)
        xq, step_scales = quantise_steps(xs, words * TILE_COLS)
        if steps == 0 or step_scales.min() < 0:         # NaN or infinity: the poisoned steps as stepping gives them
            for t in range(steps):
                int8_blocksparse_gemv(values, cols, ptr, scales, corrections, shape, xs[t], out[t], False)
            return
        acc = np.empty((STEPS, TILE_ROWS), np.int32)
        whole = whole_vectors(out, rows, TILE_ROWS) if packed_rows(scales, corrections) else 0
        row_stride = out.strides[0] // 4
        for b in range(grid):
            if ptr[b] == ptr[b + 1]:
                continue
            for t in range(0, steps, STEPS):
                block = min(STEPS, steps - t)
                if b < whole:
                    at = out.ctypes.data + t * out.strides[0]
                    if block == STEPS:
                        _vnni_row_scaled(values, cols, ptr[b], ptr[b + 1], xq, t, words, STEPS, at, row_stride,
                                         scales, corrections, b * TILE_ROWS, step_scales.ctypes.data + t * 4)
                    else:
                        for i in range(block):
                            _vnni_row_scaled(values, cols, ptr[b], ptr[b + 1], xq, t + i, words, 1,
                                             at + i * out.strides[0], 0, scales, corrections, b * TILE_ROWS,
                                             step_scales.ctypes.data + (t + i) * 4)
                    continue
                if block == STEPS:
                    _vnni_row(values, cols, ptr[b], ptr[b + 1], xq, t, words, STEPS, acc)
                else:
                    for i in range(block):
                        _vnni_row(values, cols, ptr[b], ptr[b + 1], xq, t + i, words, 1, acc[i:])
                for i in range(block):   # a zero step (scale 0) left xq unwritten: its finite sum times 0 adds 0
                    _add_scaled(out[t + i], b * TILE_ROWS, rows, acc[i], scales, step_scales[t + i], corrections)
    return gemm


int8_blocksparse_gemm = _make_gemm(VNNI)


@njit(**JIT)
def int8_blocksparse_matvec(arrays, x, out, flip):
    values, cols, ptr, scales, corrections, shape = arrays
    int8_blocksparse_gemv(values, cols, ptr, scales, corrections, shape, x, out, flip)


@njit(**JIT)
def int8_blocksparse_matmat(arrays, xs, out):
    values, cols, ptr, scales, corrections, shape = arrays
    int8_blocksparse_gemm(values, cols, ptr, scales, corrections, shape, xs, out)


def int8_blocksparse_arrays(weight: np.ndarray, mask: np.ndarray | None = None, bits: int = 8
                            ) -> tuple[np.ndarray, ...]:
    """``(values, cols, ptr, scales, corrections, shape)``: the 16x4 tiles of ``weight`` (out, in) holding an entry
    of ``mask`` or a nonzero, as int8 with ``int8.quantise_rows``' per-row scales of the whole matrix, and
    ``128 * row sums`` of the int8 rows; scales and corrections padded to whole tile rows. ``bits=4``: the values on
    the ``[-7, 7]`` grid, tiles packed two values a byte (``pack_nibbles``)."""
    weight = np.asarray(weight, np.float32)
    q, row_scales = quantise_rows(weight, levels(4 if bits == 4 else 8))
    values, cols, ptr, _ = tiles(q, mask)
    grid_rows = ptr.shape[0] - 1
    scales = np.ones(grid_rows * TILE_ROWS, np.float32)
    scales[:weight.shape[0]] = row_scales
    corrections = np.zeros(grid_rows * TILE_ROWS, np.int64)
    tile_row = np.repeat(np.arange(grid_rows), np.diff(ptr))
    np.add.at(corrections.reshape(grid_rows, TILE_ROWS), tile_row, values.astype(np.int64).sum(axis=2))
    if bits == 4:
        values = pack_nibbles(values)
    return values, cols, ptr, scales, (ZERO_POINT * corrections).astype(np.int32), _shape(weight)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """int8 tiles (nb, 16, 4) with values in [-7, 7] as 4-bit tiles (nb, 32): byte ``i`` of a tile holds value
    ``i`` (in the int8 tile's row-major order) plus 8 in its low half and value ``i + 32`` plus 8 in its high half.

    >>> t = np.zeros((1, 16, 4), np.int8); t[0, 0, 0], t[0, 8, 0] = -7, 3
    >>> pack_nibbles(t)[0, :2].tolist()                  # (-7 + 8) | (3 + 8) << 4, then 8 | 8 << 4
    [177, 136]
    """
    flat = values.reshape(len(values), TILE_VALUES).astype(np.int16)
    if len(flat) and np.abs(flat).max() > NIBBLE_OFFSET - 1:
        raise ValueError("4-bit tiles hold values in [-7, 7]")
    biased = (flat + NIBBLE_OFFSET).astype(np.uint8)
    return np.ascontiguousarray(biased[:, :PACKED_BYTES] | (biased[:, PACKED_BYTES:] << 4))


def int8_blocksparse_op(weight: np.ndarray, mask: np.ndarray | None = None, bits: int = 8) -> RuntimeOp:
    """The int8 op of a block-sparse matrix given densely (see ``int8_blocksparse_arrays``; ``bits=4``: its
    4-bit tiles).

    >>> w = np.zeros((20, 6), np.float32); w[17, 4:] = [1.0, -2.0]; out = np.zeros(20, np.float32)
    >>> op = int8_blocksparse_op(w); op.matvec(op.arrays, np.ones(6, np.float32), out, False)
    >>> round(float(out[17]), 1), len(op.arrays[1])      # 1 - 2 on the int8 grid
    (-1.0, 1)
    """
    return RuntimeOp(int8_blocksparse_arrays(weight, mask, bits), int8_blocksparse_matvec, int8_blocksparse_matmat)


@register_op("int8", BlockSparse)
def _int8(form: BlockSparse) -> RuntimeOp:
    _check_cpu()
    return int8_blocksparse_op(form.materialize().detach().cpu().float().numpy(), form.mask.cpu().numpy(),
                               form.value_bits)


__all__ = ["blocksparse_op", "int8_blocksparse_op", "pack_nibbles", "tiles"]
