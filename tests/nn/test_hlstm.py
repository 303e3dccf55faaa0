"""The H-LSTM cell against a reference written from the paper's equations, gradients, stacks and the seam."""
import pytest
import torch

from leanlstm.nn import LSTM, HLSTMLayer


def reference_hlstm(layer: HLSTMLayer, x, h, c):
    """Dai, Yin & Jha's H-LSTM, one gate at a time, from the layer's dense weights (no dropout)."""
    w1x, w1h = layer.weight_ih.materialize(), layer.weight_hh.materialize()
    b1 = layer.bias_1 if layer.bias else torch.zeros(w1x.shape[0], dtype=x.dtype)
    b2 = layer.bias_2.chunk(4) if layer.bias else [0.0] * 4
    offsets = [0]
    for width in layer.widths:
        offsets.append(offsets[-1] + width)
    outputs = []
    for x_t in x:
        gates = []
        for k, (name, act) in enumerate(zip("ifgo", (torch.sigmoid, torch.sigmoid, torch.tanh, torch.sigmoid))):
            rows = slice(offsets[k], offsets[k + 1])
            z = torch.relu(x_t @ w1x[rows].T + h @ w1h[rows].T + b1[rows])
            gates.append(act(z @ layer.form(f"{name}2").materialize().T + b2[k]))
        i, f, g, o = gates
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


@pytest.mark.parametrize("gate_hidden", [5, (3, 4, 5, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_papers_equations(gate_hidden, bias):
    layer = HLSTMLayer(3, 4, bias=bias, gate_hidden=gate_hidden)
    layer.reset_parameters(0.5)
    x, h0, c0 = torch.randn(6, 2, 3), torch.randn(2, 4), torch.randn(2, 4)
    out, h, c = layer(x, h0[None], c0[None])
    expected, eh, ec = reference_hlstm(layer, x, h0, c0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(h[0], eh, atol=1e-6, rtol=0)
    torch.testing.assert_close(c[0], ec, atol=1e-6, rtol=0)


def test_gradcheck_on_a_tiny_cell():
    layer = HLSTMLayer(2, 3, gate_hidden=(2, 3, 2, 2)).double()
    layer.reset_parameters(0.7)
    x = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: layer(*args)[0], (x, h0, c0))
    weights = [layer.form(m).weight for m in layer.matrices]
    assert torch.autograd.gradcheck(lambda *w: _with_weights(layer, w, x.detach(), h0.detach(), c0.detach()),
                                    tuple(w.detach().clone().requires_grad_() for w in weights))


def _with_weights(layer, weights, x, h0, c0):
    with torch.no_grad():
        originals = [layer.form(m).weight.detach().clone() for m in layer.matrices]
    for matrix, weight in zip(layer.matrices, weights):
        del layer.form(matrix).weight
        layer.form(matrix).weight = weight
    try:
        return layer(x, h0, c0)[0]
    finally:
        for matrix, original in zip(layer.matrices, originals):
            layer.form(matrix).weight = torch.nn.Parameter(original)


def test_gate_dropout_only_in_training():
    layer = HLSTMLayer(3, 4, gate_hidden=8, gate_dropout=0.5)
    x, zeros = torch.randn(5, 2, 3), torch.zeros(1, 2, 4)
    layer.eval()
    torch.testing.assert_close(layer(x, zeros, zeros)[0], layer(x, zeros, zeros)[0])
    layer.train()
    assert not torch.allclose(layer(x, zeros, zeros)[0], layer(x, zeros, zeros)[0])


def test_stacks_mixed_with_lstm_layers_bidirectional_and_per_layer_sizes():
    lstm = LSTM(5, [6, 4], cell=["hlstm", "lstm"], cell_options=[{"gate_hidden": 7}, {}], bidirectional=True)
    assert [layer.cell for layer in lstm.layers] == ["hlstm", "hlstm", "lstm", "lstm"]
    out, (h, c) = lstm(torch.randn(3, 2, 5))
    assert out.shape == (3, 2, 8) and [tuple(t.shape) for t in h] == [(1, 2, 6)] * 2 + [(1, 2, 4)] * 2
    lstm.replace_forms("sparse", layers=[0, 1], density=0.5)
    clone = LSTM.from_config(lstm.config())
    clone.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(clone(x)[0], lstm(x)[0], atol=0, rtol=0)
    lstm(x)[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lstm.parameters())
    with pytest.raises(ValueError, match="proj_size applies to LSTM cells only"):
        LSTM(5, 6, cell="hlstm", proj_size=2)
    with pytest.raises(ValueError, match="one per layer"):
        LSTM(5, 6, 2, cell=["hlstm"])
    with pytest.raises(ValueError, match="gate_hidden must be a positive int"):
        LSTM(5, 6, cell="hlstm", cell_options={"gate_hidden": 0})


def test_select_keeps_the_function_of_the_kept_units():
    torch.manual_seed(1)
    layer = HLSTMLayer(3, 5, gate_hidden=4)
    layer.reset_parameters(0.5)
    groups = {group.name: group for group in layer.groups()}
    dead = {"hidden": torch.tensor([2]), "gate_f": torch.tensor([0, 3]), "gate_g": torch.tensor([1])}
    with torch.no_grad():
        for name, units in dead.items():
            for matrix, dim, index in groups[name].parts:
                layer.form(matrix).weight.index_fill_(dim, index(units), 0.0)
    keep = {"hidden": torch.tensor([0, 1, 3, 4]), "gate_f": torch.tensor([1, 2]), "gate_g": torch.tensor([0, 2, 3])}
    small = layer.select(keep)
    assert small.widths == (4, 2, 3, 4) and small.hidden_size == 4
    x, zeros, small_zeros = torch.randn(6, 2, 3), torch.zeros(1, 2, 5), torch.zeros(1, 2, 4)
    # a dead hidden unit still has an output (from its biases) but nothing reads it: the kept ones are equal
    torch.testing.assert_close(layer(x, zeros, zeros)[0][..., keep["hidden"]], small(x, small_zeros, small_zeros)[0],
                               atol=1e-6, rtol=0)
