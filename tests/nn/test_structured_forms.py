"""The forms added for doping: Doped (S + D with co-matrix dropout), Hybrid (HMD) and BlockCirculant."""
import math

import numpy as np
import pytest
import torch

from leanlstm import LSTM
from leanlstm.nn.forms import BlockCirculant, Doped, Hybrid, Kronecker, LowRank, MaskedSparse, build_form
from leanlstm.nn.forms.circulant import circulant_index
from leanlstm.nn.forms.sparse import csr_nbytes


def _circulant(column):
    return column[circulant_index(len(column))]


# --- block circulant ----------------------------------------------------------------------------------------
def test_circulant_blocks_are_circulant_and_the_product_is_their_convolution():
    form = BlockCirculant(6, 9, block_size=3)                          # 2 x 3 blocks
    form.reset_parameters(1.0)
    w = form.materialize()
    for p in range(2):
        for q in range(3):
            torch.testing.assert_close(w[3 * p:3 * p + 3, 3 * q:3 * q + 3], _circulant(form.vectors[p, q]))
    x = torch.randn(4, 9)
    torch.testing.assert_close(form.matvec(x), x @ w.T, atol=1e-5, rtol=1e-5)


def test_circulant_from_dense_is_exact_for_circulant_matrices_and_the_frobenius_nearest_otherwise():
    source = BlockCirculant(7, 10, block_size=4)                       # padded: 8 x 12 before cropping
    source.reset_parameters(1.0)
    refit = BlockCirculant.from_dense(source.materialize().detach(), block_size=4)
    torch.testing.assert_close(refit.materialize(), source.materialize(), atol=1e-6, rtol=1e-6)
    # Nearest circulant of a 2x2 block [[a, b], [c, d]]: diagonal mean (a + d) / 2, off-diagonal (b + c) / 2.
    block = torch.tensor([[1.0, 2.0], [4.0, 7.0]])
    assert BlockCirculant.from_dense(block, block_size=2).vectors.flatten().tolist() == [4.0, 3.0]
    # ... and no circulant is closer: the residual is orthogonal to every circulant direction.
    w = torch.randn(8, 8)
    residual = w - BlockCirculant.from_dense(w, block_size=4).materialize().detach()
    for k in range(4):
        direction = torch.kron(torch.ones(2, 2), _circulant(torch.eye(4)[k]))
        assert abs((residual * direction).sum().item()) < 1e-5


def test_circulant_bytes_and_spread():
    form = BlockCirculant(2600, 650, block_size=16)
    assert form.nbytes() == math.ceil(2600 / 16) * math.ceil(650 / 16) * 16 * 4
    assert form.compression() == pytest.approx(2600 * 650 / (163 * 41 * 16))
    form.reset_parameters(0.1)
    assert form.materialize().std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.05)


# --- hybrid ---------------------------------------------------------------------------------------------------
def test_hybrid_keeps_top_rows_exactly_and_the_rest_by_svd():
    w = torch.randn(20, 8)
    form = Hybrid.from_dense(w, full_rows=5, rank=3)
    torch.testing.assert_close(form.materialize()[:5], w[:5])
    torch.testing.assert_close(form.materialize()[5:], LowRank.from_dense(w[5:], rank=3).materialize())
    assert form.nbytes() == (5 * 8 + 3 * (15 + 8)) * 4
    low = torch.randn(15, 2) @ torch.randn(2, 8)
    exact = Hybrid.from_dense(torch.cat([w[:5], low]), full_rows=5, rank=2)
    torch.testing.assert_close(exact.materialize()[5:], low, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="full_rows must lie in"):
        Hybrid(20, 8, full_rows=20, rank=1)


def test_hybrid_spread():
    form = Hybrid(2600, 650, full_rows=600, rank=64)
    form.reset_parameters(0.1)
    assert form.materialize().std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.1)


# --- doped ----------------------------------------------------------------------------------------------------
def _doped(shape=(48, 20), density=0.1, **options):
    torch.manual_seed(0)
    return Doped.from_dense(torch.randn(shape), "kronecker", density=density, **options)


def test_doped_is_structure_plus_sparse_and_fully_dense_d_reproduces_the_matrix():
    w = torch.randn(48, 20)
    full = Doped.from_dense(w, "lowrank", {"rank": 2}, density=1.0)
    torch.testing.assert_close(full.materialize(), w, atol=1e-5, rtol=1e-5)
    form = Doped.from_dense(w, "lowrank", {"rank": 2}, density=0.1)
    assert form.sparse.nnz() == round(0.1 * 48 * 20)
    residual = w - form.structured.materialize().detach()
    kept = form.sparse.mask
    # D holds the largest residual entries, unchanged
    torch.testing.assert_close(form.sparse.materialize()[kept], residual[kept])
    assert residual[kept].abs().min() >= residual[~kept].abs().max()


def test_doped_bytes_are_structure_plus_csr():
    form = _doped((2600, 650), density=0.01)
    (m1, n1), (m2, n2) = form.structured.factor_shapes
    nnz = round(0.01 * 2600 * 650)
    assert form.nbytes() == (m1 * n1 + m2 * n2) * 4 + nnz * 6 + 2601 * 4
    assert form.nbytes() == form.structured.nbytes() + csr_nbytes(2600, 650, nnz)


def test_doped_options_rebuild_the_structure_for_checkpoints():
    for structure, options in (("kronecker", {"factor_shapes": [[8, 4], [6, 5]]}), ("lowrank", {"rank": 3}),
                               ("hybrid", {"full_rows": 10, "rank": 2}), ("circulant", {"block_size": 8})):
        form = Doped.from_dense(torch.randn(48, 20), structure, options, density=0.2)
        assert form.options() == {"structure": structure, "structure_options": form.structured.options()}
        clone = build_form(form.config())
        clone.load_state_dict(form.state_dict())
        assert type(clone.structured) is type(form.structured)
        torch.testing.assert_close(clone.materialize(), form.materialize())
        assert clone.nbytes() == form.nbytes()
    with pytest.raises(ValueError, match="unknown weight form 'nope'"):
        Doped(4, 4, structure="nope")


def test_doped_starts_as_its_structure_with_the_dense_spread():
    form = Doped(2600, 650, "kronecker")
    form.reset_parameters(0.1)
    assert form.sparse.materialize().abs().max() == 0
    assert form.materialize().std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.1)


def test_cmr_acts_only_in_training():
    form = _doped(density=0.3, cmr=0.5)
    s_plus_d = form.structured.materialize() + form.sparse.materialize()
    form.eval()
    torch.testing.assert_close(form.training_weight(), s_plus_d)
    torch.testing.assert_close(form.training_weight(), form.training_weight())
    form.train()
    first, second = form.training_weight(), form.training_weight()
    assert not torch.equal(first, second)
    torch.testing.assert_close(form.materialize(), s_plus_d)           # exact in any mode: exports, conversions
    torch.manual_seed(3)
    again = form.training_weight()
    torch.manual_seed(3)
    torch.testing.assert_close(form.training_weight(), again)          # reproducible under torch's RNG
    form.cmr = 0.0
    torch.testing.assert_close(form.training_weight(), s_plus_d)


@pytest.mark.parametrize("mode", ["row", "matrix"])
def test_cmr_drops_whole_rows_or_the_whole_sparse_matrix_with_inverted_scaling(mode):
    form = _doped(density=0.5, cmr=0.25, cmr_mode=mode)
    s, d = form.structured.materialize().detach(), form.sparse.materialize().detach()
    form.train()
    kept_rows = []
    for _ in range(200):
        extra = form.training_weight().detach() - s                    # each row: 0 or D's row / (1 - p)
        kept = (extra != 0).any(1)
        torch.testing.assert_close(extra[kept], d[kept] / 0.75)
        assert not extra[~kept].any()
        if mode == "matrix":
            assert kept.all() or not kept.any()
        kept_rows.append(kept.float().mean().item())
    assert np.mean(kept_rows) == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ValueError, match="cmr_mode"):
        form.cmr_mode = "element"
    with pytest.raises(ValueError, match="probability"):
        form.cmr = 1.0


def test_cmr_in_an_lstm_varies_training_outputs_and_leaves_eval_deterministic():
    lstm = LSTM(10, 12, 2).replace_forms("doped", structure="lowrank", structure_options={"rank": 2},
                                         density=0.2, cmr=0.5)
    x = torch.randn(5, 3, 10)
    lstm.eval()
    with torch.no_grad():
        torch.testing.assert_close(lstm(x)[0], lstm(x)[0])
        for _, form in lstm.forms():
            torch.testing.assert_close(form.materialize(), form.structured.materialize() + form.sparse.materialize())
    lstm.train()
    with torch.no_grad():
        assert not torch.allclose(lstm(x)[0], lstm(x)[0])
        exported = lstm.to_torch()                                     # conversions stay exact in training mode
        for index, layer in enumerate(lstm.layers):
            torch.testing.assert_close(getattr(exported, f"weight_hh_l{index}"), layer.weight_hh.materialize())
    lstm.zero_grad()
    lstm(x)[0].sum().backward()                                        # gradients reach both parts
    form = lstm.layers[0].weight_hh
    assert form.structured.left.grad.abs().sum() > 0 and form.sparse.weight.grad.abs().sum() > 0
    assert not form.sparse.weight.grad[~form.sparse.mask].any()        # pruned entries stay pruned


# --- runtime and ONNX -----------------------------------------------------------------------------------------
def _structured_lstm():
    torch.manual_seed(0)
    lstm = LSTM(11, [13, 9])                                           # 52x11, 52x13, 36x13, 36x9
    lstm.replace_forms("doped", layers=[0], matrices=["ih"], structure="kronecker", density=0.1)
    lstm.replace_forms("hybrid", layers=[0], matrices=["hh"], full_rows=10, rank=3)
    lstm.replace_forms("circulant", layers=[1], matrices=["ih"], block_size=5)
    lstm.replace_forms("doped", layers=[1], matrices=["hh"], structure="circulant",
                       structure_options={"block_size": 4}, density=0.2)
    return lstm.eval()


def test_runtime_runs_the_new_forms_through_their_own_ops(caplog):
    from leanlstm.runtime import RuntimeOp, compile

    lstm = LSTM(11, 13)                                                # one layer: each compiled mix costs seconds
    lstm.replace_forms("doped", matrices=["ih"], structure="circulant", structure_options={"block_size": 5},
                       density=0.2)
    lstm.replace_forms("hybrid", matrices=["hh"], full_rows=10, rank=3)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((6, 11), np.float32)
    with caplog.at_level("WARNING", logger="leanlstm.runtime"):
        got, (h, c) = compile(lstm).run(xs)
    assert "no runtime op" not in caplog.text
    with torch.no_grad():
        want, (h_want, _) = lstm(torch.from_numpy(xs).unsqueeze(1))
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=2e-5)
    np.testing.assert_allclose(h[0], h_want[0].reshape(-1).numpy(), atol=2e-5)
    for _, form in _structured_lstm().forms():                         # every op on its own, step and sequence
        op = form.runtime_op()
        assert isinstance(op, RuntimeOp) and all(a.dtype.kind in "fiu" for a in op.arrays)
        w, x = form.materialize().detach().numpy(), rng.standard_normal((6, form.in_features), np.float32)
        out = np.ones(form.out_features, np.float32)                  # products add into out
        op.matvec(op.arrays, x[0], out, False)
        np.testing.assert_allclose(out, 1 + w @ x[0], atol=2e-5)
        assert op.matmat is not None
        outs = np.ones((6, form.out_features), np.float32)
        op.matmat(op.arrays, x, outs)
        np.testing.assert_allclose(outs, 1 + x @ w.T, atol=2e-5)


def test_onnx_export_writes_the_new_forms_products():
    import onnxruntime

    from leanlstm.runtime.onnx import to_onnx

    lstm = _structured_lstm()
    proto = to_onnx(lstm, state_inputs=False)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(6, 2, 11)
    got = session.run(["y"], {"x": x.numpy()})[0]
    with torch.no_grad():
        want = lstm(x)[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == 1)   # float32 values
    dense = sum(f.out_features * f.in_features for _, f in lstm.forms())
    assert stored < 0.6 * dense                                        # the structure is exported, not densified


def test_kronecker_and_sparse_parts_are_the_existing_forms():
    form = _doped()
    assert isinstance(form.structured, Kronecker) and isinstance(form.sparse, MaskedSparse)
