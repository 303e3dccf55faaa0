"""``LSTM.to_torch()`` for per-layer sizes: a chain of ``torch.nn.LSTM`` layers that behaves as the stack."""
import pytest
import torch

from leanlstm.nn import LSTM
from leanlstm.nn.lstm import TorchLSTMChain


@pytest.mark.parametrize("options", [{}, {"batch_first": True}, {"bidirectional": True}, {"proj_size": 3}],
                         ids=["plain", "batch_first", "bidirectional", "projected"])
def test_the_chain_computes_the_stack_with_its_state(options):
    lstm = LSTM(6, [9, 5, 7], 3, **options).eval()
    chain = lstm.to_torch()
    assert isinstance(chain, TorchLSTMChain) and chain.hidden_sizes == [9, 5, 7] and not chain.training
    assert all(type(layer) is torch.nn.LSTM and layer.num_layers == 1 for layer in chain.layers)
    x = torch.randn(2, 4, 6)
    want, (h, c) = lstm(x)
    got, (h2, c2) = chain(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for ours, theirs in zip(h + c, h2 + c2):
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    state = ([t + 0.5 for t in h], [t - 0.5 for t in c])           # a carried state, as the stack takes it
    torch.testing.assert_close(chain(x, state)[0], lstm(x, state)[0], atol=1e-6, rtol=0)
    unbatched = torch.randn(4, 6)
    torch.testing.assert_close(chain(unbatched)[0], lstm(unbatched)[0], atol=1e-6, rtol=0)


def test_compressed_forms_are_materialised_and_training_mode_kept():
    lstm = LSTM(6, [9, 5], 2, dropout=0.5).replace_forms("sparse", density=0.3, layers=[0])
    chain = lstm.to_torch()
    assert chain.training and chain.dropout == 0.5
    assert torch.equal(chain.layers[0].weight_hh_l0, lstm.layers[0].weight_hh.materialize())
    x = torch.randn(5, 2, 6)
    torch.manual_seed(1)
    assert not torch.equal(chain(x)[0], chain(x)[0])                  # dropout between layers while training
    torch.testing.assert_close(chain.eval()(x)[0], lstm.eval()(x)[0], atol=1e-6, rtol=0)


def test_equal_sizes_still_give_one_torch_lstm():
    assert type(LSTM(6, 8, 2).to_torch()) is torch.nn.LSTM
    with pytest.raises(ValueError, match="LSTM cells only"):
        LSTM(6, [9, 5], 2, cell="hlstm", cell_options={"gate_hidden": 4}).to_torch()
