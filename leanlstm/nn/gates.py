"""The one place that knows how an LSTM packs its four gates.

PyTorch (and leanlstm) stack the gate blocks of a layer's weights and biases row-wise in the order
``[i | f | g | o]``: rows ``[0:H)`` feed the input gate, ``[H:2H)`` the forget gate, ``[2H:3H)`` the cell
candidate and ``[3H:4H)`` the output gate. Methods that select or remove hidden units go through these
helpers instead of indexing gate rows by hand.
"""
from __future__ import annotations

import torch

GATES = ("i", "f", "g", "o")
NUM_GATES = len(GATES)


def gate_rows(hidden_size: int, units: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """Row indices, in all four gate blocks, that belong to hidden ``units`` (default: every unit).

    >>> gate_rows(3, [0, 2]).tolist()
    [0, 2, 3, 5, 6, 8, 9, 11]
    """
    if units is None:
        units = torch.arange(hidden_size)
    units = torch.as_tensor(units, dtype=torch.long)
    if units.numel() and (units.min() < 0 or units.max() >= hidden_size):
        raise IndexError(f"unit indices must lie in [0, {hidden_size}), got {units.tolist()}")
    offsets = torch.arange(NUM_GATES).unsqueeze(1) * hidden_size  # (4, 1)
    return (offsets + units.unsqueeze(0)).reshape(-1)


def split_gates(packed: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Split a gate-packed tensor into its ``(i, f, g, o)`` blocks along ``dim``."""
    if packed.shape[dim] % NUM_GATES:
        raise ValueError(f"dimension {dim} of size {packed.shape[dim]} is not a multiple of 4 gates")
    return tuple(packed.chunk(NUM_GATES, dim=dim))
