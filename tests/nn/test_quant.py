"""The int8 (and 4-bit) weight grid: the same integers and scales as the engine's packing, squared-error clipping,
value width in every form's byte count (and through checkpoints), and the straight-through latent update."""
import numpy as np
import pytest
import torch

from leanlstm.nn import LSTM
from leanlstm.nn.forms import (BlockCirculant, BlockSparse, Dense, Doped, GroupDense, GroupLowRank, Kronecker, LowRank,
                               MaskedSparse, build_form)
from leanlstm.nn.quant import LEVELS, Latent, quantise_, quantise_tensor, row_scales
from leanlstm.runtime.int8 import quantise_rows


@pytest.mark.parametrize("clip", ["max", "mse"])
def test_snapped_values_are_exactly_what_the_engine_packs(clip):
    weight = torch.randn(37, 53) * torch.rand(37, 1)
    weight[3] = 0.0                                                       # an all-zero row
    weight[5, :20] = 2.5 * weight[5, :20].sign()                          # many values at the row's max
    snapped = quantise_tensor(weight, clip=clip)
    q, scales = quantise_rows(snapped.numpy())                            # the engine re-derives the grid
    np.testing.assert_allclose(q * scales[:, None], snapped.numpy(), rtol=1e-6, atol=0)
    steps = snapped / row_scales(weight, clip=clip)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= LEVELS + 1e-3


def test_mse_clipping_never_loses_to_max_and_wins_on_long_rows():
    weight = torch.randn(64, 4096)                 # the max of a long Gaussian row lies far out: clipping pays
    error = {clip: (quantise_tensor(weight, clip=clip) - weight).square().sum(1) for clip in ("max", "mse")}
    assert bool((error["mse"] <= error["max"]).all())
    assert error["mse"].sum() < 0.99 * error["max"].sum()


def test_masked_rows_take_their_scale_from_the_kept_entries_only():
    weight = torch.tensor([[10.0, 1.0, -0.5], [0.2, 0.1, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    snapped = quantise_tensor(weight, mask)
    assert snapped[0, 0] == 0 and snapped[0, 1] == pytest.approx(1.0) and snapped[1, 0] == pytest.approx(0.2)


@pytest.mark.parametrize("build, expected", [
    (lambda w: Dense.from_dense(w), lambda f: 64 * 48 + 64 * 4),
    (lambda w: LowRank.from_dense(w, rank=8), lambda f: 64 * 8 + 8 * 48 + (64 + 8) * 4),
    (lambda w: MaskedSparse.from_dense(w, density=0.25), lambda f: f.nnz() * 3 + 65 * 4 + 64 * 4),
    (lambda w: Kronecker.from_dense(w, factor_shapes=((8, 8), (8, 6))), lambda f: 64 + 48 + 16 * 4),
    (lambda w: GroupDense.from_dense(w, groups=4), lambda f: 64 * 48 // 4 + 64 * 4),
    (lambda w: GroupLowRank.from_dense(w, groups=4, rank=16), lambda f: 64 * 4 + 16 * 12 + (64 + 16) * 4),
])
def test_int8_bytes_count_one_byte_values_and_a_scale_per_row(build, expected):
    form = build(torch.randn(64, 48))
    float_bytes = form.nbytes()
    form.set_value_bits(8)
    assert form.nbytes() == expected(form)
    assert form.nbytes() < float_bytes
    rebuilt = build_form(form.config())                                   # the width survives a checkpoint
    rebuilt.load_state_dict(form.state_dict())
    assert rebuilt.value_bits == 8 and rebuilt.nbytes() == form.nbytes()


def test_doped_forms_and_whole_stacks_carry_the_width_to_their_parts():
    form = Doped.from_dense(torch.randn(64, 48), "lowrank", structure_options={"rank": 4}, density=0.05)
    form.set_value_bits(8)
    assert form.structured.value_bits == form.sparse.value_bits == 8
    assert form.nbytes() == form.structured.nbytes() + form.sparse.nbytes()
    lstm = LSTM(16, 32, 2)
    dense_bytes = lstm.stored_params() * 4
    quantise_(lstm)
    again = LSTM.from_config(lstm.config())
    again.load_state_dict(lstm.state_dict())
    assert again.stored_params() == lstm.stored_params() and dense_bytes / (lstm.stored_params() * 4) > 3.0     # biases stay float32
    circulant = BlockCirculant.from_dense(torch.randn(64, 48), block_size=16)
    circulant.set_value_bits(8)
    assert circulant.nbytes() == 4 * 3 * 16 + 4 * 3 * 4
    with pytest.raises(ValueError, match="value_bits must be one of"):
        Dense(4, 4).set_value_bits(16)
    with pytest.raises(ValueError, match="4-bit values need a block-sparse form"):
        Dense(4, 4).set_value_bits(4)


def test_4_bit_blocks_count_half_a_byte_a_value_and_keep_the_width_through_a_checkpoint():
    form = BlockSparse.from_dense(torch.randn(64, 48), density=0.25)
    form.set_value_bits(4)
    grid_rows = 64 // 16
    assert form.nbytes() == form.nblocks() * 32 + form.nblocks() * 2 + (grid_rows + 1) * 4 + 64 * 4
    rebuilt = build_form(form.config())
    rebuilt.load_state_dict(form.state_dict())
    assert rebuilt.value_bits == 4 and rebuilt.nbytes() == form.nbytes()
    with pytest.raises(ValueError, match="whole 16x4 tiles"):
        BlockSparse.from_dense(torch.randn(64, 48), density=0.25, block_rows=8, block_cols=4).set_value_bits(4)
    snapped = quantise_tensor(torch.tensor([[0.7, -0.35, 0.1, 0.0]]), bits=4)
    assert snapped.div(0.1).round().tolist() == [[7.0, -4.0, 1.0, 0.0]]         # steps of 0.7 / 7, ties to even


def test_latent_updates_resume_exactly():
    torch.manual_seed(1)
    steps = [torch.randn(6, 10) * 0.004 for _ in range(8)]

    start = torch.randn(6, 10)

    def run(stop=None):
        weight = torch.nn.Parameter(start.clone())
        mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(2)) < 0.5
        latent = Latent([("w", weight, mask)], clip="mse")
        for index, step in enumerate(steps):
            if index == stop:                          # save, rebuild from the saved model and latent state
                state, saved = latent.state_dict(), weight.detach().clone()
                weight = torch.nn.Parameter(saved)
                latent = Latent([("w", weight, mask)], clip="mse")
                latent.load_state_dict(state)
            with torch.no_grad():
                weight.add_(step)
            latent.update()
            assert torch.equal(weight.detach(), quantise_tensor(latent.values["w"], mask, "mse"))
        return weight.detach()

    assert torch.equal(run(), run(stop=4))
