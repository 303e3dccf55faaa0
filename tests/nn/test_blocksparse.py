"""Block-sparse weights: masks of whole blocks, honest bytes, budget sizing, pruning by block norm, checkpoints."""
import math

import pytest
import torch

import leanlstm
from leanlstm.nn.forms import FORMS, build_form
from leanlstm.nn.forms.blocksparse import BlockSparse, block_entries_within, block_nbytes, block_norms, expand_blocks


def _blocked(form: BlockSparse) -> bool:
    """Every block of the mask is all kept or all dropped."""
    mask = form.mask.float()
    counts = block_norms(mask, form.block_rows, form.block_cols).square()          # kept entries per block
    sizes = block_norms(torch.ones_like(mask), form.block_rows, form.block_cols).square()
    return bool(((counts == 0) | (counts == sizes)).all())


def test_the_form_registers_under_its_name():
    assert FORMS["blocksparse"] is BlockSparse


@pytest.mark.parametrize("shape, block", [((64, 32), (16, 4)), ((37, 13), (16, 4)), ((5, 3), (2, 2)),
                                          ((30, 30), (4, 8))])
def test_materialize_is_weight_times_a_mask_of_whole_blocks(shape, block):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    form = BlockSparse.from_dense(weight, density=0.4, block_rows=block[0], block_cols=block[1])
    assert _blocked(form)
    torch.testing.assert_close(form.materialize(), weight * form.mask, rtol=0, atol=0)
    assert 0 < form.nblocks() < math.prod(form.grid())
    full = BlockSparse.from_dense(weight, block_rows=block[0], block_cols=block[1])    # density 1: every block
    assert full.nblocks() == math.prod(full.grid()) and full.mask.all()
    torch.testing.assert_close(full.materialize(), weight, rtol=0, atol=0)


def test_partial_edge_blocks_count_as_blocks():
    form = BlockSparse(37, 13)                      # 3 block rows (16, 16, 5) x 4 block columns (4, 4, 4, 1)
    assert form.grid() == (3, 4) and form.nblocks() == 12
    blocks = torch.zeros(3, 4, dtype=torch.bool)
    blocks[2, 3] = True                             # the 5x1 corner
    form.set_mask(expand_blocks(blocks, 37, 13, 16, 4))
    assert form.nblocks() == 1 and form.nnz() == 5


def test_nbytes_counts_blocks_indices_and_pointers():
    form = BlockSparse(40, 10)                      # grid 3 x 3
    blocks = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    form.set_mask(expand_blocks(blocks, 40, 10, 16, 4))
    assert form.nblocks() == 4
    assert form.nbytes() == 4 * 64 * 4 + 4 * 2 + 4 * 4               # float32 values, uint16 columns, 4 pointers
    form.set_value_bits(8)
    assert form.nbytes() == 4 * 64 + 40 * 4 + 4 * 2 + 4 * 4         # int8 values, a scale per row
    assert block_nbytes(40, 10, 4, 8) == form.nbytes()
    wide = BlockSparse(16, 4 * (2**16 + 1), block_rows=16, block_cols=4)   # more block columns than uint16 holds
    assert wide.nbytes() == wide.nblocks() * (64 * 4 + 4) + 2 * 4


@pytest.mark.parametrize("rows, cols, bits, block", [(2600, 650, 32, (16, 4)), (2600, 650, 8, (16, 4)),
                                                     (37, 13, 8, (16, 4)), (200, 96, 32, (8, 8))])
def test_entries_within_is_the_most_whole_blocks_that_fit(rows, cols, bits, block):
    for compression in (4.0, 10.0, 37.0):
        budget = rows * cols * 4 / compression
        entries = block_entries_within(rows, cols, budget, bits, *block)
        if entries == -1:                           # not even the empty matrix (its scales, pointers) fits
            assert block_nbytes(rows, cols, 0, bits, *block) > budget
            continue
        size = block[0] * block[1]
        assert entries % size == 0
        assert block_nbytes(rows, cols, entries // size, bits, *block) <= budget
        assert block_nbytes(rows, cols, entries // size + 1, bits, *block) > budget     # one more block does not
        form = BlockSparse(rows, cols, *block)
        assert form.entries_within(budget, bits) == entries
        form.set_value_bits(bits)
        assert form.entries_within(budget) == entries                                  # its own width by default
        form.keep_blocks(entries // size)
        assert form.nbytes() <= budget


def test_entries_within_is_capped_at_every_block_and_refuses_a_budget_below_the_empty_matrix():
    everything = block_entries_within(37, 13, 10**9)
    assert everything == 12 * 64                    # every block, its padding included
    empty = block_nbytes(37, 13, 0, 8)
    assert block_entries_within(37, 13, empty, 8) == 0
    assert block_entries_within(37, 13, empty - 1, 8) == -1


def test_prune_keeps_the_blocks_of_largest_norm():
    torch.manual_seed(0)
    weight = torch.randn(64, 16) * 0.01
    strong = [(0, 1), (2, 3), (3, 0)]               # (block row, block column) made large
    for i, (r, c) in enumerate(strong):
        weight[16 * r:16 * r + 16, 4 * c:4 * c + 4] += 10.0 * (i + 1)
    weight[20, 5] = 50.0                            # one large entry alone: its block's norm stays below the three
    form = BlockSparse.from_dense(weight)
    form.prune_to(3 * 64 / weight.numel())
    kept = form.block_mask().nonzero().tolist()
    assert sorted(map(tuple, kept)) == sorted(strong)
    form.prune_to(64 / weight.numel())              # pruning again ranks the masked matrix
    assert form.block_mask().nonzero().tolist() == [[3, 0]]


def test_density_is_entries_rounded_to_whole_blocks():
    form = BlockSparse(2600, 650)
    assert form.blocks_for(0.1) == round(0.1 * 2600 * 650 / 64) == 2641
    assert form.blocks_for(0.0) == 0 and form.blocks_for(1.0) == 163 * 163
    with pytest.raises(ValueError, match="density"):
        form.blocks_for(1.5)


def test_set_mask_refuses_masks_that_are_not_whole_blocks():
    form = BlockSparse.from_dense(torch.ones(32, 8))
    single = torch.zeros(32, 8, dtype=torch.bool)
    single[3, 5] = True
    with pytest.raises(ValueError, match="whole 16x4 blocks"):
        form.set_mask(single)
    assert form.mask.all()                          # unchanged
    form.set_mask(form.covering_mask(single))
    assert form.nblocks() == 1 and form.mask[:16, 4:].all() and form.nnz() == 64


@pytest.mark.parametrize("density, bits, block", [(0.2, 32, (8, 2)), (1.0, 32, (8, 2)), (0.3, 8, (8, 2)),
                                                  (1.0, 32, (1, 1))])
def test_checkpoint_round_trip(density, bits, block):
    torch.manual_seed(0)
    form = BlockSparse.from_dense(torch.randn(50, 22), density=density, block_rows=block[0], block_cols=block[1])
    if bits != 32:
        form.set_value_bits(bits)
    state = form.state_dict()
    stored = sum(t.numel() * t.element_size() for t in state.values())
    if form.nbytes() < form.mask.numel() * 5:       # the blocks whenever smaller than the dense weight and its mask
        assert set(state) == {"block_values", "block_columns", "block_pointers"}
        assert stored == block_nbytes(50, 22, form.nblocks(), 32, *block)          # float32 values, as trained
    else:
        assert set(state) == {"weight", "mask"}
    loaded = build_form(form.config())
    loaded.load_state_dict(state)
    assert isinstance(loaded, BlockSparse) and loaded.options() == {"block_rows": block[0], "block_cols": block[1]}
    assert loaded.value_bits == bits and loaded.nblocks() == form.nblocks() and loaded.nbytes() == form.nbytes()
    torch.testing.assert_close(loaded.materialize(), form.materialize(), rtol=0, atol=0)


def test_loading_a_mask_that_is_not_whole_blocks_or_blocks_that_do_not_fit_fails():
    mask = torch.ones(32, 8, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(RuntimeError, match="not made of whole 16x4 blocks"):
        BlockSparse(32, 8).load_state_dict({"weight": torch.randn(32, 8), "mask": mask})
    state = BlockSparse.from_dense(torch.randn(32, 8), density=0.5).state_dict()
    with pytest.raises(RuntimeError, match="do not describe"):
        BlockSparse(48, 8).load_state_dict(state)


def test_an_lstm_with_block_sparse_matrices_saves_and_reloads():
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(13, [30, 22]).replace_forms("blocksparse", density=0.3, speed_check=False)
    forms = dict(lstm.forms())
    assert all(isinstance(form, BlockSparse) and _blocked(form) for form in forms.values())
    fresh = leanlstm.LSTM(13, [30, 22])
    for name, form in forms.items():                # rebuild each form from its config, as checkpoints do
        index, matrix = name.split(".")[1], name.rsplit("_", 1)[-1]
        fresh.layers[int(index)].set_form(matrix, build_form(form.config()))
    fresh.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 1, 13)
    torch.testing.assert_close(fresh(x)[0], lstm(x)[0], rtol=0, atol=0)
