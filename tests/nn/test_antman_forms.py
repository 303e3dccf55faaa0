"""AntMan's group forms: the product through the structure, the engine's and ONNX Runtime's products all agree with
the materialised matrix; stored counts; fits; the shuffle."""
import doctest
import importlib
import math

import numpy as np
import onnxruntime
import pytest
import torch

from leanlstm import LSTM
from leanlstm.nn.forms import GroupDense, GroupLowRank, LowRank, build_form
from leanlstm.nn.forms.antman import shuffle_rows, unshuffle_rows
from leanlstm.runtime import compile
from leanlstm.runtime.onnx import to_onnx

TOL = dict(atol=1e-5, rtol=1e-5)

# (out, in) = (32, 16) and (32, 8): the LSTM(16, 8) matrices, every option of both forms.
FORMS = {
    "group-shuffled": lambda w: GroupDense.from_dense(w, groups=4),
    "group-plain": lambda w: GroupDense.from_dense(w, groups=2, shuffle=False),
    "grouplowrank-shuffled": lambda w: GroupLowRank.from_dense(w, groups=2, rank=8),
    "grouplowrank-plain": lambda w: GroupLowRank.from_dense(w, groups=4, rank=8, shuffle=False),
    "grouplowrank-one-group": lambda w: GroupLowRank.from_dense(w, groups=1, rank=3),
}


def test_the_shuffle_interleaves_groups_and_inverts():
    assert shuffle_rows(torch.arange(6), 3).tolist() == [0, 2, 4, 1, 3, 5]      # groups [0 1] [2 3] [4 5]
    x = torch.randn(4, 12, 5)
    torch.testing.assert_close(unshuffle_rows(shuffle_rows(x, 4, 1), 4, 1), x)


@pytest.mark.parametrize("name", FORMS)
def test_materialize_and_the_structured_product_agree_and_rebuild_from_config(name):
    form = FORMS[name](torch.randn(32, 16))
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(form.matvec(x), x @ form.materialize().T, **TOL)
    rebuilt = build_form(form.config())
    rebuilt.load_state_dict(form.state_dict())
    torch.testing.assert_close(rebuilt.materialize(), form.materialize())
    form.materialize().square().sum().backward()                      # training reaches every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in form.parameters())


def test_stored_values_equal_multiply_adds():
    group = GroupDense(2600, 650, groups=10)
    assert group.multiply_adds() == 2600 * 650 // 10 and group.nbytes() == 4 * 169_000
    slr = GroupLowRank(2600, 650, groups=5, rank=250)
    assert slr.multiply_adds() == 250 * (2600 + 650) // 5 == 162_500 and slr.nbytes() == 4 * 162_500
    assert slr.block_rank == 10 and GroupLowRank(2600, 650, groups=5, rank=250, shuffle=False).block_rank == 50
    assert slr.compression() == pytest.approx(2600 * 650 / 162_500)
    one = GroupLowRank(2600, 650, groups=1, rank=52)
    assert one.multiply_adds() == LowRank(2600, 650, rank=52).stored_params()


def test_bad_groups_and_ranks_are_refused():
    with pytest.raises(ValueError, match="divisor of both sizes"):
        GroupDense(30, 16, groups=4)
    with pytest.raises(ValueError, match="multiple of groups\\^2 = 4"):
        GroupLowRank(32, 16, groups=2, rank=6)
    with pytest.raises(ValueError, match="multiple of groups = 2"):
        GroupLowRank(32, 16, groups=2, rank=3, shuffle=False)


def test_group_fit_keeps_the_diagonal_blocks_in_the_shuffled_row_order():
    w = torch.randn(8, 4)
    form = GroupDense.from_dense(w, groups=2)                          # rows 0, 2, 4, 6 are group 0
    m = form.materialize().detach()
    torch.testing.assert_close(m[0::2, :2], w[0::2, :2])
    torch.testing.assert_close(m[1::2, 2:], w[1::2, 2:])
    assert m[0::2, 2:].abs().sum() == 0 and m[1::2, :2].abs().sum() == 0


def test_grouplowrank_is_a_grid_of_independent_low_rank_blocks_fitted_by_svd():
    torch.manual_seed(1)
    w = torch.randn(12, 8)
    form = GroupLowRank.from_dense(w, groups=2, rank=8)                # 2 x 2 blocks, each of rank 2
    fitted = form.materialize().detach()
    for b in range(2):
        for a in range(2):
            block = fitted[6 * b:6 * b + 6, 4 * a:4 * a + 4]
            expected = LowRank.from_dense(w[6 * b:6 * b + 6, 4 * a:4 * a + 4], rank=2).materialize()
            torch.testing.assert_close(block, expected.detach(), **TOL)
    exact = GroupLowRank(12, 8, groups=2, rank=8)
    exact.reset_parameters(0.5)
    target = exact.materialize().detach()
    torch.testing.assert_close(GroupLowRank.from_dense(target, groups=2, rank=8).materialize().detach(), target,
                               **TOL)
    plain = GroupLowRank.from_dense(w, groups=2, rank=4, shuffle=False)  # block diagonal, blocks of rank 2
    assert plain.materialize()[:6, 4:].abs().sum() == 0


@pytest.mark.parametrize("form", [GroupDense(2600, 650, groups=10), GroupLowRank(2600, 650, groups=5, rank=250),
                                  GroupLowRank(2600, 650, groups=5, rank=250, shuffle=False)])
def test_initial_spread_of_the_nonzero_entries(form):
    form.reset_parameters(0.1)
    w = form.materialize().detach()
    assert w[w != 0].std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.1)


def _lstm(name, **sizes):
    torch.manual_seed(0)
    return LSTM(16, 8, 2, **sizes).replace_forms(FORMS[name]).eval()


@pytest.mark.parametrize("name", FORMS)
def test_the_engine_runs_the_structure_and_matches_pytorch(name):
    lstm = _lstm(name)
    assert all(type(form).__name__ in ("GroupDense", "GroupLowRank") for _, form in lstm.forms())
    xs = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    with torch.no_grad():
        want, _ = lstm(torch.from_numpy(xs).unsqueeze(1))
    engine = compile(lstm)
    got, _ = engine.run(xs)                                            # whole sequence (matmat for ih)
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=2e-5)
    state, steps = None, []
    for x in xs:                                                       # one step at a time (matvec)
        y, state = engine.step(x, state)
        steps.append(y)
    np.testing.assert_allclose(np.stack(steps), want[:, 0].numpy(), atol=2e-5)


def _onnx_ops(proto):
    return [node.op_type for node in proto.graph.node] + [
        n.op_type for node in proto.graph.node for attr in node.attribute if attr.g is not None for n in attr.g.node]


@pytest.mark.parametrize("name", FORMS)
def test_onnx_runtime_computes_the_structure_without_densifying(name):
    lstm = _lstm(name)
    proto = to_onnx(lstm, state_inputs=False)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(6, 3, 16)
    y, h_n, c_n = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want, (want_h, want_c) = lstm(x)
    for got, expected in ((y, want), (h_n, want_h), (c_n, want_c)):
        np.testing.assert_allclose(got, expected.numpy(), **TOL)
    ops = _onnx_ops(proto)
    assert "LSTM" not in ops and "Gather" not in ops and "MatMul" in ops
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == 1)
    assert floats <= lstm.stored_params() < lstm.dense_params()       # the blocks, never the dense matrix


def test_mixed_group_forms_with_per_layer_sizes_in_the_engine_and_onnx():
    torch.manual_seed(0)
    lstm = LSTM(16, [8, 4])
    lstm.layers[0].set_form("ih", GroupDense.from_dense(lstm.layers[0].weight_ih.weight, groups=8))
    lstm.layers[0].set_form("hh", GroupLowRank.from_dense(lstm.layers[0].weight_hh.weight, groups=2, rank=4))
    lstm.layers[1].set_form("ih", GroupLowRank.from_dense(lstm.layers[1].weight_ih.weight, groups=4, rank=4,
                                                          shuffle=False))          # layer 1's hh stays dense
    lstm.eval()
    _engine_and_onnx_match_eager(lstm)


def _engine_and_onnx_match_eager(lstm):
    xs = np.random.default_rng(1).standard_normal((5, lstm.input_size)).astype(np.float32)
    with torch.no_grad():
        want, _ = lstm(torch.from_numpy(xs).unsqueeze(1))
    got, _ = compile(lstm).run(xs)
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=2e-5)
    session = onnxruntime.InferenceSession(to_onnx(lstm, state_inputs=False).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": xs[:, None]})[0][:, 0], want[:, 0].numpy(), **TOL)


def test_a_bidirectional_projected_lstm_with_group_forms_in_the_engine_and_onnx():
    torch.manual_seed(0)
    lstm = LSTM(12, 8, 2, bidirectional=True, proj_size=4)
    lstm.replace_forms(lambda w: GroupLowRank.from_dense(w, groups=2, rank=4)).eval()
    assert lstm.layers[3].weight_hr.options() == {"groups": 2, "rank": 4, "shuffle": True}
    _engine_and_onnx_match_eager(lstm)


@pytest.mark.parametrize("name", ["leanlstm.nn.forms.antman", "leanlstm.nn.forms.antman_kernels"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
