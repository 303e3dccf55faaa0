"""Low-rank weights: ``W = U @ V`` with ``U`` of shape ``(out, rank)`` and ``V`` of shape ``(rank, in)``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import WeightForm, uniform_


class LowRank(WeightForm):
    """Rank-``rank`` factorisation; ``from_dense`` keeps the top singular directions.

    >>> w = LowRank.from_dense(torch.ones(4, 3), rank=1); round(w.materialize()[0, 0].item(), 5)
    1.0
    """

    name = "lowrank"

    def __init__(self, out_features: int, in_features: int, rank: int) -> None:
        super().__init__(out_features, in_features)
        if not 1 <= rank <= min(out_features, in_features):
            raise ValueError(f"rank must lie in [1, {min(out_features, in_features)}] for a "
                             f"{out_features}x{in_features} matrix, got {rank}")
        self.rank = int(rank)
        self.left = nn.Parameter(torch.empty(out_features, rank))   # U
        self.right = nn.Parameter(torch.empty(rank, in_features))   # V

    def materialize(self) -> torch.Tensor:
        return self.left @ self.right

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.right.T) @ self.left.T  # two thin products: (.., rank) then (.., out)

    def nbytes(self) -> int:
        return self.values_nbytes(self.left) + self.values_nbytes(self.right)

    def onnx_matvec(self, graph, x: str) -> str:
        thin = graph.node("MatMul", [x, graph.weight("right_t", self.right.T)])         # (N, rank)
        return graph.node("MatMul", [thin, graph.weight("left_t", self.left.T)])        # (N, out)

    def runtime_op(self):
        from ...runtime.kernels import lowrank_op  # two thin products, as in matvec
        return lowrank_op(self.left.detach().cpu().numpy(), self.right.detach().cpu().numpy())

    def options(self) -> dict[str, int]:
        return {"rank": self.rank}

    def reset_parameters(self, init_range: float) -> None:
        # Var(W_ij) = rank * Var(U) * Var(V); split the target variance evenly between the factors.
        factor_variance = math.sqrt(init_range**2 / 3 / self.rank)
        uniform_(self.left, factor_variance)
        uniform_(self.right, factor_variance)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, rank: int) -> "LowRank":
        form = cls(*weight.shape, rank=rank)
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            form.left.copy_(u[:, :rank] * root)
            form.right.copy_(root[:, None] * vh[:rank])
        return form
