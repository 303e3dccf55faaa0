"""Masked-sparse weights: a dense parameter times a fixed 0/1 mask, stored as CSR at inference.

State dicts (checkpoints) hold the same CSR arrays as inference (``csr_values``, ``csr_columns``, ``csr_rows``)
whenever they are smaller than the dense weight and its mask, so a saved model weighs what ``nbytes()`` says.
Loading takes either layout.
"""
from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch
from torch import nn

from .base import FLOAT_BYTES, SCALE_BYTES, WeightForm, uniform_


def magnitude_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``round(density * numel)`` largest-magnitude entries of ``weight``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    keep = round(density * weight.numel())
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        mask[weight.detach().abs().reshape(-1).topk(keep).indices] = True
    return mask.reshape(weight.shape)


def csr_nbytes(rows: int, cols: int, nnz: int, value_bits: int = 32) -> int:
    """Bytes of a CSR matrix: values at ``value_bits`` (int8 values add one float32 scale per row), column indices
    (uint16 where they fit) and row pointers.

    >>> csr_nbytes(2600, 650, 54599), csr_nbytes(2600, 650, 54599, value_bits=8)
    (337998, 184601)
    """
    index_bytes = 2 if cols <= 2**16 else 4
    if value_bits >= 32:
        return nnz * (FLOAT_BYTES + index_bytes) + (rows + 1) * 4
    return math.ceil(nnz * value_bits / 8) + nnz * index_bytes + (rows + 1) * 4 + rows * SCALE_BYTES


def csr_arrays(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, columns, row_pointers)`` of ``weight`` at the entries of ``mask``: float32 values, column indices
    as uint16 where they fit (else int32), int32 row pointers, as ``csr_nbytes`` counts them. Entries inside the
    mask are kept even when zero (a connection that is free to grow).

    >>> [t.tolist() for t in csr_arrays(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0, 1], [1, 1]]))]
    [[2.0, 3.0, 0.0], [1, 0, 1], [0, 1, 3]]
    """
    mask = mask.to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)                               # row-major
    pointers = torch.zeros(mask.shape[0] + 1, dtype=torch.int32)
    pointers[1:] = mask.sum(1).cumsum(0)
    index = torch.uint16 if mask.shape[1] <= 2**16 else torch.int32
    return weight.detach()[rows, cols].to(torch.float32).cpu(), cols.to(index).cpu(), pointers


def dense_from_csr(values: torch.Tensor, columns: torch.Tensor, pointers: torch.Tensor, shape: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense ``(weight, mask)`` of ``csr_arrays``' output; ValueError when the arrays do not fit ``shape``."""
    counts = pointers.to(torch.long).diff()
    if len(pointers) != shape[0] + 1 or counts.lt(0).any() or not int(counts.sum()) == len(values) == len(columns):
        raise ValueError(f"CSR arrays ({len(pointers) - 1} rows, {len(values)} values, {len(columns)} columns) do "
                         f"not describe a {shape[0]}x{shape[1]} matrix")
    cols = columns.to(torch.long)
    if len(cols) and int(cols.max()) >= shape[1]:
        raise ValueError(f"CSR column index {int(cols.max())} is out of range for {shape[1]} columns")
    rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
    weight = torch.zeros(shape, dtype=values.dtype)
    mask = torch.zeros(shape, dtype=torch.bool)
    weight[rows, cols], mask[rows, cols] = values, True
    return weight, mask


CSR_KEYS = ("csr_values", "csr_columns", "csr_rows")


def ell_slices(mask: torch.Tensor, max_slices: int = 4, slack: float = 0.1
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The rows of a 0/1 ``mask`` packed as sliced ELL: ``[(rows, cols, valid), ...]``.

    Each slice stores, for its ``R`` rows, the column indices of their entries left-aligned in an ``(R, K)``
    table padded with column 0 (``valid`` is False there), ``K`` being the slice's longest row. Rows are
    sorted by length and cut into the fewest equal slices (up to ``max_slices``) whose padding stays within
    ``slack`` of the entry count, so uneven rows do not pad every row to the longest one.

    >>> [(r.tolist(), c.tolist()) for r, c, _ in ell_slices(torch.tensor([[1, 0, 1], [0, 1, 0]]))]
    [([0], [[0, 2]]), ([1], [[1]])]
    >>> [(r.tolist(), c.tolist(), v.tolist()) for r, c, v in ell_slices(torch.tensor([[1, 1], [0, 1]]), slack=0.5)]
    [([0, 1], [[0, 1], [1, 0]], [[True, True], [True, False]])]
    """
    mask = mask.to(torch.bool)
    counts = mask.sum(1)
    order = counts.argsort(descending=True, stable=True)
    for n in range(1, max_slices + 1):
        chunks = [chunk for chunk in order.tensor_split(n) if chunk.numel()]
        padded = sum(len(chunk) * max(int(counts[chunk[0]]), 1) for chunk in chunks)
        if padded <= (1 + slack) * int(counts.sum()):
            break
    if len(chunks) == 1:
        chunks = [torch.arange(mask.shape[0])]
    slices = []
    for chunk in chunks:
        rows = chunk.sort().values
        sub = mask[rows]                                                   # (R, in)
        r, c = sub.nonzero(as_tuple=True)                                  # row-major: columns ascend per row
        position = (sub.cumsum(1) - 1)[r, c]                               # slot of each entry in its row
        width = max(int(counts[rows].max()), 1)
        cols = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        cols[r, position], valid[r, position] = c, True
        slices.append((rows, cols, valid))
    return slices


def _onnx_columns(graph, cols: torch.Tensor) -> str:
    """Column indices stored as uint16 where they fit (the bytes ``csr_nbytes`` counts), cast to int32 once in the
    main graph (ONNX Runtime folds the cast into a constant when it loads the model), never per step."""
    if cols.numel() and int(cols.max()) >= 2**16:
        return graph.weight("cols", cols, "int32")
    from onnx import TensorProto   # onnx loads only when exporting

    return graph.root.node("Cast", [graph.weight("cols", cols, "uint16")], to=TensorProto.INT32)


class MaskedSparse(WeightForm):
    """``W = weight * mask``; the zeros are structural and cost nothing at inference.

    >>> w = MaskedSparse.from_dense(torch.arange(4.0).reshape(2, 2), density=0.5)
    >>> w.materialize().tolist(), w.nnz()
    ([[0.0, 0.0], [2.0, 3.0]], 2)
    """

    name = "sparse"
    onnx_batch_over_time = False  # the gather-based product would hold a (T*B, nnz) intermediate

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))
        self.dense_grad: torch.Tensor | None = None   # see track_gradient (not a buffer: DDP would broadcast it)

    def materialize(self) -> torch.Tensor:
        return self.weight * self.mask

    def training_weight(self) -> torch.Tensor:
        weight = self.materialize()
        if self.dense_grad is not None and weight.requires_grad:
            weight.register_hook(self._add_dense_grad)
        return weight

    def track_gradient(self, on: bool = True) -> None:
        """Sum ``dL/dW`` of the forward pass's matrix into ``dense_grad`` at every backward pass, masked-out
        entries included: ``weight.grad`` is zero there (``W = weight * mask``), but ``dL/dW`` says how much a
        dormant connection would lower the loss (grow-and-prune's growth). ``on=False`` stops and drops the sum.

        >>> w = MaskedSparse.from_dense(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), density=0.5)   # keeps row 1
        >>> w.track_gradient()
        >>> (w.training_weight() * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
        >>> w.dense_grad.tolist(), w.weight.grad.tolist()
        ([[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [3.0, 4.0]])
        """
        self.dense_grad = torch.zeros_like(self.weight, requires_grad=False) if on else None

    def _add_dense_grad(self, grad: torch.Tensor) -> None:
        if self.dense_grad.device != grad.device:     # the module moved since tracking began
            self.dense_grad = self.dense_grad.to(grad.device)
        self.dense_grad.add_(grad.detach())

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # PyTorch flags CSR support as beta on every conversion
            warnings.simplefilter("ignore", UserWarning)
            sparse = self.materialize().detach().to_sparse_csr()
        flat = x.reshape(-1, self.in_features)
        return (sparse @ flat.T).T.reshape(*x.shape[:-1], self.out_features)

    def onnx_matvec(self, graph, x: str) -> str:
        # Sliced ELL: per slice, gather the inputs each row needs, weight them and sum per row;
        # the work and the stored values scale with the entries kept, never with out x in.
        weight, outputs, rows_done = self.materialize().detach().cpu(), [], []
        for rows, cols, valid in ell_slices(self.mask.cpu()):
            values = torch.where(valid, weight[rows[:, None], cols], 0.0)                  # (R, K)
            picked = graph.node("Gather", [x, _onnx_columns(graph, cols)], axis=1)          # (N, R, K)
            weighted = graph.node("Mul", [picked, graph.weight("values", values)])
            outputs.append(graph.node("ReduceSum", [weighted, graph.ints([2], "axes")], keepdims=0))  # (N, R)
            rows_done.append(rows)
        if len(outputs) == 1:
            return outputs[0]
        rows = torch.cat(rows_done)                                        # output column j is row rows[j]
        y = graph.node("Concat", outputs, axis=1)
        return graph.node("Gather", [y, graph.weight("row_order", rows.argsort(), "int32")], axis=1)

    def runtime_op(self):
        from ...runtime.kernels import sparse_op  # only the kept entries are stored and read
        return sparse_op(self.materialize().detach().cpu().numpy())

    def nnz(self) -> int:
        return int(self.mask.sum())

    def density(self) -> float:
        return self.nnz() / self.mask.numel()

    def nbytes(self) -> int:
        return csr_nbytes(self.out_features, self.in_features, self.nnz(), self.value_bits)

    def value_tensors(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        return [(self.weight, self.mask)]              # only the kept entries are stored (and set a row's scale)

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

    # --- state dicts: a compact layout of the kept entries (CSR here; see the module doc) ---------------------
    layout_keys: ClassVar[tuple[str, ...]] = CSR_KEYS     # what a saved matrix holds instead of weight and mask

    def layout_nbytes(self) -> float:
        """Bytes the saved layout takes (against the dense weight and mask it replaces)."""
        return self.nbytes()

    def layout_arrays(self) -> tuple[torch.Tensor, ...]:
        """The arrays of ``layout_keys``."""
        return csr_arrays(self.weight, self.mask)

    def dense_from_layout(self, *arrays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, mask)`` of ``layout_arrays()``' output; ValueError when they do not fit this form."""
        return dense_from_csr(*arrays, tuple(self.shape))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        dense = self.mask.numel() * (FLOAT_BYTES + 1)                      # float32 weight + bool mask
        if keep_vars or self.layout_nbytes() >= dense:   # keep_vars asks for the live parameters themselves
            return nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for key, array in zip(self.layout_keys, self.layout_arrays()):
            destination[prefix + key] = array

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = self.layout_keys
        if prefix + keys[0] in state_dict:
            arrays = [state_dict.pop(prefix + key, None) for key in keys]
            if any(array is None for array in arrays):
                missing_keys.extend(prefix + key for key, array in zip(keys, arrays) if array is None)
                return
            try:
                weight, mask = self.dense_from_layout(*arrays)
            except ValueError as error:
                error_msgs.append(f"{prefix}{keys[0].split('_')[0]}_*: {error}")
                return
            state_dict[prefix + "weight"], state_dict[prefix + "mask"] = weight.to(self.weight.dtype), mask
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
