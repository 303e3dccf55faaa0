"""Hybrid matrix decomposition (HMD, Thakker et al. 2019): the first rows dense, the remaining rows low-rank.

::

    W = [ T ]   full_rows x in      (dense)
        [ U V ] (out - full_rows) x in, U: (out - full_rows, rank), V: (rank, in)

The two parts are the existing ``Dense`` and ``LowRank`` forms, so every product (PyTorch, ONNX, runtime)
is theirs, stacked by rows.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import WeightForm
from .dense import Dense
from .lowrank import LowRank


class Hybrid(WeightForm):
    """Rows ``[0, full_rows)`` dense (``self.top``), rows ``[full_rows, out)`` of rank ``rank`` (``self.rest``).

    >>> w = Hybrid.from_dense(torch.randn(10, 6), full_rows=4, rank=2)
    >>> w.stored_params() == 4 * 6 + 2 * (6 + 6)
    True
    """

    name = "hybrid"

    def __init__(self, out_features: int, in_features: int, full_rows: int, rank: int) -> None:
        super().__init__(out_features, in_features)
        if not 1 <= full_rows < out_features:
            raise ValueError(f"full_rows must lie in [1, {out_features - 1}] for a {out_features}x{in_features} "
                             f"matrix, got {full_rows}; use Dense or LowRank for all rows of one kind")
        self.full_rows, self.rank = int(full_rows), int(rank)
        self.top = Dense(self.full_rows, in_features)
        self.rest = LowRank(out_features - self.full_rows, in_features, rank=self.rank)

    def materialize(self) -> torch.Tensor:
        return torch.cat([self.top.materialize(), self.rest.materialize()], 0)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.top.matvec(x), self.rest.matvec(x)], -1)

    def nbytes(self) -> int:
        return self.top.nbytes() + self.rest.nbytes()

    def onnx_matvec(self, graph, x: str) -> str:
        with graph.scope("top"):
            top = self.top.onnx_matvec(graph, x)                                   # (N, full_rows)
        with graph.scope("rest"):
            rest = self.rest.onnx_matvec(graph, x)                                 # (N, out - full_rows)
        return graph.node("Concat", [top, rest], axis=1)

    def runtime_op(self):
        from ...runtime.structured_ops import row_stack_op  # Numba loads only when the runtime is used
        return row_stack_op(self.top.runtime_op(), self.rest.runtime_op(), self.full_rows)

    def options(self) -> dict[str, Any]:
        return {"full_rows": self.full_rows, "rank": self.rank}

    def reset_parameters(self, init_range: float) -> None:
        self.top.reset_parameters(init_range)
        self.rest.reset_parameters(init_range)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, full_rows: int, rank: int) -> "Hybrid":
        """The top rows copied; the rest by truncated SVD (the Frobenius-nearest rank-``rank`` matrix)."""
        form = cls(*weight.shape, full_rows=full_rows, rank=rank)
        form.top = Dense.from_dense(weight[:full_rows])
        form.rest = LowRank.from_dense(weight[full_rows:], rank=rank)
        return form
