"""The batch-1 engine computes what PyTorch computes, for every weight form and mixes of them."""
import copy
import logging
import pickle

import numpy as np
import pytest
import torch

import leanlstm
from leanlstm.nn.forms import BlockCirculant, Dense, Kronecker, LowRank, MaskedSparse, WeightForm
from leanlstm.runtime import EngineError, RuntimeOp, compile
from leanlstm.runtime.kernels import (CACHE_LINE, dense_matvec, dense_op, entries_matvec, jagged_diagonals, kron_plan,
                                      pack_panels, sparse_op)
from leanlstm.tasks.lm import LMConfig, WordLM

ATOL = 2e-5


def reference(lstm, xs, state=None):
    """PyTorch's (T, H) outputs and per-layer final state for one unbatched sequence."""
    with torch.no_grad():
        x = torch.from_numpy(xs).unsqueeze(1)                      # (T, 1, in)
        if state is not None:
            state = tuple([torch.from_numpy(t).reshape(1, 1, -1) for t in part] for part in state)
            if lstm.uniform_sizes:
                state = tuple(torch.cat(part) for part in state)
        y, (h, c) = lstm(x, state)
    return y[:, 0].numpy(), [t.reshape(-1).numpy() for t in h], [t.reshape(-1).numpy() for t in c]


def random_state(sizes, seed=1):
    rng = np.random.default_rng(seed)
    return ([rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in sizes],
            [rng.uniform(-1, 1, s).astype(np.float32) for s in sizes])


def assert_matches(lstm, steps=7, seed=0):
    engine = compile(lstm)
    xs = np.random.default_rng(seed).standard_normal((steps, lstm.input_size)).astype(np.float32)
    for state in (None, random_state(lstm.hidden_sizes)):
        want, want_h, want_c = reference(lstm, xs, state)
        got, (h, c) = engine.run(xs, state)
        np.testing.assert_allclose(got, want, atol=ATOL)
        for a, b in zip(h + c, want_h + want_c):
            np.testing.assert_allclose(a, b, atol=ATOL)
        stepped, current = [], state
        for x in xs:                                               # step() through the same sequence
            y, current = engine.step(x, current)
            stepped.append(y)
        np.testing.assert_allclose(np.stack(stepped), want, atol=ATOL)
        for a, b in zip(current[0] + current[1], want_h + want_c):
            np.testing.assert_allclose(a, b, atol=ATOL)


FORMS = {
    "dense": {"form": "dense"},
    "sparse": {"form": "sparse", "density": 0.2},
    "kronecker": {"form": "kronecker"},
    "lowrank": {"form": "lowrank", "rank": 3},
}


@pytest.mark.parametrize("name", FORMS)
def test_every_form_matches_pytorch(name):
    options = dict(FORMS[name])
    lstm = leanlstm.LSTM(13, 24, 2).replace_forms(options.pop("form"), **options)
    assert_matches(lstm)


def test_mixed_forms_and_per_layer_sizes():
    lstm = leanlstm.LSTM(10, [24, 16, 9])
    lstm.replace_forms("sparse", layers=[0], matrices=["ih"], density=0.3)
    lstm.replace_forms("lowrank", layers=[0], matrices=["hh"], rank=4)
    lstm.replace_forms("kronecker", layers=[1])
    lstm.replace_forms("sparse", layers=[2], matrices=["hh"], density=0.05)   # rows without entries
    assert_matches(lstm)


def test_padded_kronecker_factors_and_no_bias():
    lstm = leanlstm.LSTM(11, 13, 2, bias=False)                  # 52x11 and 52x13: factors pad and crop
    lstm.replace_forms("kronecker", layers=[0], matrices=["ih"], factor_shapes=((6, 3), (9, 4)))
    lstm.replace_forms("kronecker", layers=[1], factor_shapes=((7, 4), (8, 4)))
    lstm.replace_forms("kronecker", layers=[0], matrices=["hh"], factor_shapes=((7, 4), (8, 4)))
    assert lstm.layers[0].weight_ih.factor_shapes == ((6, 3), (9, 4))
    assert_matches(lstm)


def test_sequences_longer_than_a_tile_and_of_one_step():
    lstm = leanlstm.LSTM(33, 37, 1)                             # odd sizes: every kernel's leftover path
    assert_matches(lstm, steps=1)
    assert_matches(lstm, steps=66)


def test_tiny_sizes():
    assert_matches(leanlstm.LSTM(1, [1, 2]))
    assert_matches(leanlstm.LSTM(1, [1, 2]).replace_forms("lowrank", rank=1))
    assert_matches(leanlstm.LSTM(2, 3).replace_forms("sparse", density=0.0))   # no entries at all


def test_torch_lstm_and_torch_layout_inputs():
    module = torch.nn.LSTM(6, 8, 2)
    engine = compile(module)
    xs = np.random.default_rng(0).standard_normal((5, 1, 6)).astype(np.float32)   # (T, 1, in)
    with torch.no_grad():
        want, (h, c) = module(torch.from_numpy(xs))
    got, state = engine.run(torch.from_numpy(xs).requires_grad_(), (h, c))   # tensors, stacked (L, 1, H) state
    with torch.no_grad():
        want, _ = module(torch.from_numpy(xs), (h, c))
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=ATOL)


def test_word_lm_logits():
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=40, embed_size=12, hidden_sizes=[16, 10])).eval()
    model.lstm.replace_forms("lowrank", layers=[1], rank=3)
    tokens = np.random.default_rng(0).integers(0, 40, 9)
    with torch.no_grad():
        want, _, (h, c) = model(torch.from_numpy(tokens).unsqueeze(1))
    engine = compile(model)
    logits, state = engine.run(tokens)
    assert logits.shape == (9, 40)
    np.testing.assert_allclose(logits, want[:, 0].numpy(), atol=ATOL)
    np.testing.assert_allclose(state[0][1], h[1].reshape(-1).numpy(), atol=ATOL)
    first, state = engine.step(int(tokens[0]))
    np.testing.assert_allclose(first, want[0, 0].numpy(), atol=ATOL)


def test_the_callers_state_is_never_modified():
    engine = compile(leanlstm.LSTM(4, 5))
    state = random_state([5])
    before = [a.copy() for a in state[0] + state[1]]
    engine.run(np.ones((3, 4), np.float32), state)
    engine.step(np.ones(4, np.float32), state)
    for a, b in zip(state[0] + state[1], before):
        np.testing.assert_array_equal(a, b)


def test_empty_sequence_returns_the_state_unchanged():
    engine = compile(leanlstm.LSTM(4, 5))
    state = random_state([5])
    y, (h, c) = engine.run(np.zeros((0, 4), np.float32), state)
    assert y.shape == (0, 5)
    np.testing.assert_array_equal(h[0], state[0][0])


class Scaled(WeightForm):
    """A form without a runtime op: ``W = s * I`` (cropped)."""

    name = "test_scaled_identity"

    def __init__(self, out_features, in_features):
        super().__init__(out_features, in_features)
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def materialize(self):
        return self.scale * torch.eye(self.out_features, self.in_features)

    def nbytes(self):
        return 4


def test_a_form_without_runtime_op_runs_densely_with_a_warning(caplog):
    lstm = leanlstm.LSTM(6, 6)
    lstm.layers[0].set_form("hh", Scaled(24, 6))
    with caplog.at_level(logging.WARNING, logger="leanlstm.runtime"):
        assert_matches(lstm)
    assert "layers.0.weight_hh" in caplog.text and "Scaled" in caplog.text and "dense" in caplog.text


class Recorded(Scaled):
    """A new form bringing its own op: the engine uses it without knowing the type."""

    name = "test_recorded_identity"
    calls = 0

    def runtime_op(self):
        Recorded.calls += 1
        return RuntimeOp((pack_panels(self.materialize().detach().numpy()),), dense_matvec)   # no matmat: per step


def test_a_new_forms_runtime_op_is_used_through_the_interface(caplog):
    lstm = leanlstm.LSTM(6, 6)
    lstm.layers[0].set_form("ih", Recorded(24, 6))
    with caplog.at_level(logging.WARNING, logger="leanlstm.runtime"):
        assert_matches(lstm)
    assert Recorded.calls and "no runtime op" not in caplog.text


@pytest.mark.parametrize("bad, message", [
    (np.full((3, 4), np.nan, np.float32), "NaN or inf at time step 0"),
    (np.array([[0, 0, 0, 0], [0, np.inf, 0, 0]], np.float32), "NaN or inf at time step 1"),
    (np.array([[0, 0, 0, 0], [0, 0, 1e39, 0]]), "NaN or inf at time step 1"),   # float64 past float32's range
    (np.zeros((3, 5), np.float32), "shape (T, 4)"),
    (np.zeros(4, np.float32), "shape (T, 4)"),
    (np.array([["a"] * 4]), "real numbers"),
])
def test_bad_inputs_raise_clear_errors(bad, message):
    engine = compile(leanlstm.LSTM(4, 5, 2))
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.run(bad)


@pytest.mark.parametrize("state, message", [
    (([np.zeros(5)], [np.zeros(5)]), "holds 1 layers, the model has 2"),
    (([np.zeros(5), np.zeros(4)], [np.zeros(5)] * 2), r"state h of layer 1 must have shape \(5,\)"),
    (([np.zeros(5)] * 2, [np.zeros(5), np.full(5, np.nan)]), "state c of layer 1 contains NaN"),
    (([np.full(5, 1e39)] + [np.zeros(5)], [np.zeros(5)] * 2), "state h of layer 0 contains NaN or inf"),
    (([np.zeros(5, np.float32)] * 2, [np.zeros(5, np.float32), np.array([0, 0, -np.inf, 0, 0], np.float32)]),
     "state c of layer 1 contains NaN or inf"),                   # the kernels' own type: the compiled check
    (np.zeros((2, 5)), "pair"),
])
def test_bad_states_raise_clear_errors(state, message):
    engine = compile(leanlstm.LSTM(4, 5, 2))
    with pytest.raises(EngineError, match=message):
        engine.run(np.zeros((3, 4), np.float32), state)


def test_bad_tokens_and_unsupported_models():
    model = WordLM(LMConfig(vocab_size=10, embed_size=4, hidden_sizes=[5]))
    engine = compile(model)
    with pytest.raises(EngineError, match="token id 10 at position 1 is outside the vocabulary"):
        engine.run(np.array([1, 10]))
    with pytest.raises(EngineError, match="must be integers"):
        engine.run(np.array([1.0, 2.0]))
    with pytest.raises(EngineError, match="the model itself, a torch.nn.GRU"):
        compile(torch.nn.GRU(4, 5))
    model.lstm = torch.nn.GRU(4, 5)
    with pytest.raises(EngineError, match="GRU"):        # WordLM.init_state reads lstm.hidden_sizes while tracing
        compile(model)


def test_parts_that_do_not_fit_are_refused_before_any_kernel_runs():
    model = WordLM(LMConfig(vocab_size=10, embed_size=4, hidden_sizes=[5, 6]))
    model.decoder = torch.nn.Linear(5, 10)
    with pytest.raises(EngineError, match=r"decoder \(nn.Linear\) takes 5 inputs, but the tensor it reads has 6"):
        compile(model)
    model = WordLM(LMConfig(vocab_size=10, embed_size=4, hidden_sizes=[5, 6]))
    model.embedding = torch.nn.Embedding(10, 3)
    with pytest.raises(EngineError, match=r"lstm \(leanlstm.LSTM\) takes inputs of 4, but the tensor it reads has 3"):
        compile(model)
    lstm = leanlstm.LSTM(4, [5, 6])
    lstm.layers[1].weight_ih = Dense(24, 7)                       # assigned by hand, past set_form's check
    with pytest.raises(EngineError, match="layers.1: weight_ih is 24x7, the layer needs 24x5"):
        compile(lstm)


def test_panel_products_refuse_mismatched_sizes_and_convert_other_dtypes():
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    op = dense_op(weight)
    for x in (np.ones(2), np.ones(2, np.int32), np.ones(4, np.float32)[::2]):  # float64, int, strided
        out = np.zeros(3, np.float32)
        op.matvec(op.arrays, x, out, False)
        np.testing.assert_allclose(out, weight @ np.ones(2))
    with pytest.raises(ValueError, match="does not match"):
        op.matvec(op.arrays, np.ones(3, np.float32), np.zeros(3, np.float32), False)
    with pytest.raises(ValueError, match="does not match"):
        op.matmat(op.arrays, np.ones((2, 2), np.float32), np.zeros((3, 3), np.float32))


def test_jagged_diagonals_store_every_entry_once():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((30, 20)) * (rng.random((30, 20)) < 0.2)
    perm, ptr, cols, vals = jagged_diagonals(weight)
    assert len(vals) == np.count_nonzero(weight) and cols.dtype == np.uint16
    rebuilt = np.zeros_like(weight)
    for d in range(len(ptr) - 1):
        for r in range(ptr[d + 1] - ptr[d]):
            rebuilt[perm[r], cols[ptr[d] + r]] = vals[ptr[d] + r]
    np.testing.assert_allclose(rebuilt, weight.astype(np.float32))


def assert_op_computes(op, weight, steps=5, seed=0):
    """``op``'s one-step and whole-sequence products equal ``weight``'s."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, weight.shape[1])).astype(np.float32)
    out = np.ones(weight.shape[0], np.float32)                 # products accumulate into out
    op.matvec(op.arrays, xs[0], out, False)
    np.testing.assert_allclose(out, 1 + weight @ xs[0], atol=ATOL)
    outs = np.ones((steps, weight.shape[0]), np.float32)
    op.matmat(op.arrays, xs, outs)
    np.testing.assert_allclose(outs, 1 + xs @ weight.T, atol=ATOL)


# Panel products: whole and partial panels (64 outputs each), vectors cut short, steps past a 4-step block.
@pytest.mark.parametrize("rows, cols, steps", [(1, 1, 1), (5, 3, 3), (16, 7, 4), (17, 64, 9), (64, 2, 5),
                                               (70, 100, 8), (130, 33, 2), (428, 107, 35)])
def test_dense_panels_compute_the_product(rows, cols, steps):
    weight = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    op = dense_op(weight)
    assert_op_computes(op, weight, steps)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    flipped = np.zeros(rows, np.float32)
    op.matvec(op.arrays, x, flipped, True)                     # panels walked backwards: same product
    np.testing.assert_allclose(flipped, weight @ x, atol=ATOL)


def test_panel_products_into_strided_views():
    """Row-stacked forms hand their parts column slices of the output: they must land in place."""
    weight = np.random.default_rng(0).standard_normal((20, 9)).astype(np.float32)
    xs = np.random.default_rng(1).standard_normal((6, 18)).astype(np.float32)[:, ::2]   # non-contiguous input
    op = dense_op(weight)
    wide = np.zeros((6, 31), np.float32)
    op.matmat(op.arrays, xs, wide[:, 5:25])
    np.testing.assert_allclose(wide[:, 5:25], xs @ weight.T, atol=ATOL)
    assert not wide[:, :5].any() and not wide[:, 25:].any()
    transposed = np.zeros((20, 6), np.float32)
    op.matmat(op.arrays, xs, transposed.T)
    np.testing.assert_allclose(transposed.T, xs @ weight.T, atol=ATOL)
    every_other = np.zeros(40, np.float32)
    op.matvec(op.arrays, xs[0], every_other[::2], False)
    np.testing.assert_allclose(every_other[::2], weight @ xs[0], atol=ATOL)
    assert not every_other[1::2].any()


# Every plan of the Kronecker kernel: direct and transposed orientation, either product first, cropped
# rows and padded inputs, and factors big enough for the heap scratch path.
KRON_CASES = [(800, 200, ((275, 29), (3, 7))), (800, 200, ((3, 7), (275, 29))), (800, 200, ((6, 5), (134, 40))),
              (13, 11, ((4, 3), (4, 4))), (37, 23, ((5, 6), (8, 4))), (2600, 650, ((653, 94), (4, 7)))]


@pytest.mark.parametrize("out_features, in_features, shapes", KRON_CASES)
def test_kronecker_op_matches_its_matrix(out_features, in_features, shapes):
    torch.manual_seed(0)
    form = Kronecker(out_features, in_features, shapes)
    form.reset_parameters(0.3)
    assert_op_computes(form.runtime_op(), form.materialize().detach().numpy())


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda op: pickle.loads(pickle.dumps(op))])
def test_copied_ops_keep_the_slack_their_kernels_read_past_the_end(clone):
    torch.manual_seed(0)
    form = Kronecker(37, 23, ((5, 6), (8, 4)))
    form.reset_parameters(0.3)
    op = form.runtime_op()
    copied = clone(op)
    for original, array in zip(op.arrays, copied.arrays):
        assert array is not original and np.array_equal(array, original) and array.dtype == original.dtype
        owner = array
        while owner.base is not None:
            owner = owner.base
        past_end = owner.ctypes.data + owner.nbytes - (array.ctypes.data + array.nbytes)
        assert past_end >= 16 * array.itemsize                                   # readable past the end
        assert array.ctypes.data % CACHE_LINE == 0                               # and aligned, as when built
    assert_op_computes(copied, form.materialize().detach().numpy())


def test_kronecker_plans_run_along_the_long_side():
    plans = {kron_plan(*a, *b) for _, _, (a, b) in KRON_CASES}
    assert {transposed for transposed, _ in plans} == {True, False}
    assert {left_first for _, left_first in plans} == {True, False}
    assert kron_plan(275, 29, 3, 7)[0] and not kron_plan(3, 7, 275, 29)[0]   # rows 275 wide, not 3


@pytest.mark.parametrize("out_features, in_features, block_size", [(800, 200, 20), (37, 23, 5), (13, 11, 4),
                                                                    (6, 5, 1)])
def test_circulant_op_matches_its_matrix(out_features, in_features, block_size):
    torch.manual_seed(0)
    form = BlockCirculant(out_features, in_features, block_size)      # odd and even blocks, cropped and exact
    form.reset_parameters(0.3)
    assert_op_computes(form.runtime_op(), form.materialize().detach().numpy())


@pytest.mark.parametrize("density", [0.005, 0.3])
def test_sparse_op_picks_entry_list_or_diagonals(density):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((60, 40)) * (rng.random((60, 40)) < density)).astype(np.float32)
    weight[3, :4] = 1.0                                        # one row with several entries
    op = sparse_op(weight)
    assert (op.matvec is entries_matvec) == (np.count_nonzero(weight) < 1.5 * weight.shape[0])
    assert_op_computes(op, weight)


def test_forms_report_runtime_ops():
    weight = torch.randn(8, 6)
    for form in (Dense.from_dense(weight), MaskedSparse.from_dense(weight, density=0.5),
                 Kronecker.from_dense(weight), LowRank.from_dense(weight, rank=2)):
        op = form.runtime_op()
        assert isinstance(op, RuntimeOp) and all(a.dtype.kind in "fiu" for a in op.arrays)


def test_stream_steps_equal_the_whole_run_and_keep_their_own_state():
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(6, [9, 5]).replace_forms("lowrank", layers=[1], rank=2)
    engine = compile(lstm)
    xs = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    start = random_state(lstm.hidden_sizes)
    want, want_state = engine.run(xs, start)
    stream = engine.stream(start)
    got = np.stack([stream.step(x) for x in xs[:4]] + [stream.step(x.astype(np.float64).tolist()) for x in xs[4:]])
    np.testing.assert_allclose(got, want, atol=ATOL)                  # fast path, then lists checked in full
    for a, b in zip(stream.state[0] + stream.state[1], want_state[0] + want_state[1]):
        np.testing.assert_allclose(a, b, atol=ATOL)
    stream.state[0][0][:] = 99.0                                      # a copy: the stream is unaffected
    stream.reset(start)
    frozen = xs[0].copy()
    frozen.flags.writeable = False                                   # not the kernels' exact type: converted
    np.testing.assert_allclose(stream.step(frozen), want[0], atol=ATOL)
    bad = xs[1].copy()
    bad[2] = np.nan
    with pytest.raises(EngineError, match="NaN or inf"):
        stream.step(bad)
    with pytest.raises(EngineError, match=r"shape \(6,\)"):
        stream.step(xs[:2])


def test_stream_of_tokens_gives_the_language_models_logits():
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=40, embed_size=12, hidden_sizes=[16, 10])).eval()
    engine = compile(model)
    tokens = np.array([3, 17, 0, 39, 5])
    logits, _ = engine.run(tokens)
    stream = engine.stream()
    np.testing.assert_allclose(np.stack([stream.step(int(t)) for t in tokens]), logits, atol=1e-4)
    with pytest.raises(EngineError, match="outside the vocabulary"):
        stream.step(40)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 1000])
def test_compiled_finite_check_finds_nan_and_inf_anywhere(size):
    from leanlstm.runtime.engine import _all_finite

    rng = np.random.default_rng(size)
    assert _all_finite(rng.uniform(-3e38, 3e38, size).astype(np.float32))    # huge but finite
    for bad in (np.nan, np.inf, -np.inf):
        for where in {0, size // 2, size - 1}:                                # head, vector body, tail
            x = rng.standard_normal(size).astype(np.float32)
            x[where] = bad
            assert not _all_finite(x)


def test_ops_and_heads_hold_their_weights_on_cache_lines():
    # kernels load 64-byte vectors of the weights: a start off a cache line split every load (1.3x slower int8)
    from leanlstm.runtime.bf16 import pack_bf16
    from leanlstm.runtime.int8 import pack_int8

    weight = np.random.default_rng(0).standard_normal((70, 9)).astype(np.float32)
    buffer = np.zeros(weight.size * 4 + 128, np.uint8)
    start = -buffer.ctypes.data % CACHE_LINE + 16
    off_line = buffer[start:start + weight.nbytes].view(np.float32).reshape(weight.shape)
    off_line[...] = weight
    op = RuntimeOp((off_line,), dense_matvec)
    assert op.arrays[0].ctypes.data % CACHE_LINE == 0 and np.array_equal(op.arrays[0], weight)
    packed = [pack_panels(weight), pack_bf16(weight), *pack_int8(weight)]
    assert [a.ctypes.data % CACHE_LINE for a in packed] == [0] * len(packed)


@pytest.mark.parametrize("size", [650, 16, 7, 33])
def test_the_cell_equals_torchs_on_whole_vectors_the_tail_and_strided_states(size):
    """``kernels.lstm_cell`` runs whole 16-unit vectors in IR and the rest in a loop; a strided ``h`` takes the loop
    throughout and writes only its own elements."""
    from leanlstm.runtime.kernels import lstm_cell

    rng = np.random.default_rng(size)
    gates = (4 * rng.standard_normal(4 * size)).astype(np.float32)
    c0 = rng.standard_normal(size).astype(np.float32)
    g = torch.from_numpy(gates.astype(np.float64)).view(4, size)
    c_ref = torch.sigmoid(g[1]) * torch.from_numpy(c0.astype(np.float64)) + torch.sigmoid(g[0]) * torch.tanh(g[2])
    h_ref = torch.sigmoid(g[3]) * torch.tanh(c_ref)
    h, c = np.zeros(size, np.float32), c0.copy()
    lstm_cell(gates, h, c)
    np.testing.assert_allclose(c, c_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(h, h_ref.numpy(), atol=1e-6)
    both = np.full(2 * size, 7.0, np.float32)
    c = c0.copy()
    lstm_cell(gates, both[::2], c)
    np.testing.assert_allclose(both[::2], h_ref.numpy(), atol=1e-6)
    assert (both[1::2] == 7.0).all()
