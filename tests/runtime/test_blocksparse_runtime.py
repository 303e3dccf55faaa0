"""Block-sparse products in the engine: float32 equals the dense product, int8 equals the dense int8 arithmetic."""
import numpy as np
import pytest
import torch

import leanlstm
from leanlstm.nn.forms.blocksparse import BlockSparse
from leanlstm.nn.quant import quantise_tensor
from leanlstm.runtime import blocksparse_ops as bs  # registers the int8 op (until runtime.int8 imports it)
from leanlstm.runtime import int8
from leanlstm.runtime.cells import form_op
from leanlstm.runtime.engine import compile as compile_engine
from leanlstm.runtime.precision import op_in, precision
from tests.runtime.op_checks import assert_strided_outputs_equal

SHAPES = [(2600, 650), (64, 32), (37, 13), (5, 3), (16, 4), (130, 66)]   # rows not of 16, columns not of 4 too
ATOL = 2e-5


def _form(shape, density=0.3, seed=0, block=(16, 4)) -> BlockSparse:
    torch.manual_seed(seed)
    return BlockSparse.from_dense(torch.randn(shape), density=density, block_rows=block[0], block_cols=block[1])


def _dense(form: BlockSparse) -> np.ndarray:
    return form.materialize().detach().numpy()


def _inputs(cols, steps=11, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(cols).astype(np.float32), rng.standard_normal((steps, cols)).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_op_is_the_dense_product(shape):
    form = _form(shape)
    weight, op = _dense(form), form.runtime_op()
    x, xs = _inputs(shape[1])
    for flip in (False, True):
        out = np.ones(shape[0], np.float32)                       # the op adds to what is there
        op.matvec(op.arrays, x, out, flip)
        np.testing.assert_allclose(out, 1 + weight @ x, rtol=1e-5, atol=ATOL)
    for steps in (1, 4, 11):
        out = np.ones((steps, shape[0]), np.float32)
        op.matmat(op.arrays, xs[:steps], out)
        np.testing.assert_allclose(out, 1 + xs[:steps] @ weight.T, rtol=1e-5, atol=ATOL)


def test_float32_op_stores_what_the_form_counts_and_other_block_shapes_run_on_16x4_tiles():
    form = _form((130, 66))
    values, cols, ptr, _ = form.runtime_op().arrays
    assert values.nbytes + cols.nbytes + ptr.nbytes == form.nbytes()
    assert len(cols) == form.nblocks() and cols.dtype == np.uint16
    coarse = _form((130, 66), block=(32, 8))                      # a block is four tiles (fewer at the edges)
    x, xs = _inputs(66)
    op = coarse.runtime_op()
    out = np.zeros(130, np.float32)
    op.matvec(op.arrays, x, out, False)
    np.testing.assert_allclose(out, _dense(coarse) @ x, rtol=1e-5, atol=ATOL)


def test_products_into_strided_views_from_strided_inputs():
    form = _form((37, 13))
    weight, xs = _dense(form), _inputs(26, steps=6)[1][:, ::2]     # a non-contiguous input
    for op in (form.runtime_op(), bs.int8_blocksparse_op(weight)):
        wide = np.zeros((6, 50), np.float32)
        op.matmat(op.arrays, xs, wide[:, 5:42])
        np.testing.assert_allclose(wide[:, 5:42], xs @ weight.T, rtol=0.03, atol=0.03)
        assert not wide[:, :5].any() and not wide[:, 42:].any()
        every_other = np.zeros(74, np.float32)
        op.matvec(op.arrays, xs[0], every_other[::2], False)
        np.testing.assert_allclose(every_other[::2], wide[0, 5:42], rtol=1e-6, atol=1e-6)


def _untiled(values, cols, ptr, shape):
    """The dense integer matrix of the int8 tiles."""
    rows, width = shape
    grid_rows = len(ptr) - 1
    dense = np.zeros((grid_rows * 16, -(-width // 4) * 4), np.int64)
    for b in range(grid_rows):
        for k in range(ptr[b], ptr[b + 1]):
            dense[16 * b:16 * b + 16, 4 * cols[k]:4 * cols[k] + 4] = values[k]
    return dense[:rows, :width]


def _integer_reference(weight, x):
    """The int8 product from its definition: per-row int8 weights times the per-call quantised input, summed exactly
    in integers, then scaled."""
    q, scales = int8.quantise_rows(weight)
    scale = np.float32(np.abs(x).max()) / np.float32(127)
    xq = np.rint(x * (np.float32(1) / scale)).astype(np.int64)
    return (q.astype(np.int64) @ xq).astype(np.float64) * scales * scale


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_op_is_the_dense_int8_arithmetic(shape):
    form = _form(shape)
    weight = _dense(form)
    op = bs.int8_blocksparse_op(weight, form.mask.numpy())
    values, cols, ptr, scales, corrections, _ = op.arrays
    q, row_scales = int8.quantise_rows(weight)
    np.testing.assert_array_equal(_untiled(values, cols, ptr, shape), q)               # the same integers
    np.testing.assert_array_equal(scales[:shape[0]], row_scales)
    np.testing.assert_array_equal(corrections[:shape[0]], 128 * q.astype(np.int64).sum(axis=1))
    assert len(cols) == form.nblocks()
    x, xs = _inputs(shape[1])
    dense_op = int8.int8_dense_op(weight)
    for flip in (False, True):
        out, want = np.zeros(shape[0], np.float32), np.zeros(shape[0], np.float32)
        op.matvec(op.arrays, x, out, flip)
        dense_op.matvec(dense_op.arrays, x, want, False)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(out, _integer_reference(weight, x), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    out, want = np.zeros((11, shape[0]), np.float32), np.zeros((11, shape[0]), np.float32)
    op.matmat(op.arrays, xs, out)
    dense_op.matmat(dense_op.arrays, xs, want)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_tile_columns_of_int32_run_as_uint16_ones():
    """More than 65536 tile columns (over 262144 inputs) store int32 indices; the kernels read either."""
    form = _form((130, 66))
    x, xs = _inputs(66)
    for op in (form.runtime_op(), bs.int8_blocksparse_op(_dense(form))):
        wide = op.arrays[:1] + (op.arrays[1].astype(np.int32),) + op.arrays[2:]
        for arrays in (op.arrays, wide):
            out, outs = np.zeros(130, np.float32), np.zeros((11, 130), np.float32)
            op.matvec(arrays, x, out, False)
            op.matmat(arrays, xs, outs)
            if arrays is op.arrays:
                want, wants = out, outs
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(outs, wants)


def test_int8_op_stores_what_the_form_counts():
    form = _form((130, 66))
    form.set_value_bits(8)
    values, cols, ptr, scales = op_in("int8", form).arrays[:4]
    assert values.nbytes + cols.nbytes + ptr.nbytes + scales[:130].nbytes == form.nbytes()


@pytest.mark.parametrize("shape", [(2600, 650), (37, 13)])
def test_vnni_and_portable_kernels_agree_bit_for_bit(shape):
    """The VNNI kernel scales whole tile rows in vector registers, the portable one in scalar loops: the same
    integers and the same order of the float products."""
    form = _form(shape, density=0.2)
    arrays = bs.int8_blocksparse_op(_dense(form)).arrays
    x, _ = _inputs(shape[1])
    for flip in (False, True):
        fast, slow = np.zeros(shape[0], np.float32), np.zeros(shape[0], np.float32)
        bs.int8_blocksparse_gemv(*arrays, x, fast, flip)
        bs.portable_blocksparse_gemv(*arrays, x, slow, flip)
        np.testing.assert_array_equal(fast, slow)


def test_outputs_with_gaps_between_rows_equal_contiguous_ones():
    """Whole tile rows are added straight into ``out`` when its floats are contiguous; a strided ``out`` (a column
    of a wider array) takes the path through the accumulator, with the same result."""
    form = _form((200, 48))
    x, xs = _inputs(48)
    for op in (form.runtime_op(), bs.int8_blocksparse_op(_dense(form))):
        assert_strided_outputs_equal(op, 200, x, xs)


def test_int8_sequence_equals_stepping_and_zero_or_nan_inputs_behave():
    form = _form((200, 48))
    op = bs.int8_blocksparse_op(_dense(form))
    _, xs = _inputs(48)
    xs[3] = 0.0                                                   # a zero step adds nothing
    whole, stepped = np.zeros((11, 200), np.float32), np.zeros((11, 200), np.float32)
    op.matmat(op.arrays, xs, whole)
    for t in range(11):
        op.matvec(op.arrays, xs[t], stepped[t], False)
    np.testing.assert_array_equal(whole, stepped)
    assert not whole[3].any() and whole[2].any()
    xs[5, 0] = np.nan
    broken = np.zeros((11, 200), np.float32)
    op.matmat(op.arrays, xs, broken)
    assert np.isnan(broken[5]).all() and np.isfinite(broken[4]).all()
    single = np.zeros(200, np.float32)
    op.matvec(op.arrays, xs[5], single, False)
    assert np.isnan(single).all()


def test_mismatched_sizes_are_refused():
    form = _form((37, 13))
    for op in (form.runtime_op(), bs.int8_blocksparse_op(_dense(form))):
        with pytest.raises(ValueError, match="does not match"):
            op.matvec(op.arrays, np.zeros(12, np.float32), np.zeros(37, np.float32), False)
        with pytest.raises(ValueError, match="does not match"):
            op.matmat(op.arrays, np.zeros((3, 13), np.float32), np.zeros((3, 36), np.float32))


def test_the_engine_picks_the_block_ops_before_the_sparse_ones():
    form = _form((64, 32))
    assert op_in("int8", form).matvec is bs.int8_blocksparse_matvec      # BlockSparse's own, not MaskedSparse's
    assert form_op(form).matvec is bs.blocksparse_matvec
    with precision("int8", choose="always"):
        assert form_op(form).matvec is bs.int8_blocksparse_matvec


def _pytorch(lstm, xs):
    with torch.no_grad():
        return lstm(torch.from_numpy(xs).unsqueeze(1))[0][:, 0].numpy()      # (T, 1, in) -> (T, H)


@pytest.mark.parametrize("sizes", [(24, [48, 40]), (13, [30, 22])])      # the second: no size a multiple of the block
def test_an_lstm_of_block_sparse_matrices_runs_in_the_engine(sizes):
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(*sizes).replace_forms("blocksparse", density=0.4, speed_check=False).eval()
    xs = np.random.default_rng(4).standard_normal((13, sizes[0])).astype(np.float32)
    want = _pytorch(lstm, xs)
    full, _ = compile_engine(lstm).run(xs)
    np.testing.assert_allclose(full, want, atol=ATOL)
    engine = compile_engine(lstm, precision="int8", choose="always")
    quantised, _ = engine.run(xs)
    assert 0 < np.abs(quantised - want).max() < 0.02 * np.abs(want).max()     # ran in int8, within its bound
    stream = engine.stream()
    np.testing.assert_allclose(np.stack([stream.step(x) for x in xs]), quantised, rtol=1e-5, atol=1e-6)
    assert engine.nbytes() < 0.6 * compile_engine(lstm).nbytes()   # values a quarter; scales, biases as they were


def _form_4bit(shape, density=0.3, seed=0) -> BlockSparse:
    """A block-sparse matrix on the 4-bit grid (as ADMM or ``Int8(bits=4)`` leaves it), width recorded."""
    form = _form(shape, density, seed)
    with torch.no_grad():
        form.weight.copy_(quantise_tensor(form.weight, form.mask, bits=4))
    form.set_value_bits(4)
    return form


@pytest.mark.parametrize("shape", [(2600, 650), (37, 13), (130, 66)])
def test_4_bit_tiles_give_the_int8_ops_sums_from_half_the_bytes(shape):
    """The packed op unpacks each tile in registers into the int8 tile of the same integers: outputs equal the
    int8 op's on those integers bit for bit, stepping, over sequences, on VNNI and in the portable loops."""
    form = _form_4bit(shape)
    weight = _dense(form)
    packed = op_in("int8", form)
    assert packed.matvec is bs.int8_blocksparse_matvec and packed.arrays[0].shape[1:] == (32,)
    q, row_scales = int8.quantise_rows(weight, 7)
    assert np.abs(q).max() == 7
    bytewise = (bs.tiles(q, form.mask.numpy())[0],) + packed.arrays[1:]      # the same integers, a byte each
    np.testing.assert_array_equal(packed.arrays[3][:shape[0]], row_scales)
    assert packed.arrays[0].nbytes * 2 == bytewise[0].nbytes
    x, xs = _inputs(shape[1])
    for flip in (False, True):
        out, want, slow = (np.zeros(shape[0], np.float32) for _ in range(3))
        packed.matvec(packed.arrays, x, out, flip)
        bs.int8_blocksparse_gemv(*bytewise, x, want, flip)
        bs.portable_blocksparse_gemv(*packed.arrays, x, slow, flip)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(out, slow)
    np.testing.assert_allclose(out, weight @ x, rtol=0.05, atol=0.02 * np.abs(weight @ x).max())   # input rounding
    outs, wants = np.zeros((11, shape[0]), np.float32), np.zeros((11, shape[0]), np.float32)
    packed.matmat(packed.arrays, xs, outs)
    bs.int8_blocksparse_gemm(*bytewise, xs, wants)
    np.testing.assert_array_equal(outs, wants)
    assert_strided_outputs_equal(packed, shape[0], x, xs)


def test_4_bit_tiles_store_what_the_form_counts():
    form = _form_4bit((130, 66))
    values, cols, ptr, scales = op_in("int8", form).arrays[:4]
    assert values.nbytes + cols.nbytes + ptr.nbytes + scales[:130].nbytes == form.nbytes()
    int8_form = _form((130, 66))
    int8_form.set_value_bits(8)
    assert form.nbytes() == int8_form.nbytes() - form.nblocks() * 32                # half a byte less a value


def test_nibble_packing_round_trips_and_refuses_values_beyond_seven():
    rng = np.random.default_rng(0)
    values = rng.integers(-7, 8, (5, 16, 4)).astype(np.int8)
    packed = bs.pack_nibbles(values)
    flat = packed.astype(np.int16)
    unpacked = np.concatenate([(flat & 15) - 8, (flat >> 4) - 8], axis=1).reshape(5, 16, 4)
    np.testing.assert_array_equal(unpacked, values)
    values[2, 3, 1] = -8
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        bs.pack_nibbles(values)
