import math

import pytest
import torch

from leanlstm.nn.forms import (FORMS, BlockCirculant, BlockSparse, Dense, Doped, GroupDense, GroupLowRank, Hybrid, Kronecker,
                               LowRank, MaskedSparse, build_form, kron_factor_shapes)
from leanlstm.nn.gates import gate_rows, split_gates

SHAPES = [(64, 16), (52, 13), (28, 7), (4, 3)]


def _forms(shape):
    weight = torch.randn(shape)
    yield Dense.from_dense(weight)
    yield MaskedSparse.from_dense(weight, density=0.25)
    yield Kronecker.from_dense(weight)
    yield LowRank.from_dense(weight, rank=min(shape) // 2 or 1)
    yield Hybrid.from_dense(weight, full_rows=shape[0] // 3 or 1, rank=1)
    yield BlockCirculant.from_dense(weight, block_size=4)
    yield BlockCirculant.from_dense(weight, block_size=5)                  # pads and crops every shape here
    yield Doped.from_dense(weight, "kronecker", density=0.1)
    yield Doped.from_dense(weight, "circulant", {"block_size": 3}, density=0.3)
    yield GroupDense.from_dense(weight, groups=math.gcd(*shape))
    yield GroupLowRank.from_dense(weight, groups=1, rank=1)
    yield BlockSparse.from_dense(weight, density=0.5, block_rows=4, block_cols=2)


@pytest.mark.parametrize("shape", SHAPES)
def test_matvec_agrees_with_materialize(shape):
    for form in _forms(shape):
        x = torch.randn(3, 5, shape[1])
        torch.testing.assert_close(form.matvec(x), x @ form.materialize().T, atol=1e-5, rtol=1e-5)
        assert form.materialize().shape == shape


def test_every_registered_form_is_tested():
    # forms defined by other test modules register too; only the package's own must be listed here
    package_forms = {name for name, cls in FORMS.items() if cls.__module__.startswith("leanlstm.")}
    assert package_forms == {"dense", "sparse", "kronecker", "lowrank", "doped", "hybrid", "circulant",
                             "group", "grouplowrank", "blocksparse"}
    assert {form.name for form in _forms((8, 4))} == package_forms      # and the tests here build each one


def test_parameter_counts():
    weight = torch.randn(2600, 650)
    assert Dense.from_dense(weight).stored_params() == 2600 * 650
    lowrank = LowRank.from_dense(weight, rank=64)
    assert lowrank.stored_params() == 64 * (2600 + 650)
    kron = Kronecker.from_dense(weight)
    (m1, n1), (m2, n2) = kron.factor_shapes
    assert kron.stored_params() == m1 * n1 + m2 * n2 == 50 * 25 + 52 * 26
    sparse = MaskedSparse.from_dense(weight, density=0.1)
    nnz = round(0.1 * weight.numel())
    assert sparse.nnz() == nnz
    # values (4 B) + int16 column indices (2 B) + int32 row pointers, as float32-equivalents
    assert sparse.nbytes() == nnz * 6 + 2601 * 4
    assert sparse.stored_params() == math.ceil((nnz * 6 + 2601 * 4) / 4)
    assert sparse.compression() == pytest.approx(weight.numel() * 4 / sparse.nbytes())


def test_kronecker_recovers_an_exact_kronecker_product():
    a, b = torch.randn(5, 3), torch.randn(4, 6)
    form = Kronecker.from_dense(torch.kron(a, b), factor_shapes=((5, 3), (4, 6)))
    torch.testing.assert_close(form.materialize(), torch.kron(a, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2600, 650), (1492, 373), (1260, 315), (28, 7), (13, 11)])
def test_kronecker_factor_shapes_cover_any_matrix(shape):
    (m1, n1), (m2, n2) = kron_factor_shapes(*shape)
    assert m1 * m2 >= shape[0] and n1 * n2 >= shape[1]
    assert m1 * m2 <= shape[0] * 1.05 + 1 and n1 * n2 <= shape[1] * 1.05 + 1


def test_kronecker_factors_are_balanced():
    # A split like (2, 1300) would make the product little more than an outer product.
    (m1, n1), (m2, n2) = kron_factor_shapes(2600, 650)
    assert max(m1, m2) / min(m1, m2) < 1.1 and max(n1, n2) / min(n1, n2) < 1.1


def test_lowrank_is_exact_for_low_rank_matrices():
    weight = torch.randn(30, 4) @ torch.randn(4, 20)
    torch.testing.assert_close(LowRank.from_dense(weight, rank=4).materialize(), weight, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="rank must lie in"):
        LowRank.from_dense(weight, rank=25)


def test_sparse_keeps_largest_magnitudes_and_stays_sparse_after_updates():
    weight = torch.tensor([[1.0, -5.0], [0.5, 3.0]])
    form = MaskedSparse.from_dense(weight, density=0.5)
    assert form.materialize().tolist() == [[0.0, -5.0], [0.0, 3.0]]
    form.materialize().sum().backward()
    with torch.no_grad():
        form.weight -= 0.1 * form.weight.grad
    assert (form.materialize() != 0).sum() == 2
    with pytest.raises(ValueError, match="mask shape"):
        form.set_mask(torch.ones(3, 3))


def test_reset_parameters_matches_the_dense_spread():
    # Structured forms drawn from scratch should give W entries of the spread uniform(-r, r) has.
    r = 0.1
    for form in (Kronecker(2600, 650), LowRank(2600, 650, rank=64), Dense(2600, 650)):
        form.reset_parameters(r)
        assert form.materialize().std().item() == pytest.approx(r / math.sqrt(3), rel=0.1)


def test_build_form_from_config():
    form = Kronecker.from_dense(torch.randn(28, 7))
    clone = build_form(form.config())
    clone.load_state_dict(form.state_dict())
    torch.testing.assert_close(clone.materialize(), form.materialize())
    with pytest.raises(ValueError, match="unknown weight form 'nope'"):
        build_form({"name": "nope", "out_features": 1, "in_features": 1})


def test_gate_rows_select_units_in_all_four_gates():
    assert gate_rows(3, [1]).tolist() == [1, 4, 7, 10]
    i, f, g, o = split_gates(torch.arange(8))
    assert (i.tolist(), o.tolist()) == ([0, 1], [6, 7])
    with pytest.raises(IndexError):
        gate_rows(3, [3])


def test_an_evaluation_builds_the_matrix_once_and_rebuilds_it_when_the_form_changes():
    form = MaskedSparse.from_dense(torch.randn(6, 5), density=0.5)
    calls = []
    build = form.training_weight
    form.training_weight = lambda: calls.append(1) or build()
    first = form.forward_weight()                                    # training mode: built at every call
    form.forward_weight()
    assert len(calls) == 2 and first.requires_grad
    form.eval()
    with torch.no_grad():
        cached = form.forward_weight()
        assert form.forward_weight() is cached and len(calls) == 3          # evaluation: built once
        form.weight.mul_(2)                                          # a parameter changed in place (a step)
        torch.testing.assert_close(form.forward_weight(), 2 * cached)
        form.mask[0, 0] = not form.mask[0, 0]                        # a buffer changed
        torch.testing.assert_close(form.forward_weight(), form.materialize())
        assert len(calls) == 5
    assert form.forward_weight().requires_grad and len(calls) == 6   # autograd on: never the cache
    form.train()
    assert "_eval_weight" not in form.__dict__                       # leaving evaluation drops it
