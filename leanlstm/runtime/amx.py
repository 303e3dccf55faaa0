"""Intel AMX tiles for the int8 products over a whole sequence (``runtime.int8.int8_gemm``) on CPUs that have them.

A ``tdpbusd`` multiplies a tile of 16 steps x 64 input bytes (unsigned: the quantised inputs) by a tile of 16
groups of four inputs x 16 output rows (signed: the weights) into a tile of 16 x 16 int32 sums: 16,384
multiply-adds an instruction, against 64 for VNNI's ``vpdpbusd``. The weight tile is read straight from the int8
panels (``runtime.int8.pack_int8``): one panel's 64 rows for a group of four inputs are four 64-byte vectors, 256
bytes apart from the next group's, which is exactly the row layout the tile load takes with a stride of 256. So one
packing serves VNNI (one step at a time) and AMX (16 steps at a time), and the integer sums are the same: the int8
engine gives bit-identical outputs either way.

Tiles (palette 1): 0-3 hold the sums of one panel (16 steps x 64 rows), 4 the inputs' 64 bytes of 16 groups, 5 the
weights of those 16 groups for 16 rows, 6 and 7 the same for the last ``quads % 16`` groups. The configuration is
loaded once per product (``configure``; ``ldtilecfg`` is slow), so every block has 16 rows: a sequence's last,
partial block multiplies rows of zeros too, which costs little against the tile loads (the same for 3 rows or 16).

Linux hands a process the AMX register state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); it is asked
for when this module is imported on a CPU with AMX, and ``AMX`` is False (the VNNI products run) when it is refused.
"""
from __future__ import annotations

import ctypes
import logging
import sys

import numpy as np
from llvmlite import binding, ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels import JIT

log = logging.getLogger(__name__)

STEPS = 16                      # steps (tile rows) per block
GROUPS = 16                     # groups of four inputs per tile (64 bytes a row)
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def _request() -> bool:
    """Whether this process may run AMX instructions: the CPU has the int8 tiles and Linux granted the state."""
    features = binding.get_host_cpu_features()
    if not (features.get("amx-tile") and features.get("amx-int8")) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        granted = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                               ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
    except (OSError, AttributeError):
        granted = False
    if not granted:
        log.info("the CPU has AMX but the kernel refused its state (arch_prctl): int8 sequence products use VNNI")
    return granted


AMX = _request()

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_P = _I8.as_pointer()
_VOID = ir.VoidType()


def _function(builder, name: str, arguments: list) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VOID, arguments), name)


@intrinsic
def panel_block(typingctx, x, x_stride, w, quads, acc):
    """``acc[s, 0:64] = sum_g dot(x[s, 4g:4g+4], w[g, 0:64])`` for 16 steps ``s``, on raw addresses, with the tiles
    configured for ``quads`` (``configure(tile_config(quads))``): ``x`` unsigned bytes (rows ``x_stride`` bytes
    apart, ``4 quads`` of them), ``w`` one int8 panel (``quads`` groups of 256 bytes), ``acc`` int32 rows of 64 (256
    bytes apart)."""
    signature = types.void(*([types.intp] * 5))

    def codegen(context, builder, signature, args):
        x, x_stride, w, quads, acc = args
        load = _function(builder, "llvm.x86.tileloadd64", [_I8, _P, _I64])
        dot = _function(builder, "llvm.x86.tdpbusd", [_I8, _I8, _I8])
        for v in range(4):
            builder.call(_function(builder, "llvm.x86.tilezero", [_I8]), [_I8(v)])

        def chunk(index, x_tile: int, w_tile: int) -> None:
            """Tiles ``x_tile`` and ``w_tile`` for groups from ``16 index`` on; one product per 16 rows."""
            builder.call(load, [_I8(x_tile), builder.inttoptr(builder.add(x, builder.mul(index, _I64(64))), _P),
                                x_stride])
            base = builder.add(w, builder.mul(index, _I64(GROUPS * 256)))
            for v in range(4):
                builder.call(load, [_I8(w_tile), builder.inttoptr(builder.add(base, _I64(64 * v)), _P), _I64(256)])
                builder.call(dot, [_I8(v), _I8(x_tile), _I8(w_tile)])

        full = builder.udiv(quads, _I64(GROUPS))
        with cgutils.for_range(builder, full) as loop:
            chunk(loop.index, 4, 5)
        with builder.if_then(builder.icmp_unsigned("!=", builder.urem(quads, _I64(GROUPS)), _I64(0))):
            chunk(full, 6, 7)
        store = _function(builder, "llvm.x86.tilestored64", [_I8, _P, _I64])
        for v in range(4):
            builder.call(store, [_I8(v), builder.inttoptr(builder.add(acc, _I64(64 * v)), _P), _I64(256)])
        return context.get_dummy_value()
    return signature, codegen


@intrinsic
def configure(typingctx, config):
    """``ldtilecfg``: load the 64-byte tile configuration at address ``config`` (``tile_config``)."""
    def codegen(context, builder, signature, args):
        builder.call(_function(builder, "llvm.x86.ldtilecfg", [_P]), [builder.inttoptr(args[0], _P)])
        return context.get_dummy_value()
    return types.void(types.intp), codegen


@intrinsic
def release(typingctx):
    """``tilerelease``: hand the tile state back (the next context switch then saves none)."""
    def codegen(context, builder, signature, args):
        builder.call(_function(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(**JIT)
def tile_config(quads):
    """The 64-byte tile configuration (palette 1) of ``panel_block`` for ``quads`` groups of inputs.

    >>> c = tile_config(163)
    >>> int(c[0]), [int(c[16 + 2 * t]) for t in range(8)], [int(r) for r in c[48:56]]
    (1, [64, 64, 64, 64, 64, 64, 12, 64], [16, 16, 16, 16, 16, 16, 16, 3])
    """
    config = np.zeros(64, np.uint8)
    config[0] = 1
    rest = quads % GROUPS
    for tile in range(8):
        width, rows = 64, STEPS                   # sums (0-3) and inputs (4, 6): one row a step
        if tile == 5:
            rows = GROUPS
        elif tile == 6 and rest:
            width = 4 * rest
        elif tile == 7:
            rows = rest if rest else GROUPS
        config[16 + 2 * tile] = width
        config[48 + tile] = rows
    return config
