"""Numba kernels of AntMan's group forms (``antman.GroupDense``, ``antman.GroupLowRank``) for ``leanlstm.runtime``.

A group stage multiplies each contiguous input slice by its own block, one panel product of the runtime
(``kernels.panel_gemv`` / ``panel_gemm``) per group, into group-contiguous outputs. The channel shuffle then
moves element ``j`` of group ``b`` to position ``j * g + b`` (``GroupDense``'s output rows). A group low-rank
product is two stages with the shuffle between them. Kept outside ``leanlstm/runtime`` (another owner's package), built only from its public
panel products; imported only when a form's ``runtime_op()`` is called.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...runtime.kernels import JIT, RuntimeOp, pack_panels, panel_gemm, panel_gemv


def pack_groups(blocks: np.ndarray) -> np.ndarray:
    """``blocks`` (g, out/g, in/g) as one (g, panels, in/g, 64) array of ``pack_panels`` per block."""
    return np.ascontiguousarray(np.stack([pack_panels(block) for block in np.asarray(blocks, np.float32)]))


@njit(**JIT)
def _stage_vec(panels, x, y, flip):
    """``y += blockdiag(blocks) @ x`` for one step; ``y`` group-contiguous (g * out/g,)."""
    g, width = panels.shape[0], panels.shape[2]
    rows = y.shape[0] // g
    for index in range(g):
        k = g - 1 - index if flip else index
        panel_gemv(panels[k], x[k * width:(k + 1) * width], y[k * rows:(k + 1) * rows], flip)


@njit(**JIT)
def _stage_mat(panels, xs, ys):
    """``ys += xs @ blockdiag(blocks).T`` for a sequence, ``xs`` (T, in), ``ys`` (T, out) group-contiguous."""
    g, width = panels.shape[0], panels.shape[2]
    rows = ys.shape[1] // g
    for k in range(g):
        panel_gemm(panels[k], xs[:, k * width:(k + 1) * width], ys[:, k * rows:(k + 1) * rows])


@njit(**JIT)
def _shuffle_add(y, g, out):
    """``out[j * g + b] += y[b * n + j]`` (the channel shuffle), ``y`` and ``out`` (g * n,)."""
    n = y.shape[0] // g
    for b in range(g):
        for j in range(n):
            out[j * g + b] += y[b * n + j]


@njit(**JIT)
def _shuffle_add_rows(ys, g, out):
    """The channel shuffle of every row: ``out[t, j * g + b] += ys[t, b * n + j]``."""
    n = ys.shape[1] // g
    for t in range(ys.shape[0]):
        for b in range(g):
            for j in range(n):
                out[t, j * g + b] += ys[t, b * n + j]


# --- group: one stage, shuffled output rows -----------------------------------------------------------------
@njit(**JIT)
def group_matvec(arrays, x, out, flip):
    panels, shuffle = arrays[0], arrays[1][0]
    if shuffle:
        y = np.zeros(out.shape[0], np.float32)
        _stage_vec(panels, x, y, flip)
        _shuffle_add(y, panels.shape[0], out)
    else:
        _stage_vec(panels, x, out, flip)


@njit(**JIT)
def group_matmat(arrays, xs, out):
    panels, shuffle = arrays[0], arrays[1][0]
    if shuffle:
        ys = np.zeros(out.shape, np.float32)
        _stage_mat(panels, xs, ys)
        _shuffle_add_rows(ys, panels.shape[0], out)
    else:
        _stage_mat(panels, xs, out)


def group_op(blocks: np.ndarray, shuffle: bool) -> RuntimeOp:
    """The op of ``GroupDense``: ``blocks`` (g, out/g, in/g), output rows shuffled when ``shuffle``.

    >>> op = group_op(np.ones((2, 1, 1), np.float32), shuffle=False); out = np.zeros(2, np.float32)
    >>> op.matvec(op.arrays, np.array([1.0, 2.0], np.float32), out, False); out.tolist()
    [1.0, 2.0]
    """
    return RuntimeOp((pack_groups(blocks), np.array([int(shuffle)], np.int64)), group_matvec, group_matmat)


# --- group low rank: V stage, shuffle, U stage -----------------------------------------------------------------
@njit(**JIT)
def group_lowrank_matvec(arrays, x, out, flip):
    right, left, shuffle = arrays[0], arrays[1], arrays[2][0]
    g, rank = right.shape[0], left.shape[2] * right.shape[0]
    z = np.zeros(2 * rank if shuffle else rank, np.float32)     # V_a x_a, group-contiguous (and shuffled)
    _stage_vec(right, x, z[:rank], flip)
    if shuffle:                                                  # U_b reads a share of every V_a
        _shuffle_add(z[:rank], g, z[rank:])
        _stage_vec(left, z[rank:], out, flip)
    else:
        _stage_vec(left, z, out, flip)


@njit(**JIT)
def group_lowrank_matmat(arrays, xs, out):
    right, left, shuffle = arrays[0], arrays[1], arrays[2][0]
    g, steps = right.shape[0], xs.shape[0]
    z = np.zeros((steps, left.shape[2] * g), np.float32)         # (T, rank)
    _stage_mat(right, xs, z)
    if shuffle:
        mixed = np.zeros(z.shape, np.float32)
        _shuffle_add_rows(z, g, mixed)
        _stage_mat(left, mixed, out)
    else:
        _stage_mat(left, z, out)


def group_lowrank_op(left: np.ndarray, right: np.ndarray, shuffle: bool) -> RuntimeOp:
    """The op of ``GroupLowRank``: ``left`` (g, out/g, rank/g) blocks of ``U``, ``right`` (g, rank/g, in/g) of ``V``."""
    return RuntimeOp((pack_groups(right), pack_groups(left), np.array([int(shuffle)], np.int64)),
                     group_lowrank_matvec, group_lowrank_matmat)
