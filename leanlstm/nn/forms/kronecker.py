"""Kronecker-product weights: ``W = (A kron B)[:out, :in]``.

Any matrix shape works: when ``out`` or ``in`` does not factor well (a prime, say), the factors cover a
slightly larger grid and the product is cropped. Multiplying uses the reshape identity
``(A kron B) vec(X) = vec(A X B^T)`` (row-major ``vec``), so it never forms the large matrix.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import WeightForm, uniform_


def balanced_split(size: int, max_padding: float = 0.05) -> tuple[int, int]:
    """Two near-equal factors ``a <= b`` with ``a * b >= size``.

    Exact factorisations with ``b / a <= 2`` win; otherwise (a prime, say) the most square pair that pads
    ``size`` by at most ``max_padding``. Square-ish factors keep the Kronecker product expressive: a split
    like ``(2, 1300)`` would make ``A kron B`` little more than an outer product.
    """
    exact = [(a, size // a) for a in range(1, math.isqrt(size) + 1) if size % a == 0]
    a, b = exact[-1]
    if b <= 2 * a:
        return a, b
    padded = [(a, -(-size // a)) for a in range(1, math.isqrt(size) + 2)]
    padded = [(a, b) for a, b in padded if a * b <= size * (1 + max_padding)]
    return min(padded, key=lambda ab: abs(math.log(ab[1] / ab[0])) + 100 * (ab[0] * ab[1] - size) / size)


def kron_factor_shapes(out_features: int, in_features: int, max_padding: float = 0.05
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Factor shapes ``((m1, n1), (m2, n2))`` with ``m1*m2 >= out_features`` and ``n1*n2 >= in_features``.

    Each dimension is split into near-equal factors, which also comes close to the fewest parameters
    ``m1*n1 + m2*n2`` (about ``2 * sqrt(out_features * in_features)``).

    >>> kron_factor_shapes(2600, 650)
    ((50, 25), (52, 26))
    """
    m1, m2 = balanced_split(out_features, max_padding)
    n1, n2 = balanced_split(in_features, max_padding)
    return (m1, n1), (m2, n2)


class Kronecker(WeightForm):
    """``W = (A kron B)`` cropped to ``(out_features, in_features)``; ``A`` is ``(m1, n1)``, ``B`` is ``(m2, n2)``."""

    name = "kronecker"

    def __init__(self, out_features: int, in_features: int,
                 factor_shapes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> None:
        super().__init__(out_features, in_features)
        if factor_shapes is None:
            factor_shapes = kron_factor_shapes(out_features, in_features)
        (m1, n1), (m2, n2) = (tuple(int(v) for v in s) for s in factor_shapes)
        if m1 * m2 < out_features or n1 * n2 < in_features:
            raise ValueError(f"factor shapes {factor_shapes} do not cover a {out_features}x{in_features} matrix")
        self.factor_shapes = ((m1, n1), (m2, n2))
        self.a = nn.Parameter(torch.empty(m1, n1))
        self.b = nn.Parameter(torch.empty(m2, n2))

    def materialize(self) -> torch.Tensor:
        return torch.kron(self.a, self.b)[: self.out_features, : self.in_features]

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        (m1, n1), (m2, n2) = self.factor_shapes
        padded = nn.functional.pad(x, (0, n1 * n2 - self.in_features))
        grid = padded.reshape(*x.shape[:-1], n1, n2)               # X: (..., n1, n2)
        y = self.a @ grid @ self.b.T                                # A X B^T: (..., m1, m2)
        return y.reshape(*x.shape[:-1], m1 * m2)[..., : self.out_features]

    def nbytes(self) -> int:
        return self.values_nbytes(self.a) + self.values_nbytes(self.b)

    def onnx_matvec(self, graph, x: str) -> str:
        (m1, n1), (m2, n2) = self.factor_shapes
        if n1 * n2 > self.in_features:                                     # zero-pad x to the factor grid
            x = graph.node("Pad", [x, graph.ints([0, 0, 0, n1 * n2 - self.in_features], "pads")])
        grid = graph.node("Reshape", [x, graph.ints([-1, n1, n2], "grid_shape")])   # X: (N, n1, n2)
        a, b_t = graph.weight("a", self.a), graph.weight("b_t", self.b.T)
        if m1 * n1 * n2 + m1 * n2 * m2 <= n1 * n2 * m2 + m1 * n1 * m2:    # A X B^T, cheaper product first
            y = graph.node("MatMul", [graph.node("MatMul", [a, grid]), b_t])
        else:
            y = graph.node("MatMul", [a, graph.node("MatMul", [grid, b_t])])
        y = graph.node("Reshape", [y, graph.ints([-1, m1 * m2], "out_shape")])      # (N, m1*m2)
        if m1 * m2 > self.out_features:                                    # crop the padded rows
            y = graph.node("Slice", [y, graph.ints([0]), graph.ints([self.out_features]), graph.ints([1])])
        return y

    def runtime_op(self):
        from ...runtime.kernels import kron_op  # the reshape identity on the factors; crops like materialize
        return kron_op(self.a.detach().cpu().numpy(), self.b.detach().cpu().numpy(), self.out_features,
                       self.in_features)

    def options(self) -> dict:
        return {"factor_shapes": [list(s) for s in self.factor_shapes]}

    def reset_parameters(self, init_range: float) -> None:
        # Var(W_ij) = Var(A) * Var(B): give both factors the square root of the target variance.
        factor_variance = math.sqrt(init_range**2 / 3)
        uniform_(self.a, factor_variance)
        uniform_(self.b, factor_variance)

    @classmethod
    def from_dense(cls, weight: torch.Tensor,
                   factor_shapes: tuple[tuple[int, int], tuple[int, int]] | None = None) -> "Kronecker":
        """Nearest Kronecker product in Frobenius norm (Van Loan & Pitsianis rearrangement + rank-1 SVD)."""
        form = cls(*weight.shape, factor_shapes=factor_shapes)
        (m1, n1), (m2, n2) = form.factor_shapes
        padded = torch.zeros(m1 * m2, n1 * n2, dtype=torch.float64)
        padded[: weight.shape[0], : weight.shape[1]] = weight.detach()
        # R[(i1, j1), (i2, j2)] = W[i1*m2 + i2, j1*n2 + j2]
        rearranged = padded.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
        root = s[0].sqrt()
        with torch.no_grad():
            form.a.copy_((u[:, 0] * root).reshape(m1, n1))
            form.b.copy_((vh[0] * root).reshape(m2, n2))
        return form
