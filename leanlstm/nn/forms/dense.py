"""Dense weights: the plain matrix, as in ``torch.nn.LSTM``."""
from __future__ import annotations

import torch
from torch import nn

from .base import WeightForm, uniform_


class Dense(WeightForm):
    """A dense ``(out_features, in_features)`` matrix.

    >>> w = Dense.from_dense(torch.eye(3)); w.matvec(torch.ones(3)).tolist()
    [1.0, 1.0, 1.0]
    """

    name = "dense"

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def materialize(self) -> torch.Tensor:
        return self.weight

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def nbytes(self) -> int:
        return self.values_nbytes(self.weight)

    def onnx_matvec(self, graph, x: str) -> str:
        return graph.node("MatMul", [x, graph.weight("weight_t", self.weight.T)])   # (N, in) @ (in, out)

    def runtime_op(self):
        from ...runtime.kernels import dense_op  # Numba loads only when the runtime is used
        return dense_op(self.weight.detach().cpu().numpy())

    def reset_parameters(self, init_range: float) -> None:
        uniform_(self.weight, init_range**2 / 3)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "Dense":
        form = cls(*weight.shape)
        with torch.no_grad():
            form.weight.copy_(weight)
        return form
