"""bfloat16 weights: ``compile(model, precision="bfloat16", choose="always")`` (AVX-512 BF16 products, an exact portable fallback)."""
import logging

import numba
import numpy as np
import pytest
import torch

import leanlstm
from leanlstm.runtime import compile
from leanlstm.runtime import bf16
from leanlstm.runtime.bf16 import (bf16_dense_op, bf16_gemm, bf16_gemv, bf16_lowrank_op, from_bf16, pack_bf16,
                                   portable_gemm, portable_gemv, to_bf16, unpack_bf16)
from leanlstm.tasks.lm import LMConfig, WordLM

SHAPES = [(1, 1), (5, 3), (64, 2), (65, 7), (130, 77), (600, 150)]


def rounded(values):
    """float32 ``values`` rounded to bfloat16, as float32."""
    return from_bf16(to_bf16(values))


def reference(weight, xs):
    """``xs @ W.T`` in float64 from the bfloat16-rounded weights and inputs, and the bound of float32 accumulation."""
    w, x = rounded(weight).astype(np.float64), rounded(xs).astype(np.float64)
    return x @ w.T, (weight.shape[1] + 2) * 2.0 ** -23 * (np.abs(x) @ np.abs(w).T) + 1e-30


def test_rounding_is_nearest_even_as_torch_rounds():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000),
                             [0.0, -0.0, 1.0, 1.00390625, 1.01171875, -1.00390625, np.inf, -np.inf,
                              np.finfo(np.float32).max, 3.3895e38]]).astype(np.float32)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bf16(values), want)
    assert np.isnan(from_bf16(to_bf16(np.array([np.nan], np.float32))))
    nan_low_bits = np.array([0x7F800001], np.uint32).view(np.float32)       # would round to inf if added blindly
    assert np.isnan(from_bf16(to_bf16(nan_low_bits)))
    assert to_bf16(np.array([1e-39, -1e-39], np.float32)).tolist() == [0, 0x8000]      # denormals flush


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_products_match_the_rounded_weights_to_float32_accuracy(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    panels = pack_bf16(weight)
    np.testing.assert_array_equal(unpack_bf16(panels, rows, cols), rounded(weight))
    xs = rng.standard_normal((11, cols)).astype(np.float32)
    want, bound = reference(weight, xs)
    start = rng.standard_normal((11, rows)).astype(np.float32)
    out = start.copy()
    bf16_gemm(panels, xs, out)
    assert np.all(np.abs(out - start - want) <= bound + 4 * 2.0 ** -24 * np.abs(start))
    for t in range(xs.shape[0]):
        for flip in (False, True):
            one = start[t].copy()
            bf16_gemv(panels, xs[t], one, flip)
            np.testing.assert_array_equal(one, out[t])          # same order of sums: the sequence product = steps


@pytest.mark.parametrize("rows, cols", SHAPES)
def test_the_portable_fallback_gives_the_same_bits(rows, cols):
    rng = np.random.default_rng(cols)
    scale = 10.0 ** rng.integers(-22, 3, (rows, cols))              # products down to denormals: flushed alike
    weight = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    xs = (rng.standard_normal((6, cols)) * 10.0 ** rng.integers(-20, 3, (6, cols))).astype(np.float32)
    panels = pack_bf16(weight)
    fast, slow = np.zeros((6, rows), np.float32), np.zeros((6, rows), np.float32)
    bf16_gemm(panels, xs, fast)
    portable_gemm(panels, xs, slow)
    np.testing.assert_array_equal(fast, slow)
    for flip in (False, True):
        a, b = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
        bf16_gemv(panels, xs[0], a, flip)
        portable_gemv(panels, xs[0], b, flip)
        np.testing.assert_array_equal(a, b)


def test_the_intrinsic_runs_where_the_cpu_has_it():
    from llvmlite import binding
    assert bf16.BF16 == bool(binding.get_host_cpu_features().get("avx512bf16", False))
    if not bf16.BF16:
        pytest.skip("no AVX-512 BF16 on this CPU: the portable loops run")
    fresh = numba.njit(bf16_gemv.py_func)                     # uncached: its assembly can be inspected
    fresh(pack_bf16(np.ones((3, 4), np.float32)), np.ones(4, np.float32), np.zeros(3, np.float32), False)
    assert "vdpbf16ps" in fresh.inspect_asm(fresh.signatures[0])


def test_nan_and_bad_sizes():
    panels = pack_bf16(np.ones((3, 4), np.float32))
    out = np.zeros(3, np.float32)
    bf16_gemv(panels, np.array([1.0, np.nan, 0.0, 0.0], np.float32), out, False)
    assert np.isnan(out).all()
    with pytest.raises(ValueError, match="bf16 gemv"):
        bf16_gemv(panels, np.ones(5, np.float32), np.zeros(3, np.float32), False)
    with pytest.raises(ValueError, match="bf16 gemm"):
        bf16_gemm(panels, np.ones((2, 4), np.float32), np.zeros((3, 3), np.float32))


def test_ops_of_dense_and_lowrank():
    rng = np.random.default_rng(3)
    left, right = rng.standard_normal((70, 5)).astype(np.float32), rng.standard_normal((5, 9)).astype(np.float32)
    x = rng.standard_normal(9).astype(np.float32)
    op = bf16_lowrank_op(left, right)
    out = np.zeros(70, np.float32)
    op.matvec(op.arrays, x, out, False)
    thin = rounded(right).astype(np.float64) @ rounded(x).astype(np.float64)
    want = rounded(left).astype(np.float64) @ rounded(thin.astype(np.float32)).astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    outs = np.zeros((3, 70), np.float32)
    op.matmat(op.arrays, np.stack([x, x, x]), outs)
    np.testing.assert_array_equal(outs, np.stack([out, out, out]))
    dense = bf16_dense_op(left)
    assert dense.arrays[0].dtype == np.uint16 and dense.nbytes() == 2 * 3 * 64 * 2 * 2     # 2 panels, 3 pairs, 2 bytes


def test_compiled_lstm_is_close_to_float32_and_streams_the_same():
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(20, [33, 17]).replace_forms("lowrank", layers=[1], rank=5)
    xs = np.random.default_rng(0).standard_normal((13, 20)).astype(np.float32)
    want, want_state = compile(lstm).run(xs)
    engine = compile(lstm, precision="bfloat16", choose="always")
    got, state = engine.run(xs)
    assert got.dtype == np.float32 and all(part.dtype == np.float32 for part in state[0] + state[1])
    assert 0 < np.abs(got - want).max() < 5e-3
    for a, b in zip(state[1], want_state[1]):
        np.testing.assert_allclose(a, b, atol=1e-2)
    stream = engine.stream()
    np.testing.assert_allclose(np.stack([stream.step(x) for x in xs]), got, atol=1e-6)
    assert engine.nbytes() < 0.6 * compile(lstm).nbytes()


def test_language_model_with_a_bf16_head():
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=40, embed_size=12, hidden_sizes=[16, 10])).eval()
    tokens = np.random.default_rng(0).integers(0, 40, 9)
    want, _ = compile(model).run(tokens)
    engine = compile(model, precision="bfloat16", choose="always")
    logits, _ = engine.run(tokens)
    assert logits.shape == (9, 40)
    np.testing.assert_allclose(logits, want, atol=2e-3)
    stream = engine.stream()
    np.testing.assert_allclose(np.stack([stream.step(int(t)) for t in tokens]), logits, atol=1e-6)


def test_forms_without_a_bf16_op_keep_float32(caplog):
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(8, [16]).replace_forms("kronecker")
    xs = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="leanlstm.runtime.cells"):
        got, _ = compile(lstm, precision="bfloat16", choose="always").run(xs)
    assert "no bfloat16 op" in caplog.text
    np.testing.assert_allclose(got, compile(lstm).run(xs)[0], atol=1e-6)


def test_the_bf16_engine_looks_up_a_bf16_embedding_table():
    from leanlstm.runtime.bf16 import BF16Table, from_bf16, to_bf16
    from tests.user_models import RNNModel

    torch.manual_seed(5)
    model = RNNModel(ntoken=30, ninp=8, nhid=12).eval()
    table = model.encoder.weight.detach().numpy()
    stored = BF16Table(table)
    assert stored.nbytes == table.size * 2
    np.testing.assert_array_equal(stored(np.array([3, 0, 3])), from_bf16(to_bf16(table[[3, 0, 3]])))
    with torch.no_grad():
        model.encoder.weight.copy_(torch.from_numpy(from_bf16(to_bf16(table))))   # what the engine stores
    tokens = torch.randint(0, 30, (7, 1))
    float32 = compile(model).run(tokens[:, 0].numpy())[0]
    got = compile(model, precision="bfloat16", choose="always").run(tokens[:, 0].numpy())[0]
    assert np.abs(got - float32).max() < 0.02
