"""int8 weights in the batch-1 engine: ``compile(model, precision="int8")``.

Every matrix whose form has an int8 op (``precision.register_op("int8", ...)``: dense, low-rank, sparse, block-
sparse, Kronecker (``int8_kron``), AntMan's group forms, and a doped matrix's parts that have one) is stored as int8
with one float32 scale per output row (symmetric, ``scale = max |row| / 127``); the vector it multiplies is
quantised at every call, per call and symmetric, to unsigned bytes around the zero point 128. The product then runs
on AVX-512 VNNI: one ``vpdpbusd`` multiplies 64 byte pairs and adds them, in groups of four, into 16 int32 lanes: 4x
the multiply-adds of a float32 FMA instruction, from a quarter of the bytes. The cell state, gates and
nonlinearities stay float32.

Layout: the int8 matrix is cut into panels of 64 output rows; inside a panel, for every group of four inputs, the
64 rows' four bytes follow each other (256 bytes: four 64-byte vectors), so the kernel streams memory in order and
broadcasts one 32-bit word of the input (its four bytes) against each vector. Inputs are padded to a multiple of 4,
outputs to 64. A form without an int8 op keeps its float32 op (``compile`` logs which).

The zero point: with ``q = round(x / s_x)`` in [-127, 127] and the input stored as ``q + 128`` (VNNI multiplies
unsigned by signed bytes), ``sum (q + 128) w = sum q w + 128 sum w``; the second term is a per-row constant
(``correction``) subtracted before scaling: ``out += s_w * s_x * (acc - correction)``.

On a CPU without AVX-512 VNNI the same arithmetic runs in plain compiled loops (exact, slower).
"""
from __future__ import annotations

import logging

import numpy as np
from llvmlite import binding, ir
from numba import carray, njit, types
from numba.extending import intrinsic

from ..nn.forms.antman import GroupDense, GroupLowRank
from ..nn.forms.antman_kernels import _shuffle_add, _shuffle_add_rows
from ..nn.forms.dense import Dense
from ..nn.forms.lowrank import LowRank
from ..nn.forms.sparse import MaskedSparse
from . import amx
from .dot_block import PANEL, panel_dot_block   # panels of 64 output rows: four vectors of 16 lanes
from .kernels import JIT, RuntimeOp, _stack_f32, aligned, jagged_diagonals, sparse_op
from .precision import register_embedding, register_head, register_op

log = logging.getLogger(__name__)

QUAD = 4                        # inputs per VNNI group
ZERO_POINT = 128
VNNI = bool(binding.get_host_cpu_features().get("avx512vnni", False))
_I32x16 = ir.VectorType(ir.IntType(32), 16)

# --- packing ----------------------------------------------------------------------------------------------------
def quantise_rows(weight: np.ndarray, levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scales)``: int8 ``q`` (out, in) and float32 per-row scales with ``weight ~ scales[:, None] * q``;
    ``q`` in ``[-levels, levels]`` (127; 7 for a form with 4-bit values, whose grid ``nn.quant`` snapped it to).

    >>> q, s = quantise_rows(np.array([[0.5, -1.0], [0.0, 0.0]], np.float32))
    >>> q.tolist(), s.tolist()
    ([[64, -127], [0, 0]], [0.007874015718698502, 1.0])
    """
    weight = np.asarray(weight, np.float32)
    largest = np.abs(weight).max(axis=1) if weight.size else np.zeros(weight.shape[0], np.float32)
    scales = np.where(largest > 0, largest / np.float32(levels), 1.0).astype(np.float32)   # an all-zero row: any
    q = np.clip(np.rint(weight / scales[:, None]), -levels, levels).astype(np.int8)
    return q, scales


def pack_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(panels, scales, corrections)`` of a float ``(out, in)`` matrix: int8 panels ``(P, ceil(in/4), 64, 4)``,
    per-row scales and ``128 * row sums`` of the int8 rows, both padded to ``64 P`` rows."""
    q, scales = quantise_rows(weight)
    rows, cols = q.shape
    count, quads = -(-rows // PANEL), -(-cols // QUAD)
    padded = np.zeros((count * PANEL, quads * QUAD), np.int8)
    padded[:rows, :cols] = q
    panels = padded.reshape(count, PANEL, quads, QUAD).transpose(0, 2, 1, 3)
    full_scales = np.ones(count * PANEL, np.float32)
    full_scales[:rows] = scales
    corrections = ZERO_POINT * padded.astype(np.int32).sum(axis=1)
    return aligned(panels), aligned(full_scales), aligned(corrections.astype(np.int32))


# --- the VNNI panel block -------------------------------------------------------------------------------------
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"          # unsigned bytes (the input) times signed bytes (the weights)
_vnni_1 = panel_dot_block(1, _VPDPBUSD, _I32x16, _I32x16)      # one step (the recurrent product)
_vnni_4 = panel_dot_block(4, _VPDPBUSD, _I32x16, _I32x16)      # four steps of a sequence: 16 accumulators


_F32x16 = ir.VectorType(ir.FloatType(), 16)
_I64 = ir.IntType(64)


def _opaque(builder, vector):
    """``vector`` through an empty inline-asm statement: fast-math may not reorder a product across it, so
    ``(scales * scale) * sum`` rounds as the scalar loops compute it (left to right), whatever the context."""
    return builder.asm(ir.FunctionType(vector.type, [vector.type]), "", "=v,0", [vector], False)


def _splat(builder, value, vector_type):
    spread = builder.insert_element(ir.Constant(vector_type, ir.Undefined), value, ir.IntType(32)(0))
    return builder.shuffle_vector(spread, ir.Constant(vector_type, ir.Undefined), ir.Constant(_I32x16, [0] * 16))


def emit_scaled_add(builder, total, out, scales, corrections, scale) -> None:
    """The IR of ``out[0:16] += (scales[0:16] * scale) * float(total - corrections[0:16])`` for an int32 sum
    vector ``total``, float32 / int32 pointers ``out``, ``scales``, ``corrections`` and a float32 ``scale``: the
    scalar epilogue's arithmetic in the same order, in vector registers. After every panel or tile row the scalar
    loop cost 13-17% of a dense int8 product (2600x650: 22.7 us with it, 19.6 without any) and more than the tiles
    of a 5%-dense block-sparse one."""
    vector = _F32x16.as_pointer()
    factor = _opaque(builder, builder.fmul(builder.load(builder.bitcast(scales, vector), align=4),
                                           _splat(builder, scale, _F32x16)))
    difference = builder.sub(total, builder.load(builder.bitcast(corrections, _I32x16.as_pointer()), align=4))
    target = builder.bitcast(out, vector)
    value = builder.fmul(factor, builder.sitofp(difference, _F32x16))
    builder.store(builder.fadd(builder.load(target, align=4), value), target, align=4)


def _scaled_add(vectors: int):
    """An intrinsic ``add(acc, out, scales, corrections, scale)`` on raw addresses: ``emit_scaled_add`` for
    ``vectors`` x 16 rows, the sums read from ``acc`` (int32) and the input scale from the float32 at
    ``scale``."""
    @intrinsic
    def add(typingctx, acc, out, scales, corrections, scale):
        signature = types.void(*([types.intp] * 5))

        def codegen(context, builder, signature, args):
            acc, out, scales, corrections, scale = (builder.inttoptr(a, ir.IntType(8).as_pointer()) for a in args)
            scale = builder.load(builder.bitcast(scale, ir.FloatType().as_pointer()))
            for v in range(vectors):
                at = _I64(64 * v)
                total = builder.load(builder.bitcast(builder.gep(acc, [at]), _I32x16.as_pointer()), align=4)
                emit_scaled_add(builder, total, builder.gep(out, [at]), builder.gep(scales, [at]),
                                builder.gep(corrections, [at]), scale)
            return context.get_dummy_value()
        return signature, codegen
    return add


_scaled_add_panel = _scaled_add(PANEL // 16)


@njit(inline="always", **JIT)
def whole_vectors(out, rows, size):
    """Groups of ``size`` rows the vector epilogue may add into ``out`` (1-D, or one row per step) directly: all
    whole ones when its float32 values are contiguous and its rows a whole number of floats apart, else none."""
    return rows // size if out.strides[out.ndim - 1] == 4 and out.strides[0] % 4 == 0 else 0


@njit(inline="always", **JIT)
def packed_rows(scales, corrections):
    """Whether the per-row scales and corrections lie contiguously, as the vector epilogue reads them (16 at a
    time from raw addresses); the packing functions make them so."""
    return scales.strides[0] == 4 and corrections.strides[0] == 4


@njit(inline="always", **JIT)
def _portable_panel(panels, b, xq, quads, acc):
    """The same block without VNNI: exact int32 arithmetic in plain loops."""
    for r in range(PANEL):
        acc[r] = 0
    for q in range(quads):
        for r in range(PANEL):
            total = 0
            for j in range(QUAD):
                total += np.int32(xq[q * QUAD + j]) * np.int32(panels[b, q, r, j])
            acc[r] += total


@intrinsic
def _bits(typingctx, value):
    """The bits of a float32 as a uint32: a NaN/infinity test that fast-math code cannot fold away."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, value):
    """The float32 with bits ``value``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


_EXPONENT = np.uint32(0x7F800000)
_MAGNITUDE = np.uint32(0x7FFFFFFF)         # every bit but the sign
_QUIET_NAN = np.uint32(0x7FC00000)


@njit(inline="always", **JIT)
def _quantise_input(x, xq):
    """Quantise ``x`` into the unsigned bytes ``xq`` (padding: the zero point). Returns the scale; 0 for a zero
    ``x``; -1 when ``x`` holds NaN or infinity (``_poison`` then gives the float product's NaN).

    The largest magnitude is the largest of the bits with the sign cleared, an integer maximum: IEEE floats of one
    sign order as their bits, and NaN and infinity lie above every finite float. That test survives fast math
    (where a float NaN test may be optimised away), and the loop, with no early exit, vectorises: 650 floats
    quantised in 0.16 us against 1.0 us for a float maximum with a NaN exit per element (Intel Xeon, one thread,
    training paused)."""
    top = np.uint32(0)
    for i in range(x.shape[0]):
        top = max(top, _bits(np.float32(x[i])) & _MAGNITUDE)
    if top >= _EXPONENT:
        return np.float32(-1.0)
    if top == 0:
        return np.float32(0.0)
    scale = _from_bits(top) / np.float32(127.0)
    inverse = np.float32(1.0) / scale
    for i in range(x.shape[0]):
        xq[i] = np.uint8(np.int32(np.rint(x[i] * inverse)) + 128)
    for i in range(x.shape[0], xq.shape[0]):
        xq[i] = 128
    return scale


@njit(inline="always", **JIT)
def quantise_steps(xs, width):
    """Every step (row) of ``xs`` quantised on its own (``_quantise_input``) into unsigned bytes ``(T, width)``,
    and its scales: a sequence product then equals stepping."""
    xq = np.empty((xs.shape[0], width), np.uint8)
    step_scales = np.empty(xs.shape[0], np.float32)
    for t in range(xs.shape[0]):
        step_scales[t] = _quantise_input(xs[t], xq[t])
    return xq, step_scales


@njit(inline="always", **JIT)
def _poison(out):
    """NaN into every output, as a float product with a NaN or infinite input gives."""
    for r in range(out.shape[0]):
        out[r] = _from_bits(_QUIET_NAN)


def _make_gemv(vnni: bool):
    @njit(**JIT)
    def gemv(panels, scales, corrections, x, out, flip):
        """``out += W @ x`` for ``pack_int8(W)``; ``flip`` walks the panels backwards."""
        count, quads = panels.shape[0], panels.shape[1]
        if x.shape[0] > quads * QUAD or out.shape[0] > count * PANEL:
            raise ValueError("int8 gemv: x or out does not match the matrix")
        xq = np.empty(quads * QUAD, np.uint8)
        scale = _quantise_input(x, xq)
        if scale == 0:
            return                                          # a zero input adds nothing
        if scale < 0:
            _poison(out)
            return
        acc = np.empty(PANEL, np.int32)
        step_scale = np.full(1, scale, np.float32)
        m = out.shape[0]
        whole = whole_vectors(out, m, PANEL) if vnni and packed_rows(scales, corrections) else 0
        for index in range(count):
            b = count - 1 - index if flip else index
            if vnni:
                _vnni_1(panels.ctypes.data + b * quads * PANEL * QUAD, xq.ctypes.data, 0, quads, acc.ctypes.data)
            else:
                _portable_panel(panels, b, xq, quads, acc)
            start = b * PANEL
            if b < whole:
                _scaled_add_panel(acc.ctypes.data, out.ctypes.data + start * 4, scales.ctypes.data + start * 4,
                                  corrections.ctypes.data + start * 4, step_scale.ctypes.data)
                continue
            for r in range(min(PANEL, m - start)):
                row = start + r
                out[row] += scales[row] * scale * np.float32(acc[r] - corrections[row])
    return gemv


int8_gemv = _make_gemv(VNNI)
VNNI_ON = VNNI             # a compile-time constant of the kernels below
AMX_ON = amx.AMX and VNNI  # the same, for the sequence products on AMX tiles
# Fewer steps, or fewer inputs, run on VNNI: a tile block loads every weight tile however few steps it holds, and
# short rows leave few full tiles. Intel Xeon (Emerald Rapids), one thread, interleaved in one process
# (benchmarks/int8_amx.py, results/int8-amx.json), AMX against VNNI: 650 inputs 0.74x at 8 steps, 0.99x at 12,
# 1.17-1.27x at 35; at 35 steps 199 and 227 inputs 1.59x and 1.16x.
AMX_MIN_STEPS = 16
AMX_MIN_INPUTS = 192


# --- ops of the forms -------------------------------------------------------------------------------------------
@njit(**JIT)
def int8_matvec(arrays, x, out, flip):
    panels, scales, corrections = arrays
    int8_gemv(panels, scales, corrections, x, out, flip)


@njit(**JIT)
def int8_gemm(panels, scales, corrections, xs, out):
    """``out += xs @ W.T`` for ``pack_int8(W)``, ``xs`` (T, in): every step quantised on its own (so ``run`` equals
    stepping), four steps per block on VNNI, 16 on AMX tiles where the CPU has them and the product is large
    enough to gain (``runtime.amx``: the same integer sums, so the same outputs)."""
    count, quads = panels.shape[0], panels.shape[1]
    steps, m = xs.shape[0], out.shape[1]
    if xs.shape[1] > quads * QUAD or m > count * PANEL or out.shape[0] != steps:
        raise ValueError("int8 gemm: xs or out does not match the matrix")
    xq, step_scales = quantise_steps(xs, quads * QUAD)
    if not VNNI_ON or step_scales.min() < 0:
        for t in range(steps):
            int8_gemv(panels, scales, corrections, xs[t], out[t], False)
        return
    if AMX_ON and steps >= AMX_MIN_STEPS and quads * QUAD >= AMX_MIN_INPUTS:
        _amx_gemm(panels, scales, corrections, xq, step_scales, out)
    else:
        _vnni_gemm(panels, scales, corrections, xq, step_scales, out)


@njit(**JIT)
def _vnni_gemm(panels, scales, corrections, xq, step_scales, out):
    """``int8_gemm``'s products on VNNI, four steps per block (each weight vector loaded once for four steps)."""
    count, quads = panels.shape[0], panels.shape[1]
    steps = xq.shape[0]
    acc = np.empty((4, PANEL), np.int32)
    whole = whole_vectors(out, out.shape[1], PANEL) if packed_rows(scales, corrections) else 0
    for b in range(count):
        w = panels.ctypes.data + b * quads * PANEL * QUAD
        for t in range(0, steps, 4):
            block = min(4, steps - t)
            if block == 4:
                _vnni_4(w, xq[t:].ctypes.data, quads, quads, acc.ctypes.data)
            else:
                for i in range(block):
                    _vnni_1(w, xq[t + i:].ctypes.data, 0, quads, acc[i:].ctypes.data)
            for i in range(block):
                _add_sums(acc[i], out, t + i, b, b < whole, scales, corrections, step_scales)


@njit(**JIT)
def _amx_gemm(panels, scales, corrections, xq, step_scales, out):
    """``int8_gemm``'s products on AMX tiles, 16 steps a block, from the same panels and quantised steps."""
    count, quads = panels.shape[0], panels.shape[1]
    steps = xq.shape[0]
    if steps % amx.STEPS:                           # whole blocks: the last one's extra rows are zeros
        padded = np.zeros((steps + amx.STEPS - steps % amx.STEPS, xq.shape[1]), np.uint8)
        padded[:steps] = xq
        xq = padded
    acc = np.empty((amx.STEPS, PANEL), np.int32)
    whole = whole_vectors(out, out.shape[1], PANEL) if packed_rows(scales, corrections) else 0
    config = amx.tile_config(quads)
    amx.configure(config.ctypes.data)
    for b in range(count):
        w = panels.ctypes.data + b * quads * PANEL * QUAD
        for t in range(0, steps, amx.STEPS):
            amx.panel_block(xq[t:].ctypes.data, xq.strides[0], w, quads, acc.ctypes.data)
            for i in range(min(amx.STEPS, steps - t)):
                _add_sums(acc[i], out, t + i, b, b < whole, scales, corrections, step_scales)
    amx.release()


@njit(inline="always", **JIT)
def _add_sums(acc, out, t, b, vectors, scales, corrections, step_scales):
    """``out[t, rows of panel b] += scales * step_scales[t] * (acc - corrections)``: the vector epilogue when
    ``vectors`` (a whole panel of contiguous rows), else row by row."""
    start = b * PANEL
    if vectors:
        _scaled_add_panel(acc.ctypes.data, out.ctypes.data + t * out.strides[0] + start * 4,
                          scales.ctypes.data + start * 4, corrections.ctypes.data + start * 4,
                          step_scales.ctypes.data + t * 4)
        return
    for r in range(min(PANEL, out.shape[1] - start)):
        row = start + r
        out[t, row] += scales[row] * step_scales[t] * np.float32(acc[r] - corrections[row])


@njit(**JIT)
def int8_matmat(arrays, xs, out):
    panels, scales, corrections = arrays
    int8_gemm(panels, scales, corrections, xs, out)


@njit(**JIT)
def affine(weight, bias, xs):
    """``xs @ W.T + bias`` for a (T, in) batch and ``weight = pack_int8(W)``: an ``nn.Linear`` head in int8."""
    panels, scales, corrections = weight
    out = np.empty((xs.shape[0], bias.shape[0]), np.float32)
    for t in range(xs.shape[0]):
        out[t] = bias
    int8_gemm(panels, scales, corrections, xs, out)
    return out


def int8_dense_op(weight: np.ndarray) -> RuntimeOp:
    """The int8 op of a dense ``(out, in)`` matrix.

    >>> w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32); out = np.zeros(2, np.float32)
    >>> op = int8_dense_op(w); op.matvec(op.arrays, np.array([1.0, 1.0], np.float32), out, False)
    >>> [round(float(v), 2) for v in out]          # float32: -1.0, 0.75; int8 rounding moves the first by 1%
    [-0.99, 0.75]
    """
    return RuntimeOp(pack_int8(weight), int8_matvec, int8_matmat)


@njit(**JIT)
def int8_lowrank_matvec(arrays, x, out, flip):
    left, left_scales, left_corr, right, right_scales, right_corr = arrays
    thin = np.zeros(right_scales.shape[0], np.float32)[:left.shape[1] * QUAD]
    int8_gemv(right, right_scales, right_corr, x, thin, flip)
    int8_gemv(left, left_scales, left_corr, thin, out, flip)


@njit(**JIT)
def int8_lowrank_matmat(arrays, xs, out):
    """Both stages as one sequence product each (``int8_gemm``: four steps per block, every step's vectors
    quantised on their own, so it equals stepping). As one matvec per step, the second stage of a 10000 x 199
    decoder factor takes 29 us a step: each step re-reads the whole factor for a short reduction per row."""
    left, left_scales, left_corr, right, right_scales, right_corr = arrays
    thin = np.zeros((xs.shape[0], left.shape[1] * QUAD), np.float32)
    int8_gemm(right, right_scales, right_corr, xs, thin)
    int8_gemm(left, left_scales, left_corr, thin, out)


def int8_lowrank_op(left: np.ndarray, right: np.ndarray) -> RuntimeOp:
    """The int8 op of ``left @ right``: two int8 products through the rank (the thin vector is re-quantised)."""
    return RuntimeOp(pack_int8(left) + pack_int8(right), int8_lowrank_matvec, int8_lowrank_matmat)


# --- sparse: jagged diagonals with int8 values ------------------------------------------------------------------
# The float32 layout (``kernels.jagged_diagonals``: uint16 columns) with int8 values and one scale per row: 3 bytes
# an entry instead of 6. The input stays float32 (the gather reads single floats, so there is no vector of bytes to
# feed VNNI); the value is widened in the multiply and the row's scale applied once, at the end.
@njit(**JIT)
def int8_jds_matvec(arrays, x, out, flip):
    perm, ptr, cols, vals, scales = arrays                 # scales in sorted row order
    count = ptr.shape[0] - 1
    filled = ptr[1] - ptr[0] if count else 0
    acc = carray(_stack_f32(filled), filled)
    acc[:] = 0.0
    for d in range(0, count - count % 2, 2):
        v0, c0 = vals[ptr[d]:ptr[d + 1]], cols[ptr[d]:ptr[d + 1]]
        v1, c1 = vals[ptr[d + 1]:ptr[d + 2]], cols[ptr[d + 1]:ptr[d + 2]]
        for r in range(v1.shape[0]):
            acc[r] += np.float32(v0[r]) * x[c0[r]] + np.float32(v1[r]) * x[c1[r]]
        for r in range(v1.shape[0], v0.shape[0]):
            acc[r] += np.float32(v0[r]) * x[c0[r]]
    if count % 2:
        v, c = vals[ptr[count - 1]:ptr[count]], cols[ptr[count - 1]:ptr[count]]
        for r in range(v.shape[0]):
            acc[r] += np.float32(v[r]) * x[c[r]]
    for r in range(filled):
        out[perm[r]] += acc[r] * scales[r]


@njit(**JIT)
def int8_jds_matmat(arrays, xs, out):
    perm, ptr, cols, vals, scales = arrays
    steps, width = xs.shape[0], (xs.shape[0] + 7) // 8 * 8
    by_input = np.zeros((xs.shape[1], width), np.float32)   # X^T: (in, T)
    by_input[:, :steps] = xs.T
    filled = ptr[1] - ptr[0] if ptr.shape[0] > 1 else 0
    acc = np.zeros((filled, width), np.float32)
    for d in range(ptr.shape[0] - 1):
        v, c = vals[ptr[d]:ptr[d + 1]], cols[ptr[d]:ptr[d + 1]]
        for r in range(v.shape[0]):
            value, source = np.float32(v[r]), c[r]
            for t in range(width):
                acc[r, t] += value * by_input[source, t]
    for r in range(filled):
        row, scale = perm[r], scales[r]
        for t in range(steps):
            out[t, row] += acc[r, t] * scale


def int8_sparse_op(weight: np.ndarray) -> RuntimeOp:
    """The int8 op of a sparse matrix given densely (zeros are structural): int8 jagged diagonals, or the float32
    entry list where rows hold about one entry (``kernels.sparse_op``: there the indices are most of the bytes).

    >>> w = np.tile(np.array([[0, 2.0, 0], [3.0, 0, -4.0]], np.float32), (4, 1)); out = np.zeros(8, np.float32)
    >>> op = int8_sparse_op(w); op.matvec(op.arrays, np.ones(3, np.float32), out, False)
    >>> [round(float(v), 2) for v in out[:2]]      # float32: 2.0, -1.0
    [2.0, -1.01]
    """
    op = sparse_op(weight)
    if len(op.arrays) != 4:                                  # an entry list: float32 as it is
        return op
    q, scales = quantise_rows(weight)
    perm, ptr, cols, vals = jagged_diagonals(q.astype(np.float32))
    return RuntimeOp((perm, ptr, cols, vals.astype(np.int8), scales[perm]), int8_jds_matvec, int8_jds_matmat)


# --- AntMan's group forms: every block an int8 panel product ------------------------------------------------------
def pack_int8_groups(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``blocks`` (g, out/g, in/g) as ``pack_int8`` of each block, stacked: panels, scales and corrections."""
    packed = [pack_int8(block) for block in np.asarray(blocks, np.float32)]
    return tuple(aligned(np.stack([p[i] for p in packed])) for i in range(3))


@njit(**JIT)
def _int8_stage_vec(panels, scales, corrections, x, y, flip):
    """``y += blockdiag(blocks) @ x`` for one step, every group's input slice quantised on its own."""
    g = panels.shape[0]
    width, rows = x.shape[0] // g, y.shape[0] // g
    for index in range(g):
        k = g - 1 - index if flip else index
        int8_gemv(panels[k], scales[k], corrections[k], x[k * width:(k + 1) * width], y[k * rows:(k + 1) * rows],
                  flip)


@njit(**JIT)
def _int8_stage_mat(panels, scales, corrections, xs, ys):
    g = panels.shape[0]
    width, rows = xs.shape[1] // g, ys.shape[1] // g
    for k in range(g):
        part = np.ascontiguousarray(xs[:, k * width:(k + 1) * width])
        result = np.zeros((xs.shape[0], rows), np.float32)
        int8_gemm(panels[k], scales[k], corrections[k], part, result)
        ys[:, k * rows:(k + 1) * rows] += result


@njit(**JIT)
def int8_group_matvec(arrays, x, out, flip):
    panels, scales, corrections, shuffle = arrays[0], arrays[1], arrays[2], arrays[3][0]
    if shuffle:
        y = np.zeros(out.shape[0], np.float32)
        _int8_stage_vec(panels, scales, corrections, x, y, flip)
        _shuffle_add(y, panels.shape[0], out)
    else:
        _int8_stage_vec(panels, scales, corrections, x, out, flip)


@njit(**JIT)
def int8_group_matmat(arrays, xs, out):
    panels, scales, corrections, shuffle = arrays[0], arrays[1], arrays[2], arrays[3][0]
    ys = np.zeros(out.shape, np.float32)
    _int8_stage_mat(panels, scales, corrections, xs, ys)
    if shuffle:
        _shuffle_add_rows(ys, panels.shape[0], out)
    else:
        out += ys


@njit(**JIT)
def int8_group_lowrank_matvec(arrays, x, out, flip):
    right, right_scales, right_corr, left, left_scales, left_corr, meta = arrays
    g, shuffle, rank = right.shape[0], meta[0], meta[1]
    z = np.zeros(2 * rank if shuffle else rank, np.float32)     # V_a x_a, group-contiguous (and shuffled)
    _int8_stage_vec(right, right_scales, right_corr, x, z[:rank], flip)
    if shuffle:                                                  # U_b reads a share of every V_a
        _shuffle_add(z[:rank], g, z[rank:])
        _int8_stage_vec(left, left_scales, left_corr, z[rank:], out, flip)
    else:
        _int8_stage_vec(left, left_scales, left_corr, z, out, flip)


@njit(**JIT)
def int8_group_lowrank_matmat(arrays, xs, out):
    right, right_scales, right_corr, left, left_scales, left_corr, meta = arrays
    g, shuffle, rank = right.shape[0], meta[0], meta[1]
    z = np.zeros((xs.shape[0], rank), np.float32)                # (T, rank)
    _int8_stage_mat(right, right_scales, right_corr, xs, z)
    if shuffle:
        mixed = np.zeros(z.shape, np.float32)
        _shuffle_add_rows(z, g, mixed)
        _int8_stage_mat(left, left_scales, left_corr, mixed, out)
    else:
        _int8_stage_mat(left, left_scales, left_corr, z, out)


_warned = False


def _check_cpu() -> None:
    """Say once per process when int8 runs without VNNI: correct, but slower than float32, not faster."""
    global _warned
    if not VNNI and not _warned:
        _warned = True
        log.warning("this CPU has no AVX-512 VNNI: int8 products run in portable loops, exact but several times "
                    "slower than float32 here; use precision='float32' (or 'bfloat16' where the CPU has AVX-512 BF16)")


class Int8Table:
    """An embedding table stored as int8 with one float32 scale per row (``quantise_rows``): a row is looked up
    and scaled back to float32, a quarter of the float32 table's bytes."""

    def __init__(self, table: np.ndarray) -> None:
        self.codes, self.scales = quantise_rows(table)
        self.nbytes = self.codes.nbytes + self.scales.nbytes

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.codes[ids].astype(np.float32) * self.scales[ids, None]


@register_embedding("int8")
def _embedding(table: np.ndarray) -> Int8Table:
    return Int8Table(table)


@register_head("int8")
def _head(weight: np.ndarray):
    _check_cpu()
    return pack_int8(weight), affine


@register_op("int8", Dense)
def _dense(form: Dense) -> RuntimeOp:
    _check_cpu()
    return int8_dense_op(form.weight.detach().cpu().float().numpy())


@register_op("int8", MaskedSparse)
def _sparse(form: MaskedSparse) -> RuntimeOp:
    return int8_sparse_op(form.materialize().detach().cpu().float().numpy())


@register_op("int8", GroupDense)
def _group(form: GroupDense) -> RuntimeOp:
    arrays = pack_int8_groups(form.blocks.detach().cpu().float().numpy())
    return RuntimeOp(arrays + (np.array([int(form.shuffle)], np.int64),), int8_group_matvec, int8_group_matmat)


@register_op("int8", GroupLowRank)
def _group_lowrank(form: GroupLowRank) -> RuntimeOp:
    right = pack_int8_groups(form.right.detach().cpu().float().numpy())     # (g, rank/g, in/g) blocks of V
    left = pack_int8_groups(form.left.detach().cpu().float().numpy())       # (g, out/g, rank/g) blocks of U
    meta = np.array([int(form.shuffle), form.rank], np.int64)
    return RuntimeOp(right + left + (meta,), int8_group_lowrank_matvec, int8_group_lowrank_matmat)


@register_op("int8", LowRank)
def _lowrank(form: LowRank) -> RuntimeOp:
    return int8_lowrank_op(form.left.detach().cpu().float().numpy(), form.right.detach().cpu().float().numpy())


__all__ = ["VNNI", "affine", "int8_dense_op", "int8_gemm", "int8_gemv", "int8_lowrank_op", "pack_int8", "quantise_rows"]

from . import blocksparse_ops  # noqa: E402,F401  (registers BlockSparse's int8 op, which needs the kernels above)
from . import int8_kron  # noqa: E402,F401  (registers Kronecker's int8 op, built on the kernels above)
