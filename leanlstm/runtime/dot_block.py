"""The register block shared by the low-precision products (``runtime.int8``, ``runtime.bf16``).

Both store a weight matrix in panels of 64 output rows whose values for one group of inputs (four int8, or two
bfloat16: 4 bytes a row) lie side by side, 256 bytes a group, and both multiply with one AVX-512 dot-product
instruction (``vpdpbusd``, ``vdpbf16ps``) that adds, into 16 lanes, the products of a 32-bit word of the input
broadcast against 16 rows' 4 bytes. Only the instruction and the lane and operand types differ.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PANEL = 64                      # output rows per panel: four vectors of 16 lanes
GROUP_BYTES = 4 * PANEL         # one input group of a panel: 4 bytes a row
_I32x16 = ir.VectorType(ir.IntType(32), 16)
_I64 = ir.IntType(64)


def panel_dot_block(rows: int, instruction: str, lanes: ir.Type, operand: ir.Type):
    """An intrinsic ``block(w, x, x_stride, groups, acc)`` on raw addresses: for ``r < rows``,
    ``acc[r, 0:64] = sum_g dot(x_word[r, g], w[g, 0:64])`` from zero, through the LLVM intrinsic ``instruction``
    (``lanes <- (lanes, operand, operand)``); ``w`` is one panel's bytes, ``x`` 32-bit input words (rows
    ``x_stride`` words apart), ``acc`` (rows, 64) of the lanes' type. Each 64-byte weight vector is loaded once
    for all ``rows`` inputs (the sequence product's reuse)."""
    @intrinsic
    def block(typingctx, w, x, x_stride, groups, acc):
        signature = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            w, x, x_stride, groups, acc = args
            w = builder.inttoptr(w, ir.IntType(8).as_pointer())
            x = builder.inttoptr(x, ir.IntType(32).as_pointer())
            acc = builder.inttoptr(acc, lanes.as_pointer())
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes, operand, operand]),
                                                 instruction)
            sums = [[cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(4)]
                    for _ in range(rows)]
            zeros = ir.Constant(_I32x16, [0] * 16)
            with cgutils.for_range(builder, groups) as loop:
                g = loop.index
                base = builder.gep(w, [builder.mul(g, _I64(GROUP_BYTES))])
                weights = [builder.bitcast(builder.load(builder.bitcast(builder.gep(base, [_I64(64 * v)]),
                                                                        _I32x16.as_pointer()), align=1), operand)
                           for v in range(4)]
                for r in range(rows):
                    word = builder.load(builder.gep(x, [builder.add(builder.mul(_I64(r), x_stride), g)]), align=2)
                    spread = builder.insert_element(ir.Constant(_I32x16, ir.Undefined), word, ir.IntType(32)(0))
                    spread = builder.bitcast(builder.shuffle_vector(spread, ir.Constant(_I32x16, ir.Undefined), zeros),
                                             operand)
                    for v in range(4):
                        total = builder.call(dot, [builder.load(sums[r][v]), spread, weights[v]])
                        builder.store(total, sums[r][v])
            for r in range(rows):
                for v in range(4):
                    builder.store(builder.load(sums[r][v]), builder.gep(acc, [_I64(4 * r + v)]), align=4)
            return context.get_dummy_value()
        return signature, codegen
    return block
