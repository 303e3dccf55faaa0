"""bfloat16 weights in the batch-1 engine: ``compile(model, precision="bfloat16")``.

Every matrix whose form has a bfloat16 op (``precision.register_op("bfloat16", ...)``: Dense, LowRank) and every
``nn.Linear`` head is stored as bfloat16, rounded to nearest even from float32 (the top 16 bits of a float32: the
same exponent range, 8 bits of mantissa, half the bytes). The vector it multiplies is rounded the same way at every
call; the products accumulate in float32, and the cell state, gates and nonlinearities stay float32. No scales:
unlike int8, bfloat16 keeps each weight's own exponent, so the only error is the rounding of weights and inputs
(relative 2^-9 each).

The product runs on AVX-512 BF16: one ``vdpbf16ps`` multiplies 16 pairs of bfloat16 by 16 pairs and adds both
products into 16 float32 lanes, twice the work of a float32 FMA from half the bytes.

Layout: the bfloat16 matrix is cut into panels of 64 output rows; inside a panel, for every pair of inputs, the 64
rows' two values follow each other (256 bytes: four 64-byte vectors), so the kernel streams memory in order and
broadcasts one 32-bit word of the input (its two bfloat16 values) against each vector. Inputs are padded to even
length, outputs to 64 rows (padding is zero).

Arithmetic, exactly: for a row's lane, ``acc = (acc + w[2q+1] x[2q+1]) + w[2q] x[2q]`` for the pairs ``q`` in order,
starting from zero; a product of two bfloat16 is exact in float32, each sum is rounded to nearest even, and
denormals are flushed to zero (inputs, products and sums: the instruction's fixed DAZ/FTZ). The panel's sums are then
added to ``out``. On a CPU without AVX-512 BF16 the same arithmetic runs in plain compiled loops (no fast-math,
denormals flushed the same way), so both paths give identical bits (``tests/runtime/test_bf16.py``).
"""
from __future__ import annotations

import logging

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.extending import intrinsic

from ..nn.forms.dense import Dense
from ..nn.forms.lowrank import LowRank
from .dot_block import PANEL, panel_dot_block   # panels of 64 output rows: four vectors of 16 lanes
from .kernels import JIT, RuntimeOp, aligned
from .precision import register_embedding, register_head, register_op

log = logging.getLogger(__name__)
PAIR = 2                        # inputs per vdpbf16ps group
BF16 = bool(binding.get_host_cpu_features().get("avx512bf16", False))
EXACT = dict(JIT, fastmath=False)       # the portable loops: every float32 sum rounded in order, as the hardware does
_F32x16 = ir.VectorType(ir.FloatType(), 16)
_I32x16 = ir.VectorType(ir.IntType(32), 16)
_SMALLEST = np.float32(np.finfo(np.float32).tiny)          # below it: a denormal, flushed to zero


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it)."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


# The intrinsic's operands: <32 x bfloat> since LLVM 17/18; older LLVM (llvmlite < 0.45: LLVM 14/15) declares them
# <16 x i32>. LLVM 22 also accepts <16 x i32> and <32 x i16> (upgraded on reading); all three give the same code.
_OPERAND = ir.VectorType(_BFloat(), 32) if binding.llvm_version_info >= (20,) else _I32x16
_DPBF16PS = "llvm.x86.avx512bf16.dpbf16ps.512"


# --- rounding ---------------------------------------------------------------------------------------------------
def to_bf16(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of float32 ``values``, rounded to nearest even; denormals flush to signed zero,
    NaN stays a (quiet) NaN, values past the largest bfloat16 round to infinity.

    >>> to_bf16(np.array([1.0, -2.0, 1.00390625, 1.01171875, 3e-39], np.float32)).tolist()
    [16256, 49152, 16256, 16258, 0]
    """
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    exponent = bits & 0x7F800000
    rounded = np.where(exponent == 0, (bits >> 16) & 0x8000, rounded)                           # denormal: zero
    rounded = np.where((exponent == 0x7F800000) & (bits & 0x7FFFFF != 0), (bits >> 16) | 0x40, rounded)  # NaN
    return rounded.astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 ``bits`` (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_bf16(weight: np.ndarray) -> np.ndarray:
    """The bfloat16 panels ``(P, ceil(in/2), 64, 2)`` (uint16 bits) of a float ``(out, in)`` matrix, zero padded.

    >>> pack_bf16(np.array([[1.0, 2.0, 3.0]], np.float32)).shape
    (1, 2, 64, 2)
    """
    bits = to_bf16(np.asarray(weight, np.float32))
    rows, cols = bits.shape
    count, pairs = -(-rows // PANEL), -(-cols // PAIR)
    padded = np.zeros((count * PANEL, pairs * PAIR), np.uint16)
    padded[:rows, :cols] = bits
    return aligned(padded.reshape(count, PANEL, pairs, PAIR).transpose(0, 2, 1, 3))


def unpack_bf16(panels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The float32 ``(rows, cols)`` matrix that ``pack_bf16`` panels hold (the weights the products use)."""
    count, pairs = panels.shape[0], panels.shape[1]
    padded = from_bf16(panels.transpose(0, 2, 1, 3).reshape(count * PANEL, pairs * PAIR))
    return np.ascontiguousarray(padded[:rows, :cols])


@njit(inline="always", **JIT)
def _round_input(x, bits):
    """Round ``x`` to bfloat16 into ``bits`` (uint16, even length, padding zero): the rounding of ``to_bf16``."""
    n = x.shape[0]
    for i in range(n):
        u = np.int64(np.float32(x[i]).view(np.uint32))
        exponent = u & 0x7F800000
        if exponent == 0:
            bits[i] = np.uint16((u >> 16) & 0x8000)
        elif exponent == 0x7F800000 and (u & 0x7FFFFF) != 0:
            bits[i] = np.uint16((u >> 16) | 0x40)
        else:
            bits[i] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    for i in range(n, bits.shape[0]):
        bits[i] = 0


# --- the BF16 panel block ---------------------------------------------------------------------------------------
_dp_1 = panel_dot_block(1, _DPBF16PS, _F32x16, _OPERAND)      # one step (the recurrent product)
_dp_4 = panel_dot_block(4, _DPBF16PS, _F32x16, _OPERAND)      # four steps of a sequence: 16 accumulators


@njit(inline="always", **EXACT)
def _flush(value):
    return np.float32(0.0) * value if abs(value) < _SMALLEST else value     # keeps the sign, as FTZ does


@njit(**EXACT)
def _portable_panel(panels, b, xbits, pairs, acc):
    """The same block without AVX-512 BF16: ``acc[r]`` for one step, in the instruction's order and rounding."""
    widened = panels[b].astype(np.uint32) << np.uint32(16)                  # (pairs, 64, 2): the weights' float32 bits
    weights = widened.view(np.float32)
    inputs = (xbits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    for r in range(PANEL):
        acc[r] = 0.0
    for q in range(pairs):
        high, low = inputs[PAIR * q + 1], inputs[PAIR * q]
        for r in range(PANEL):
            total = _flush(acc[r] + _flush(weights[q, r, 1] * high))
            acc[r] = _flush(total + _flush(weights[q, r, 0] * low))


def _make_gemv(native: bool):
    @njit(**JIT)
    def gemv(panels, x, out, flip):
        """``out += W @ x`` for ``pack_bf16(W)``; ``flip`` walks the panels backwards."""
        count, pairs = panels.shape[0], panels.shape[1]
        if x.shape[0] > pairs * PAIR or out.shape[0] > count * PANEL:
            raise ValueError("bf16 gemv: x or out does not match the matrix")
        words = np.empty(pairs, np.uint32)              # the input as 32-bit words: two bfloat16 each
        xbits = words.view(np.uint16)
        _round_input(x, xbits)
        acc = np.empty(PANEL, np.float32)
        m = out.shape[0]
        for index in range(count):
            b = count - 1 - index if flip else index
            if native:
                _dp_1(panels.ctypes.data + b * pairs * PANEL * PAIR * 2, words.ctypes.data, 0, pairs, acc.ctypes.data)
            else:
                _portable_panel(panels, b, xbits, pairs, acc)
            start = b * PANEL
            for r in range(min(PANEL, m - start)):
                out[start + r] += acc[r]
    return gemv


def _make_gemm(native: bool, gemv):
    @njit(**JIT)
    def gemm(panels, xs, out):
        """``out += xs @ W.T`` for ``pack_bf16(W)``, ``xs`` (T, in): every step rounded on its own (so ``run``
        equals stepping), four steps per block, each weight vector loaded once a block."""
        count, pairs = panels.shape[0], panels.shape[1]
        steps, m = xs.shape[0], out.shape[1]
        if xs.shape[1] > pairs * PAIR or m > count * PANEL or out.shape[0] != steps:
            raise ValueError("bf16 gemm: xs or out does not match the matrix")
        if not native:
            for t in range(steps):
                gemv(panels, xs[t], out[t], False)
            return
        xbits = np.empty((steps, pairs * PAIR), np.uint16)
        for t in range(steps):
            _round_input(xs[t], xbits[t])
        acc = np.empty((4, PANEL), np.float32)
        for b in range(count):
            start = b * PANEL
            width = min(PANEL, m - start)
            w = panels.ctypes.data + b * pairs * PANEL * PAIR * 2
            for t in range(0, steps, 4):
                block = min(4, steps - t)
                if block == 4:
                    _dp_4(w, xbits[t:].ctypes.data, pairs, pairs, acc.ctypes.data)
                else:
                    for i in range(block):
                        _dp_1(w, xbits[t + i:].ctypes.data, 0, pairs, acc[i:].ctypes.data)
                for i in range(block):
                    for r in range(width):
                        out[t + i, start + r] += acc[i, r]
    return gemm


bf16_gemv = _make_gemv(BF16)
bf16_gemm = _make_gemm(BF16, bf16_gemv)
portable_gemv = _make_gemv(False) if BF16 else bf16_gemv            # the exact fallback, for tests on any CPU
portable_gemm = _make_gemm(False, portable_gemv) if BF16 else bf16_gemm


# --- ops of the forms -------------------------------------------------------------------------------------------
@njit(**JIT)
def bf16_matvec(arrays, x, out, flip):
    bf16_gemv(arrays[0], x, out, flip)


@njit(**JIT)
def bf16_matmat(arrays, xs, out):
    bf16_gemm(arrays[0], xs, out)


@njit(**JIT)
def affine(weight, bias, xs):
    """``xs @ W.T + bias`` for a (T, in) batch and ``weight = (pack_bf16(W),)``: an ``nn.Linear`` head in bf16."""
    out = np.empty((xs.shape[0], bias.shape[0]), np.float32)
    for t in range(xs.shape[0]):
        out[t] = bias
    bf16_gemm(weight[0], xs, out)
    return out


def bf16_dense_op(weight: np.ndarray) -> RuntimeOp:
    """The bfloat16 op of a dense ``(out, in)`` matrix.

    >>> w = np.array([[1.0, -2.0], [0.5, 0.25]], np.float32); out = np.zeros(2, np.float32)
    >>> op = bf16_dense_op(w); op.matvec(op.arrays, np.array([1.0, 1.0], np.float32), out, False)
    >>> out.tolist()
    [-1.0, 0.75]
    """
    return RuntimeOp((pack_bf16(weight),), bf16_matvec, bf16_matmat)


@njit(**JIT)
def bf16_lowrank_matvec(arrays, x, out, flip):
    left, right = arrays                                    # panels of U (out, r) and V (r, in)
    thin = np.zeros(left.shape[1] * PAIR, np.float32)       # the rank, padded to even (padding stays zero)
    bf16_gemv(right, x, thin, flip)
    bf16_gemv(left, thin, out, flip)


@njit(**JIT)
def bf16_lowrank_matmat(arrays, xs, out):
    left, right = arrays
    thin = np.zeros((xs.shape[0], left.shape[1] * PAIR), np.float32)
    bf16_gemm(right, xs, thin)
    bf16_gemm(left, thin, out)


def bf16_lowrank_op(left: np.ndarray, right: np.ndarray) -> RuntimeOp:
    """The bfloat16 op of ``left @ right``: two products through the rank (the thin vector is rounded again)."""
    return RuntimeOp((pack_bf16(left), pack_bf16(right)), bf16_lowrank_matvec, bf16_lowrank_matmat)


_warned = False


def _check_cpu() -> None:
    """Say once per process when bfloat16 runs without AVX-512 BF16: exact, but slower than float32."""
    global _warned
    if not BF16 and not _warned:
        _warned = True
        log.warning("this CPU has no AVX-512 BF16: bfloat16 products run in portable loops, exact but several times "
                    "slower than float32 here; use precision='float32'")


class BF16Table:
    """An embedding table stored as bfloat16 (rounded to nearest even): rows looked up exactly as stored."""

    def __init__(self, table: np.ndarray) -> None:
        self.bits = to_bf16(table)
        self.nbytes = self.bits.nbytes

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return from_bf16(self.bits[ids])


@register_embedding("bfloat16")
def _embedding(table: np.ndarray) -> BF16Table:
    return BF16Table(table)


@register_head("bfloat16")
def _head(weight: np.ndarray):
    _check_cpu()
    return (pack_bf16(weight),), affine


@register_op("bfloat16", Dense)
def _dense(form: Dense) -> RuntimeOp:
    _check_cpu()
    return bf16_dense_op(form.weight.detach().cpu().float().numpy())


@register_op("bfloat16", LowRank)
def _lowrank(form: LowRank) -> RuntimeOp:
    return bf16_lowrank_op(form.left.detach().cpu().float().numpy(), form.right.detach().cpu().float().numpy())


__all__ = ["BF16", "affine", "bf16_dense_op", "bf16_gemm", "bf16_gemv", "bf16_lowrank_op", "from_bf16", "pack_bf16",
           "portable_gemm", "portable_gemv", "to_bf16", "unpack_bf16"]
