"""Block-circulant weights (C-LSTM, Wang et al. 2018): ``W`` tiled into ``b x b`` circulant blocks.

A circulant block is fixed by one vector ``c`` (its first column): ``C[i, j] = c[(i - j) mod b]``, so
``C x`` is the circular convolution ``c * x`` and costs ``O(b log b)`` through the FFT. The ``(out, in)``
matrix is covered by ``ceil(out/b) x ceil(in/b)`` blocks; for sizes that are not multiples of ``b`` the
input is zero-padded and the output cropped, as for Kronecker factors. ``from_dense`` fits each block by
the Frobenius-nearest circulant: the mean of each wrapped diagonal (over the entries inside the matrix).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import WeightForm, uniform_


def circulant_index(block_size: int) -> torch.Tensor:
    """``(b, b)`` indices ``(i - j) mod b``: ``c[circulant_index(b)]`` is the circulant block of ``c``.

    >>> circulant_index(3).tolist()
    [[0, 2, 1], [1, 0, 2], [2, 1, 0]]
    """
    steps = torch.arange(block_size)
    return (steps[:, None] - steps[None, :]) % block_size


class BlockCirculant(WeightForm):
    """``W`` tiled into circulant ``block_size``-square blocks; ``vectors[p, q]`` is block (p, q)'s first column.

    >>> w = BlockCirculant.from_dense(torch.eye(4), block_size=2)
    >>> w.materialize().tolist() == torch.eye(4).tolist(), w.stored_params()
    (True, 8)
    """

    name = "circulant"

    def __init__(self, out_features: int, in_features: int, block_size: int) -> None:
        super().__init__(out_features, in_features)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = int(block_size)
        self.grid = (math.ceil(out_features / block_size), math.ceil(in_features / block_size))  # (P, Q)
        self.vectors = nn.Parameter(torch.empty(*self.grid, self.block_size))                  # (P, Q, b)
        self.register_buffer("index", circulant_index(self.block_size), persistent=False)

    def materialize(self) -> torch.Tensor:
        (rows, cols), b = self.grid, self.block_size
        blocks = self.vectors[:, :, self.index]                                # (P, Q, b, b)
        full = blocks.permute(0, 2, 1, 3).reshape(rows * b, cols * b)
        return full[: self.out_features, : self.in_features]

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        (rows, cols), b = self.grid, self.block_size
        padded = nn.functional.pad(x, (0, cols * b - self.in_features))
        x_freq = torch.fft.rfft(padded.reshape(*x.shape[:-1], cols, b), dim=-1)   # (..., Q, b//2+1)
        c_freq = torch.fft.rfft(self.vectors, dim=-1)                              # (P, Q, b//2+1)
        y = torch.fft.irfft(torch.einsum("...qk,pqk->...pk", x_freq, c_freq), n=b, dim=-1)  # (..., P, b)
        return y.reshape(*x.shape[:-1], rows * b)[..., : self.out_features]

    def nbytes(self) -> int:
        return self.values_nbytes(self.vectors)

    def onnx_matvec(self, graph, x: str) -> str:
        # y_p[i] = sum_{q,k} c_pq[k] x_q[(i - k) mod b]: gather the shifted inputs, then one MatMul against
        # the stored vectors. Stores only the vectors; the products cost what a dense one does.
        (rows, cols), b = self.grid, self.block_size
        if cols * b > self.in_features:
            x = graph.node("Pad", [x, graph.ints([0, 0, 0, cols * b - self.in_features], "pads")])
        blocks = graph.node("Reshape", [x, graph.ints([-1, cols, b], "blocks_shape")])         # (N, Q, b)
        shifts = graph.weight("shifts", self.index, "int64")                                   # (i - k) mod b
        shifted = graph.node("Gather", [blocks, shifts], axis=2)                               # (N, Q, b, b)
        shifted = graph.node("Transpose", [shifted], perm=[0, 2, 1, 3])                        # (N, b, Q, b)
        shifted = graph.node("Reshape", [shifted, graph.ints([0, b, cols * b], "shifted_shape")])  # (N, b, Q*b)
        vectors_t = graph.weight("vectors_t", self.vectors.reshape(rows, cols * b).T)          # (Q*b, P)
        y = graph.node("Transpose", [graph.node("MatMul", [shifted, vectors_t])], perm=[0, 2, 1])  # (N, P, b)
        y = graph.node("Reshape", [y, graph.ints([-1, rows * b], "out_shape")])                # (N, P*b)
        if rows * b > self.out_features:
            y = graph.node("Slice", [y, graph.ints([0]), graph.ints([self.out_features]), graph.ints([1])])
        return y

    def runtime_op(self):
        from ...runtime.kernels import circulant_op  # Numba loads only when the runtime is used
        return circulant_op(self.vectors.detach().cpu().numpy(), self.out_features, self.in_features)

    def options(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def reset_parameters(self, init_range: float) -> None:
        uniform_(self.vectors, init_range**2 / 3)  # every entry of W is an entry of some vector

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size: int) -> "BlockCirculant":
        """Each block's vector is the mean of its wrapped diagonals over the entries inside the matrix."""
        form = cls(*weight.shape, block_size=block_size)
        (rows, cols), b = form.grid, form.block_size
        values = torch.zeros(rows * b, cols * b, dtype=torch.float64)
        inside = torch.zeros(rows * b, cols * b, dtype=torch.float64)
        values[: weight.shape[0], : weight.shape[1]] = weight.detach()
        inside[: weight.shape[0], : weight.shape[1]] = 1.0

        def per_diagonal(grid: torch.Tensor) -> torch.Tensor:                    # (P*b, Q*b) -> (P, Q, b)
            blocks = grid.reshape(rows, b, cols, b).permute(0, 2, 1, 3).reshape(rows, cols, b * b)
            index = form.index.reshape(1, 1, -1).expand(rows, cols, -1)
            return torch.zeros(rows, cols, b, dtype=grid.dtype).scatter_add_(2, index, blocks)

        with torch.no_grad():
            form.vectors.copy_(per_diagonal(values) / per_diagonal(inside).clamp(min=1))
        return form
