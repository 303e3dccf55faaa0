"""FormLinear: an nn.Linear whose weight is a weight form (a compressed head or decoder)."""
import pytest
import torch
from torch import nn

from leanlstm.nn import FormLinear
from leanlstm.nn.forms import BlockSparse, LowRank, MaskedSparse


def test_a_dense_form_linear_computes_what_the_linear_did_and_trains_its_form():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    head = FormLinear.from_linear(linear)
    x = torch.randn(3, 5, 12)
    assert torch.allclose(head(x), linear(x), atol=1e-6)
    head(x).sum().backward()
    assert head.form.weight.grad is not None and head.bias.grad is not None


@pytest.mark.parametrize("make", [lambda w: MaskedSparse.from_dense(w, density=0.4),
                                  lambda w: BlockSparse.from_dense(w, density=0.5, block_rows=4, block_cols=4),
                                  lambda w: LowRank.from_dense(w, rank=3)], ids=["sparse", "blocks", "lowrank"])
def test_a_structured_head_multiplies_by_its_materialised_matrix(make):
    torch.manual_seed(1)
    linear = nn.Linear(16, 8)
    head = FormLinear.from_linear(linear, make(linear.weight.detach()))
    x = torch.randn(4, 16)
    expected = x @ head.form.materialize().T + linear.bias
    assert torch.allclose(head(x), expected, atol=1e-5)
    assert torch.allclose(head.to_linear()(x), expected, atol=1e-5)
    assert head.nbytes() == head.form.nbytes() + 4 * 8


def test_config_rebuilds_the_same_structure_for_the_state_dict():
    linear = nn.Linear(16, 8, bias=False)
    head = FormLinear.from_linear(linear, MaskedSparse.from_dense(linear.weight.detach(), density=0.25))
    fresh = FormLinear.from_config(head.config())
    fresh.load_state_dict(head.state_dict())
    x = torch.randn(2, 16)
    assert fresh.bias is None and torch.equal(fresh(x), head(x))


def test_a_form_of_the_wrong_shape_or_kind_is_refused():
    linear = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"the form is \(8, 15\)"):
        FormLinear.from_linear(linear, MaskedSparse(8, 15))
    with pytest.raises(TypeError, match="takes a WeightForm"):
        FormLinear(linear)
