"""Masked-sparse weights: a dense parameter times a fixed 0/1 mask, stored as CSR at inference."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import FLOAT_BYTES, WeightForm, uniform_


def magnitude_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``round(density * numel)`` largest-magnitude entries of ``weight``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    keep = round(density * weight.numel())
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        mask[weight.detach().abs().reshape(-1).topk(keep).indices] = True
    return mask.reshape(weight.shape)


def csr_nbytes(rows: int, cols: int, nnz: int) -> int:
    """Bytes of a float32 CSR matrix: values, column indices (int16 where they fit) and row pointers."""
    index_bytes = 2 if cols <= 2**16 else 4
    return nnz * (FLOAT_BYTES + index_bytes) + (rows + 1) * 4


class MaskedSparse(WeightForm):
    """``W = weight * mask``; the zeros are structural and cost nothing at inference.

    >>> w = MaskedSparse.from_dense(torch.arange(4.0).reshape(2, 2), density=0.5)
    >>> w.materialize().tolist(), w.nnz()
    ([[0.0, 0.0], [2.0, 3.0]], 2)
    """

    name = "sparse"

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))

    def materialize(self) -> torch.Tensor:
        return self.weight * self.mask

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        sparse = self.materialize().detach().to_sparse_csr()
        flat = x.reshape(-1, self.in_features)
        return (sparse @ flat.T).T.reshape(*x.shape[:-1], self.out_features)

    def nnz(self) -> int:
        return int(self.mask.sum())

    def density(self) -> float:
        return self.nnz() / self.mask.numel()

    def nbytes(self) -> int:
        return csr_nbytes(self.out_features, self.in_features, self.nnz())

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (same shape); masked-out weights are zeroed so they stay exactly zero."""
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(self.mask.shape)}")
        with torch.no_grad():
            self.mask.copy_(mask.to(torch.bool))
            self.weight.mul_(self.mask)

    def prune_to(self, density: float) -> None:
        """Keep the largest-magnitude entries of the current (masked) matrix at ``density``."""
        self.set_mask(magnitude_mask(self.materialize(), density))

    def reset_parameters(self, init_range: float) -> None:
        # Keep the entries' spread of a dense init; the mask removes entries, not scale.
        uniform_(self.weight, init_range**2 / 3)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, density: float = 1.0) -> "MaskedSparse":
        form = cls(*weight.shape)
        with torch.no_grad():
            form.weight.copy_(weight)
        form.set_mask(magnitude_mask(weight, density))
        return form

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density():.4f}" if math.prod(self.shape) else ""
