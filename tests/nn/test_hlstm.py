"""The H-LSTM cell against a reference written from the paper's equations, gradients, stacks and the seam."""
import pytest
import torch

from leanlstm.nn import LSTM, HLSTMLayer, hlstm


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


def _with_weights(layer, weights, x, h0, c0, biases=()):
    with torch.no_grad():
        originals = [layer.form(m).weight.detach().clone() for m in layer.matrices]
        original_biases = [layer.bias_1.detach().clone(), layer.bias_2.detach().clone()]
    for matrix, weight in zip(layer.matrices, weights):
        del layer.form(matrix).weight
        layer.form(matrix).weight = weight
    for name, bias in zip(("bias_1", "bias_2"), biases):
        delattr(layer, name)
        setattr(layer, name, bias)
    try:
        return layer(x, h0, c0)[0]
    finally:
        for matrix, original in zip(layer.matrices, originals):
            layer.form(matrix).weight = torch.nn.Parameter(original)
        for name, original in zip(("bias_1", "bias_2")[:len(biases)], original_biases):
            setattr(layer, name, torch.nn.Parameter(original))


def test_gradcheck_of_the_explicit_recurrence():        # equal widths: hlstm_recurrence's own backward
    layer = HLSTMLayer(2, 3, gate_hidden=2).double()
    layer.reset_parameters(0.7)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: torch.cat([t.flatten() for t in layer(*args)]), (x, h0, c0))
    weights = [layer.form(m).weight for m in layer.matrices] + [layer.bias_1, layer.bias_2]
    assert torch.autograd.gradcheck(lambda *w: _with_weights(layer, w[:6], x.detach(), h0.detach(), c0.detach(),
                                                             biases=w[6:]),
                                    tuple(w.detach().clone().requires_grad_() for w in weights))


def _autograd_recurrence(inputs, h, c, w1h, w2, b2, keep):
    """hlstm_recurrence's computation step by step through autograd, given the dropout's keep mask."""
    outputs = []
    for t in range(inputs.shape[0]):
        z = torch.relu(inputs[t] + h @ w1h.T) * keep[t]
        i, f, g, o = torch.baddbmm(b2, z.view(z.shape[0], 4, -1).transpose(0, 1), w2).unbind(0)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def test_explicit_recurrence_equals_autograd_with_dropout_and_every_gradient():
    torch.manual_seed(0)
    T, B, H, w = 5, 3, 4, 6
    args = [torch.randn(T, B, 4 * w), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * w, H) * 0.4,
            torch.randn(4, w, H) * 0.4, torch.randn(4, 1, H)]
    ours = [a.clone().requires_grad_() for a in args]
    theirs = [a.clone().requires_grad_() for a in args]
    seed = torch.random.get_rng_state()
    out = hlstm.hlstm_recurrence(*ours, dropout=0.3)
    torch.random.set_rng_state(seed)                          # the same keep mask as hlstm_recurrence draws
    drawn = (torch.rand(T, B, 4 * w) >= 0.3).float() / 0.7
    expected = _autograd_recurrence(*theirs, drawn)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    grads = [torch.randn_like(t) for t in expected]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(expected, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_explicit_recurrence_under_bfloat16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    layer = HLSTMLayer(8, 16, gate_hidden=12)
    x, zeros = torch.randn(6, 4, 8), torch.zeros(1, 4, 16)
    exact = layer(x, zeros, zeros)[0]
    exact.sum().backward()
    exact_grad = layer.weight_hh.weight.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x, zeros, zeros)[0]
    low.float().sum().backward()
    assert low.dtype == torch.float32                           # the state stays float32
    torch.testing.assert_close(low, exact, atol=0.03, rtol=0)
    torch.testing.assert_close(layer.weight_hh.weight.grad, exact_grad, atol=0.05, rtol=0.05)


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
