"""Block-sparse weights: a masked-sparse matrix whose mask is a union of whole ``block_rows x block_cols`` blocks.

Unstructured sparsity does not compound with int8: each kept entry gathers its own input, so an int8 product at 10%
density runs slower than the dense int8 one. The default block, 16 output rows x 4 inputs = 64 int8 bytes, is
one AVX-512 VNNI instruction (``vpdpbusd``: 16 int32 lanes, each adding 4 byte products against the block's 4
inputs broadcast as one 32-bit word), so the int8 engine runs a kept block as one instruction and skips a dropped
one whole (``leanlstm.runtime.blocksparse_ops``).

The blocks tile the matrix from its top-left corner; where ``out`` or ``in`` is not a multiple of the block, the
last block row or column is partial and counts as a block (it is stored padded to a whole block). Stored, as
``nbytes()`` counts it (block CSR by block row):

    values   nblocks * block_rows * block_cols at value_bits (int8: 1 byte each, 4 bits: two a byte, plus a float32
             scale per row)
    indices  nblocks block-column indices (uint16 while there are at most 65536 block columns, else int32)
    pointers (ceil(out / block_rows) + 1) int32 block-row pointers

State dicts hold the same block CSR (``block_values`` (nblocks, block_rows, block_cols) float32, ``block_columns``,
``block_pointers``) whenever it is smaller than the dense weight and its mask, so a saved matrix weighs what
``nbytes()`` says of float32 values. Loading takes that, ``MaskedSparse``'s CSR or the dense layout, and checks that
the mask is made of whole blocks.
"""
from __future__ import annotations

import math

import torch

from .base import FLOAT_BYTES, SCALE_BYTES
from .sparse import MaskedSparse

BLOCK_KEYS = ("block_values", "block_columns", "block_pointers")   # state dict keys of the block CSR
POINTER_BYTES = 4


def block_grid(rows: int, cols: int, block_rows: int, block_cols: int) -> tuple[int, int]:
    """``(block rows, block columns)`` of a ``rows x cols`` matrix; partial edge blocks count.

    >>> block_grid(2600, 650, 16, 4)
    (163, 163)
    """
    return -(-rows // block_rows), -(-cols // block_cols)


def block_nbytes(rows: int, cols: int, nblocks: int, value_bits: int = 32, block_rows: int = 16,
                 block_cols: int = 4) -> int:
    """Bytes of a block-CSR matrix with ``nblocks`` kept blocks (see the module doc).

    >>> block_nbytes(2600, 650, 2657), block_nbytes(2600, 650, 2657, value_bits=8)
    (686162, 186418)
    """
    grid_rows, grid_cols = block_grid(rows, cols, block_rows, block_cols)
    values = nblocks * block_rows * block_cols
    index_bytes = 2 if grid_cols <= 2**16 else 4
    fixed = nblocks * index_bytes + (grid_rows + 1) * POINTER_BYTES
    if value_bits >= 32:
        return values * FLOAT_BYTES + fixed
    return math.ceil(values * value_bits / 8) + rows * SCALE_BYTES + fixed


def block_entries_within(rows: int, cols: int, nbytes: float, value_bits: int = 32, block_rows: int = 16,
                         block_cols: int = 4) -> int:
    """The most entries, in whole blocks (``blocks * block_rows * block_cols``), that a ``rows x cols`` block-sparse
    matrix stores within ``nbytes`` (as ``block_nbytes`` counts), at most every block; -1 if even an empty one (its
    pointers, and int8 scales) does not fit. On a form: ``form.entries_within(nbytes, value_bits=None)``.

    >>> block_entries_within(2600, 650, 2600 * 650 * 4 / 20, 8)     # 20x smaller than dense float32: 18.8% kept
    316992
    >>> BlockSparse(2600, 650).entries_within(338000, 8)
    316992
    """
    empty = block_nbytes(rows, cols, 0, value_bits, block_rows, block_cols)
    if nbytes < empty:
        return -1
    per_block = block_nbytes(rows, cols, 1, value_bits, block_rows, block_cols) - empty      # whole bytes
    blocks = min(int((nbytes - empty) // per_block), math.prod(block_grid(rows, cols, block_rows, block_cols)))
    return blocks * block_rows * block_cols


def block_norms(weight: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """The L2 norm of every block of ``weight``: ``(block rows, block columns)``, partial edge blocks included.

    >>> block_norms(torch.tensor([[3.0, 4.0, 1.0]]), 1, 2).tolist()
    [[5.0, 1.0]]
    """
    grid_rows, grid_cols = block_grid(*weight.shape, block_rows, block_cols)
    padded = weight.detach().new_zeros(grid_rows * block_rows, grid_cols * block_cols)
    padded[:weight.shape[0], :weight.shape[1]] = weight.detach()
    blocks = padded.reshape(grid_rows, block_rows, grid_cols, block_cols)
    return blocks.square().sum(dim=(1, 3)).sqrt()


def expand_blocks(blocks: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """The entry mask ``(rows, cols)`` of a block mask ``(block rows, block columns)``.

    >>> expand_blocks(torch.tensor([[True, False]]), 2, 3, 2, 2).int().tolist()
    [[1, 1, 0], [1, 1, 0]]
    """
    full = blocks.to(torch.bool).repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
    return full[:rows, :cols]


def covering_blocks(mask: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """The blocks ``(block rows, block columns)`` holding at least one entry of the 0/1 ``mask``.

    >>> covering_blocks(torch.tensor([[0, 1, 0], [0, 0, 0]]), 2, 2).tolist()
    [[True, False]]
    """
    return block_norms(mask.to(torch.float32), block_rows, block_cols) > 0


class BlockSparse(MaskedSparse):
    """``W = weight * mask`` with a mask of whole ``block_rows x block_cols`` blocks (default: one VNNI block).

    ``prune_to`` and ``from_dense`` keep the blocks of largest L2 norm. ``set_mask`` refuses a mask that is not
    made of whole blocks (expanding it would store more than the caller sized it for); ``covering_mask(mask)``
    gives the smallest block mask holding a mask, to set explicitly.

    >>> w = BlockSparse.from_dense(torch.arange(16.0).reshape(4, 4), density=0.5, block_rows=2, block_cols=2)
    >>> w.materialize().tolist(), w.nblocks()
    ([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [8.0, 9.0, 10.0, 11.0], [12.0, 13.0, 14.0, 15.0]], 2)
    """

    name = "blocksparse"
    value_bit_choices = (4, 8, 32)      # 4 bits: the engine keeps two values a byte (16x4 tiles of 32 bytes)

    def __init__(self, out_features: int, in_features: int, block_rows: int = 16, block_cols: int = 4) -> None:
        if int(block_rows) != block_rows or int(block_cols) != block_cols or block_rows < 1 or block_cols < 1:
            raise ValueError(f"block sizes must be positive integers, got {block_rows}x{block_cols}")
        super().__init__(out_features, in_features)
        self.block_rows, self.block_cols = int(block_rows), int(block_cols)

    def check_value_bits(self, bits: int) -> None:
        super().check_value_bits(bits)
        if bits == 4 and (self.block_rows % 16 or self.block_cols % 4):
            raise ValueError(f"4-bit values need blocks made of whole 16x4 tiles (the engine's packed tiles), not "
                             f"{self.block_rows}x{self.block_cols}")

    # --- the block structure ---------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.block_rows * self.block_cols

    def grid(self) -> tuple[int, int]:
        """``(block rows, block columns)`` of the matrix."""
        return block_grid(self.out_features, self.in_features, self.block_rows, self.block_cols)

    def block_mask(self) -> torch.Tensor:
        """Which blocks are kept: bool ``(block rows, block columns)``."""
        return covering_blocks(self.mask, self.block_rows, self.block_cols)

    def nblocks(self) -> int:
        """Kept blocks (partial edge blocks count as one each)."""
        return int(self.block_mask().sum())

    def covering_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The smallest mask of whole blocks that holds the 0/1 ``mask``."""
        blocks = covering_blocks(mask, self.block_rows, self.block_cols)
        return expand_blocks(blocks, self.out_features, self.in_features, self.block_rows, self.block_cols)

    def _is_blocked(self, mask: torch.Tensor) -> bool:
        return bool(torch.equal(self.covering_mask(mask).to(mask.device), mask.to(torch.bool)))

    # --- masks -------------------------------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask with one made of whole blocks (ValueError otherwise: pass ``covering_mask(mask)`` to
        take every block a mask touches); masked-out weights are zeroed."""
        if mask.shape == self.mask.shape and not self._is_blocked(mask):
            raise ValueError(f"the mask is not made of whole {self.block_rows}x{self.block_cols} blocks; "
                             f"set covering_mask(mask) to keep every block it touches")
        super().set_mask(mask)

    def blocks_for(self, density: float) -> int:
        """Blocks kept at ``density``: ``density * out * in`` entries rounded to whole blocks, at most all of them;
        a density of 1 keeps every block (with partial edge blocks there are more than ``out * in / block``).

        >>> BlockSparse(2600, 650).blocks_for(0.1), BlockSparse(2600, 650).blocks_for(1.0)
        (2641, 26569)
        """
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}")
        total = math.prod(self.grid())
        if density == 1.0:
            return total
        return min(total, round(density * self.out_features * self.in_features / self.block_size))

    def keep_blocks(self, count: int) -> None:
        """Keep the ``count`` blocks of largest L2 norm of the current (masked) matrix."""
        norms = block_norms(self.materialize(), self.block_rows, self.block_cols)
        if not 0 <= count <= norms.numel():
            raise ValueError(f"cannot keep {count} of {norms.numel()} blocks")
        blocks = torch.zeros(norms.numel(), dtype=torch.bool, device=norms.device)
        if count:
            blocks[norms.reshape(-1).topk(count).indices] = True
        self.set_mask(expand_blocks(blocks.reshape(norms.shape), self.out_features, self.in_features,
                                    self.block_rows, self.block_cols))

    def prune_to(self, density: float) -> None:
        """Keep the largest-norm blocks of the current (masked) matrix at ``density`` (see ``blocks_for``)."""
        self.keep_blocks(self.blocks_for(density))

    # --- bytes ----------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return block_nbytes(self.out_features, self.in_features, self.nblocks(), self.value_bits, self.block_rows,
                            self.block_cols)

    def entries_within(self, nbytes: float, value_bits: int | None = None) -> int:
        """The most entries (whole blocks) this matrix can keep in ``nbytes`` at ``value_bits`` (default: its own
        width); ``block_entries_within`` answers for any shape."""
        bits = self.value_bits if value_bits is None else value_bits
        return block_entries_within(self.out_features, self.in_features, nbytes, bits, self.block_rows,
                                    self.block_cols)

    # --- building and loading ---------------------------------------------------------------------------------
    def options(self) -> dict[str, int]:
        return {"block_rows": self.block_rows, "block_cols": self.block_cols}

    @classmethod
    def from_dense(cls, weight: torch.Tensor, density: float = 1.0, block_rows: int = 16,
                   block_cols: int = 4) -> "BlockSparse":
        form = cls(*weight.shape, block_rows=block_rows, block_cols=block_cols)
        with torch.no_grad():
            form.weight.copy_(weight)
        form.prune_to(density)
        return form

    # --- state dicts: the block CSR (see the module doc) ------------------------------------------------------
    def block_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, columns, pointers)`` of the kept blocks by block row: float32 values ``(nblocks, block_rows,
        block_cols)`` (partial edge blocks zero-padded), block-column indices (uint16 where they fit, else int32)
        and int32 block-row pointers, as ``nbytes()`` counts them."""
        (grid_rows, grid_cols), (br, bc) = self.grid(), (self.block_rows, self.block_cols)
        padded = self.weight.detach().new_zeros(grid_rows * br, grid_cols * bc)
        padded[:self.out_features, :self.in_features] = self.materialize().detach()
        kept = self.block_mask()
        rows, cols = kept.nonzero(as_tuple=True)                               # row-major
        values = padded.reshape(grid_rows, br, grid_cols, bc).transpose(1, 2)[rows, cols]
        pointers = torch.zeros(grid_rows + 1, dtype=torch.int32)
        pointers[1:] = kept.sum(1).cumsum(0)
        index = torch.uint16 if grid_cols <= 2**16 else torch.int32
        return values.to(torch.float32).cpu(), cols.to(index).cpu(), pointers

    def dense_from_layout(self, values: torch.Tensor, columns: torch.Tensor, pointers: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``(weight, mask)`` of ``block_arrays``' output; ValueError when they do not fit this form."""
        (grid_rows, grid_cols), (br, bc) = self.grid(), (self.block_rows, self.block_cols)
        counts = pointers.to(torch.long).diff()
        cols = columns.to(torch.long)
        if (len(pointers) != grid_rows + 1 or counts.lt(0).any() or tuple(values.shape[1:]) != (br, bc)
                or not int(counts.sum()) == len(values) == len(cols) or (len(cols) and int(cols.max()) >= grid_cols)):
            raise ValueError(f"block arrays ({len(pointers) - 1} block rows, {len(values)} blocks of "
                             f"{tuple(values.shape[1:])}) do not describe a {self.out_features}x{self.in_features} "
                             f"matrix of {br}x{bc} blocks")
        rows = torch.repeat_interleave(torch.arange(grid_rows), counts)
        padded = torch.zeros(grid_rows, br, grid_cols, bc, dtype=values.dtype)
        padded.transpose(1, 2)[rows, cols] = values
        kept = torch.zeros(grid_rows, grid_cols, dtype=torch.bool)
        kept[rows, cols] = True
        weight = padded.reshape(grid_rows * br, grid_cols * bc)[:self.out_features, :self.in_features]
        return weight.contiguous(), expand_blocks(kept, self.out_features, self.in_features, br, bc)

    # --- state dicts: the block CSR arrays (``MaskedSparse`` saves and loads them through these) ---------------
    layout_keys = BLOCK_KEYS

    def layout_nbytes(self) -> float:
        return block_nbytes(self.out_features, self.in_features, self.nblocks(), 32, self.block_rows, self.block_cols)

    def layout_arrays(self) -> tuple[torch.Tensor, ...]:
        return self.block_arrays()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self._is_blocked(self.mask):
            error_msgs.append(f"{prefix}mask: not made of whole {self.block_rows}x{self.block_cols} blocks")

    def runtime_op(self):
        from ...runtime.blocksparse_ops import blocksparse_op   # the runtime imports nn: import here
        return blocksparse_op(self.materialize().detach().cpu().float().numpy(), self.mask.cpu().numpy())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.nblocks()}"
