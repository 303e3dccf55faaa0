"""Doped weights (Thakker et al., MLSys 2021): ``W = S + D``, a structured form plus an extremely sparse matrix.

``S`` is any registered form (Kronecker, low-rank, hybrid, circulant, ...), recorded in ``options()`` so a
checkpoint rebuilds it; ``D`` is a ``MaskedSparse`` whose density a method anneals towards ~1%. Stored
bytes are honest: ``S``'s bytes plus ``D``'s CSR bytes (values, column indices, row pointers).

Co-matrix dropout regularisation (CMR). While ``D`` sparsifies, ``S`` comes to lean on it (co-matrix
adaptation) and accuracy collapses. CMR drops ``D``'s contribution at random during training, so ``S`` must
carry the function alone. Training hands one materialised matrix per forward to the fused LSTM kernel, so
the drop is drawn once per forward and shared by every time step and batch row (as variational dropout
shares its mask over time):

- ``cmr_mode="row"`` (default): each output row of ``D`` is dropped with probability ``cmr``, i.e. dropout
  on the sparse product ``D x`` with one mask entry per output, held for the whole forward (dropout drawn
  afresh per time step and batch row cannot be materialised as one matrix);
- ``cmr_mode="matrix"``: the whole of ``D`` is dropped with probability ``cmr``.

Kept parts are scaled by ``1 / (1 - cmr)`` (inverted dropout), so the expected training matrix is the eval
matrix ``S + D``. CMR acts only in ``materialize()`` under ``self.training``; in eval mode, and always in
``matvec`` (the inference product), ``W = S + D`` exactly. Draws use torch's global RNG, so they are
reproducible under ``torch.manual_seed``.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import WeightForm, form_class
from .sparse import MaskedSparse

CMR_MODES = ("row", "matrix")


class Doped(WeightForm):
    """``W = S + D``: a structured form ``S`` (``structure``) plus a masked-sparse ``D``.

    >>> w = torch.randn(12, 8)
    >>> form = Doped.from_dense(w, structure="lowrank", structure_options={"rank": 2}, density=0.25)
    >>> s_plus_d = form.structured.materialize() + form.sparse.materialize()
    >>> form.sparse.nnz(), torch.allclose(form.materialize(), s_plus_d)
    (24, True)
    """

    name = "doped"

    def __init__(self, out_features: int, in_features: int, structure: str = "kronecker",
                 structure_options: dict[str, Any] | None = None, cmr: float = 0.0,
                 cmr_mode: str = "row") -> None:
        super().__init__(out_features, in_features)
        if structure == self.name:
            raise ValueError("the structured part of a doped form cannot itself be doped")
        self.structured: WeightForm = form_class(structure)(out_features, in_features, **(structure_options or {}))
        self.sparse = MaskedSparse(out_features, in_features)
        self.cmr, self.cmr_mode = cmr, cmr_mode

    @property
    def cmr(self) -> float:
        """Probability of dropping ``D``'s contribution in a training forward (0 disables CMR)."""
        return self._cmr

    @cmr.setter
    def cmr(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"the co-matrix dropout probability must lie in [0, 1), got {value}")
        self._cmr = float(value)

    @property
    def cmr_mode(self) -> str:
        return self._cmr_mode

    @cmr_mode.setter
    def cmr_mode(self, value: str) -> None:
        if value not in CMR_MODES:
            raise ValueError(f"cmr_mode must be one of {CMR_MODES}, got {value!r}")
        self._cmr_mode = value

    @property
    def onnx_batch_over_time(self) -> bool:  # type: ignore[override]
        return self.structured.onnx_batch_over_time and self.sparse.onnx_batch_over_time

    def _sparse_scale(self) -> torch.Tensor | None:
        """The CMR factor on ``D`` for this forward: (out, 1) or (1, 1) of 0 or 1/(1-p); None when inactive."""
        if not (self.training and self.cmr > 0):
            return None
        rows = self.out_features if self.cmr_mode == "row" else 1
        weight = self.sparse.weight
        keep = torch.rand(rows, 1, device=weight.device) >= self.cmr
        return keep.to(weight.dtype) / (1.0 - self.cmr)

    def materialize(self) -> torch.Tensor:
        return self.structured.materialize() + self.sparse.materialize()

    def training_weight(self) -> torch.Tensor:
        sparse = self.sparse.materialize()
        scale = self._sparse_scale()
        return self.structured.materialize() + (sparse if scale is None else sparse * scale)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.structured.matvec(x) + self.sparse.matvec(x)

    def nbytes(self) -> int:
        return self.structured.nbytes() + self.sparse.nbytes()

    def onnx_matvec(self, graph, x: str) -> str:
        with graph.scope("structured"):
            structured = self.structured.onnx_matvec(graph, x)
        with graph.scope("sparse"):
            sparse = self.sparse.onnx_matvec(graph, x)
        return graph.node("Add", [structured, sparse])

    def runtime_op(self):
        from ...runtime.structured_ops import child_op, sum_op  # Numba loads only when the runtime is used
        return sum_op(child_op(self.structured), child_op(self.sparse))

    def options(self) -> dict[str, Any]:
        return {"structure": self.structured.name, "structure_options": self.structured.options()}

    def reset_parameters(self, init_range: float) -> None:
        # S carries the dense spread; D starts at zero (every entry free to grow) and adds nothing yet.
        self.structured.reset_parameters(init_range)
        with torch.no_grad():
            self.sparse.weight.zero_()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, structure: str = "kronecker",
                   structure_options: dict[str, Any] | None = None, density: float = 1.0,
                   cmr: float = 0.0, cmr_mode: str = "row") -> "Doped":
        """``S`` fitted to ``weight`` by its own ``from_dense``; ``D`` keeps the largest residual entries."""
        form = cls(*weight.shape, structure=structure, structure_options=structure_options, cmr=cmr,
                   cmr_mode=cmr_mode)
        form.structured = form_class(structure).from_dense(weight, **(structure_options or {}))
        residual = weight.detach().float() - form.structured.materialize().detach().float()
        form.sparse = MaskedSparse.from_dense(residual, density=density)
        return form

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cmr={self.cmr}"
