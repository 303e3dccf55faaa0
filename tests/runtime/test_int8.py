import logging

import numpy as np
import pytest
import torch
from torch import nn

import leanlstm
from leanlstm.runtime import int8
from leanlstm.runtime.engine import EngineError
from leanlstm.runtime.engine import compile as compile_engine
from leanlstm.runtime.latency import latency
from tests.runtime.op_checks import assert_strided_outputs_equal


def _reference(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The int8 product computed from its definition in float64: quantised rows times the quantised input."""
    q, scales = int8.quantise_rows(weight)
    scale = np.abs(x).max() / 127
    xq = np.rint(x / scale)
    return (q.astype(np.float64) @ xq) * scales.astype(np.float64) * scale


@pytest.mark.parametrize("shape", [(2600, 650), (130, 33), (7, 5), (64, 4), (65, 3)])
def test_the_product_is_the_quantised_arithmetic_exactly_and_close_to_float(shape):
    rng = np.random.default_rng(sum(shape))
    weight = rng.normal(size=shape).astype(np.float32)
    x = rng.normal(size=shape[1]).astype(np.float32)
    op = int8.int8_dense_op(weight)
    out = np.zeros(shape[0], np.float32)
    op.matvec(op.arrays, x, out, False)
    np.testing.assert_allclose(out, _reference(weight, x), rtol=1e-5, atol=1e-4 * np.abs(out).max())
    exact = weight.astype(np.float64) @ x
    assert np.abs(out - exact).max() < 0.03 * np.abs(exact).max()       # 8 bits: about 1% of the largest output
    flipped = np.zeros_like(out)
    op.matvec(op.arrays, x, flipped, True)
    np.testing.assert_array_equal(out, flipped)


def test_vnni_and_portable_kernels_agree_bit_for_bit():
    rng = np.random.default_rng(1)
    weight, x = rng.normal(size=(300, 70)).astype(np.float32), rng.normal(size=70).astype(np.float32)
    arrays = int8.pack_int8(weight)
    fast, slow = np.zeros(300, np.float32), np.zeros(300, np.float32)
    int8.int8_gemv(*arrays, x, fast, False)
    int8._make_gemv(False)(*arrays, x, slow, False)
    np.testing.assert_array_equal(fast, slow)


def test_outputs_with_gaps_between_rows_equal_contiguous_ones():
    """Whole panels are scaled into ``out`` in vector registers when its floats are contiguous; a strided ``out``
    takes the scalar loop, with the same result."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(200, 48)).astype(np.float32)
    x, xs = rng.normal(size=48).astype(np.float32), rng.normal(size=(11, 48)).astype(np.float32)
    assert_strided_outputs_equal(int8.int8_dense_op(weight), 200, x, xs)


def test_a_sequence_product_equals_stepping_and_zero_or_nan_inputs_behave():
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(200, 48)).astype(np.float32)
    xs = rng.normal(size=(11, 48)).astype(np.float32)
    xs[3] = 0.0                                          # a zero step adds nothing (no division by zero)
    op = int8.int8_dense_op(weight)
    whole, stepped = np.zeros((11, 200), np.float32), np.zeros((11, 200), np.float32)
    op.matmat(op.arrays, xs, whole)
    for t in range(11):
        op.matvec(op.arrays, xs[t], stepped[t], False)
    np.testing.assert_array_equal(whole, stepped)
    assert not whole[3].any()
    xs[5, 0] = np.nan
    broken = np.zeros((11, 200), np.float32)
    op.matmat(op.arrays, xs, broken)
    assert np.isnan(broken[5]).all() and np.isfinite(broken[4]).all()


@pytest.mark.parametrize("bad", [np.nan, -np.nan, np.inf, -np.inf])
def test_input_quantisation_finds_the_largest_magnitude_and_refuses_nan_and_infinity(bad):
    x = np.array([0.5, -3.0, 1e-30, 2.75, -0.0], np.float32)
    xq = np.zeros(8, np.uint8)
    scale = int8._quantise_input(x, xq)
    assert scale == np.float32(3.0) / np.float32(127.0)                # the negative entry is the largest
    np.testing.assert_array_equal(xq, np.append(np.rint(x / scale) + 128, [128, 128, 128]).astype(np.uint8))
    assert int8._quantise_input(np.array([0.0, -0.0], np.float32), xq) == 0
    x[3] = bad
    assert int8._quantise_input(x, xq) == -1


@pytest.mark.parametrize("steps, shape", [(35, (2600, 650)), (16, (64, 64)), (17, (130, 700)), (12, (70, 13)),
                                          (48, (200, 199)), (3, (64, 65))])
def test_amx_tiles_give_the_vnni_sums_bit_for_bit(steps, shape):
    """On a CPU with AMX, sequence products run 16 steps a tile block (``runtime.amx``) from the same panels: the
    same integer sums, so exactly the outputs of stepping, for any remainder of steps and of input groups."""
    if not int8.AMX_ON:
        pytest.skip("this CPU has no AMX tiles, or Linux refused their state: sequence products run on VNNI, "
                    "which test_a_sequence_product_equals_stepping_and_zero_or_nan_inputs_behave covers")
    rng = np.random.default_rng(steps)
    weight = rng.normal(size=shape).astype(np.float32)
    xs = rng.normal(size=(steps, shape[1])).astype(np.float32)
    panels, scales, corrections = int8.pack_int8(weight)
    xq, step_scales = int8.quantise_steps(xs, panels.shape[1] * int8.QUAD)
    tiles, stepped = np.zeros((steps, shape[0]), np.float32), np.zeros((steps, shape[0]), np.float32)
    int8._amx_gemm(panels, scales, corrections, xq, step_scales, tiles)
    for t in range(steps):
        int8.int8_gemv(panels, scales, corrections, xs[t], stepped[t], False)
    np.testing.assert_array_equal(tiles, stepped)
    wide, every_other = np.zeros((steps, shape[0] + 5), np.float32), np.zeros((steps, 2 * shape[0]), np.float32)
    for out in (wide[:, :shape[0]], every_other[:, ::2]):   # gaps between rows; a stride between outputs too
        int8._amx_gemm(panels, scales, corrections, xq, step_scales, out)
        np.testing.assert_array_equal(out, stepped)


def test_a_low_rank_sequence_product_equals_stepping():
    rng = np.random.default_rng(3)
    left, right = rng.normal(size=(130, 7)).astype(np.float32), rng.normal(size=(7, 48)).astype(np.float32)
    xs = rng.normal(size=(9, 48)).astype(np.float32)
    op = int8.int8_lowrank_op(left, right)
    whole, stepped = np.zeros((9, 130), np.float32), np.zeros((9, 130), np.float32)
    op.matmat(op.arrays, xs, whole)
    for t in range(9):
        op.matvec(op.arrays, xs[t], stepped[t], False)
    np.testing.assert_array_equal(whole, stepped)
    np.testing.assert_allclose(whole, xs @ (left @ right).T, rtol=0, atol=0.05 * np.abs(stepped).max())


def _word_model() -> nn.Module:
    class Words(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(50, 24)
            self.rnn = leanlstm.LSTM(24, [40, 32])
            self.decoder = nn.Linear(32, 50)

        def forward(self, tokens):
            return self.decoder(self.rnn(self.embedding(tokens))[0])

    torch.manual_seed(0)
    return Words().eval()


def test_an_int8_engine_runs_whole_models_close_to_float32_and_streams_the_same():
    model = _word_model()
    tokens = np.arange(17, dtype=np.int64) % 50
    full, _ = compile_engine(model).run(tokens)
    engine = compile_engine(model, precision="int8", choose="always")
    quantised, _ = engine.run(tokens)
    assert np.abs(quantised - full).max() < 0.02 * np.abs(full).max()
    assert not np.array_equal(quantised, full)                          # it really ran in int8
    stream = engine.stream()
    stepped = np.stack([stream.step(int(t)) for t in tokens])
    np.testing.assert_allclose(stepped, quantised, rtol=1e-6, atol=1e-6)
    float_bytes, int8_bytes = compile_engine(model).nbytes(), engine.nbytes()
    assert int8_bytes < 0.45 * float_bytes                               # weights a quarter, plus scales


def test_low_rank_runs_in_int8_and_forms_without_an_int8_op_keep_float32(caplog):
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(16, [32, 32]).replace_forms("lowrank", rank=8, speed_check=False).eval()
    xs = np.random.default_rng(3).normal(size=(9, 16)).astype(np.float32)
    full, _ = compile_engine(lstm).run(xs)
    quantised, _ = compile_engine(lstm, precision="int8", choose="always").run(xs)
    assert 0 < np.abs(quantised - full).max() < 0.02 * np.abs(full).max()
    circulant = leanlstm.LSTM(16, [32, 32]).replace_forms("circulant", block_size=8, speed_check=False).eval()
    with caplog.at_level(logging.INFO, logger="leanlstm.runtime.cells"):
        kept, _ = compile_engine(circulant, precision="int8").run(xs)
    np.testing.assert_array_equal(kept, compile_engine(circulant).run(xs)[0])
    assert "has no int8 op; it runs in float32" in caplog.text


def _quantised_product(weight: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Rows of ``xs`` times ``weight.T`` in the int8 arithmetic, each row quantised on its own (float64)."""
    return np.stack([_reference(weight, x) if np.abs(x).max() > 0 else np.zeros(len(weight)) for x in xs])


@pytest.mark.parametrize("shapes", [((275, 29), (3, 7), 650, 200), ((6, 5), (134, 40), 800, 200),
                                    ((13, 11), (9, 7), 117, 77), ((5, 4), (6, 3), 28, 11)])
def test_kronecker_factors_run_in_int8_as_two_quantised_products(shapes):
    from leanlstm.runtime.int8_kron import int8_kron_op
    from leanlstm.runtime.kernels import kron_plan

    (a_shape, b_shape, rows, cols) = shapes
    rng = np.random.default_rng(rows)
    a, b = rng.normal(size=a_shape).astype(np.float32), rng.normal(size=b_shape).astype(np.float32)
    x = rng.normal(size=cols).astype(np.float32)
    op = int8_kron_op(a, b, rows, cols)
    out = np.zeros(rows, np.float32)
    op.matvec(op.arrays, x, out, False)
    # the reference: the grid, both stages in the plan's order with every row quantised, then the output map
    transposed, left_first = kron_plan(*a.shape, *b.shape)
    left, right = (b, a) if transposed else (a, b)
    (m1, n1), (m2, n2) = a.shape, b.shape
    padded = np.zeros(n1 * n2)
    padded[:cols] = x
    grid = padded.reshape(n1, n2).T if transposed else padded.reshape(n1, n2)            # X (k x s)
    if left_first:
        y = _quantised_product(right, _quantised_product(left, grid.T).T)                 # (L X) R^T
    else:
        y = _quantised_product(left, _quantised_product(right, grid).T).T                 # L (X R^T)
    full = (y.T if transposed else y).ravel()[:rows]
    np.testing.assert_allclose(out, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    exact = np.kron(a, b)[:rows, :cols].astype(np.float64) @ x
    assert np.abs(out - exact).max() < 0.03 * np.abs(exact).max()        # two 8-bit stages: about 1%
    assert_strided_outputs_equal(op, rows, x, rng.normal(size=(5, cols)).astype(np.float32))


def test_kronecker_and_doped_kronecker_stacks_run_in_int8_close_to_float32():
    torch.manual_seed(0)
    kron = leanlstm.LSTM(24, [48, 40]).replace_forms("kronecker", speed_check=False).eval()
    xs = np.random.default_rng(7).normal(size=(11, 24)).astype(np.float32)
    _int8_close_to_float32(kron, xs)     # (factors this small store more as int8 panels of 64 rows than as float32)
    doped = leanlstm.LSTM(24, [48, 40]).replace_forms("doped", structure="kronecker", density=0.1,
                                                      speed_check=False).eval()
    _int8_close_to_float32(doped, xs)


def test_an_unknown_precision_is_refused():
    with pytest.raises(EngineError, match="precision must be one of"):
        compile_engine(leanlstm.LSTM(4, 8), precision="int4")


def test_int8_is_a_latency_backend_and_faster_than_float32_on_a_large_stack():
    lstm = leanlstm.LSTM(650, [650, 650]).eval()
    result = latency(lstm, backends=("leanlstm", "leanlstm-int8"), seq_len=35, repeats=7)
    times = {name: stats["min"] for name, stats in result["backends"].items()}   # the least disturbed sample
    # measured 3-5x on this machine kind, loaded or not; 1.5x leaves room for noise
    assert times["leanlstm-int8"] * 1.5 < times["leanlstm"], times


@pytest.mark.parametrize("form, options", [("sparse", {"density": 0.3}),
                                           ("doped", {"structure": "lowrank", "structure_options": {"rank": 4},
                                                      "density": 0.2})])
def test_sparse_and_doped_forms_run_in_int8_close_to_float32(form, options):
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(24, [48, 40]).replace_forms(form, speed_check=False, **options).eval()
    engine = _int8_close_to_float32(lstm, np.random.default_rng(4).normal(size=(13, 24)).astype(np.float32))
    assert engine.nbytes() < 0.75 * compile_engine(lstm).nbytes()          # values a quarter; indices as they were


def _int8_close_to_float32(lstm, xs):
    """The int8 engine of ``lstm``, checked: within 2% of float32 (and not equal: it ran in int8), streaming as it
    runs."""
    full, _ = compile_engine(lstm).run(xs)
    engine = compile_engine(lstm, precision="int8", choose="always")
    quantised, _ = engine.run(xs)
    assert 0 < np.abs(quantised - full).max() < 0.02 * np.abs(full).max()
    stream = engine.stream()
    np.testing.assert_allclose(np.stack([stream.step(x) for x in xs]), quantised, rtol=1e-5, atol=1e-6)
    return engine


def test_sparse_int8_values_follow_the_quantised_rows():
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(90, 40)).astype(np.float32)
    weight[rng.random(weight.shape) > 0.25] = 0
    op = int8.int8_sparse_op(weight)
    q, scales = int8.quantise_rows(weight)
    x = rng.normal(size=40).astype(np.float32)
    out = np.zeros(90, np.float32)
    op.matvec(op.arrays, x, out, False)
    np.testing.assert_allclose(out, (q.astype(np.float64) * scales[:, None]) @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [0, 2])
def test_antman_group_forms_run_in_int8_close_to_float32(groups):
    from leanlstm.methods.antman import AntMan

    torch.manual_seed(0)
    lstm = leanlstm.LSTM(48, [96, 96]).eval()
    leanlstm.compress_(lstm, AntMan(reduction=3, min_block_rank=2, groups=groups, speed_check=False))
    _int8_close_to_float32(lstm, np.random.default_rng(6).normal(size=(9, 48)).astype(np.float32))


def test_a_cpu_without_vnni_is_told_what_int8_costs(monkeypatch, caplog):
    monkeypatch.setattr(int8, "VNNI", False)
    monkeypatch.setattr(int8, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="leanlstm.runtime.int8"):
        compile_engine(leanlstm.LSTM(4, 8), precision="int8")
    assert "no AVX-512 VNNI" in caplog.text and "slower than float32" in caplog.text


@pytest.mark.parametrize("timings, kept", [([2.0, 1.0], "float32"), ([1.0, 2.0], "int8")])
def test_each_matrix_keeps_the_faster_of_int8_and_float32(monkeypatch, caplog, timings, kept):
    from leanlstm.runtime import speed_check

    calls = []
    monkeypatch.setattr(speed_check, "time_ops", lambda ops, shape, batched: calls.append(shape) or timings)
    lstm = leanlstm.LSTM(16, 32).eval()
    xs = np.random.default_rng(7).normal(size=(5, 16)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="leanlstm.runtime.cells"):
        got, _ = compile_engine(lstm, precision="int8").run(xs)
    assert sorted(calls) == [(128, 16), (128, 32)]                       # both matrices timed
    full, _ = compile_engine(lstm).run(xs)
    if kept == "float32":
        np.testing.assert_array_equal(got, full)
        assert "kept in float32" in caplog.text
    else:
        assert 0 < np.abs(got - full).max() < 0.02 * np.abs(full).max()
    with pytest.raises(EngineError, match="choose must be one of"):
        compile_engine(lstm, precision="int8", choose="sometimes")
