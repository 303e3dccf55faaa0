import pytest
import torch
from torch import nn

import leanlstm
from leanlstm.nn import LSTM


def _pair(batch_first=False, layers=2, bias=True):
    reference = nn.LSTM(10, 16, layers, bias=bias, batch_first=batch_first)
    return reference, LSTM.from_torch(reference)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_with_and_without_state(batch_first, layers, bias):
    reference, lstm = _pair(batch_first, layers, bias)
    x = torch.randn(4, 7, 10)  # (B, T) or (T, B) depending on batch_first
    batch = 4 if batch_first else 7
    h0, c0 = torch.randn(layers, batch, 16), torch.randn(layers, batch, 16)
    for state in (None, (h0, c0)):
        expected, (eh, ec) = reference(x, state)
        got, (gh, gc) = lstm(x, state)
        for a, b in ((expected, got), (eh, gh), (ec, gc)):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unbatched_input_matches_torch():
    reference, lstm = _pair()
    x, h0, c0 = torch.randn(5, 10), torch.randn(2, 16), torch.randn(2, 16)
    expected, (eh, ec) = reference(x, (h0, c0))
    got, (gh, gc) = lstm(x, (h0, c0))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, eh, atol=1e-5, rtol=0)


def test_dropout_between_layers_only_in_training():
    lstm = LSTM(10, 16, 2, dropout=0.5)
    x = torch.randn(6, 3, 10)
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], lstm(x)[0])
    lstm.train()
    assert not torch.allclose(lstm(x)[0], lstm(x)[0])


def test_round_trip_to_torch_and_back():
    lstm = LSTM(10, 16, 2, batch_first=True)
    back = LSTM.from_torch(lstm.to_torch())
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(back(x)[0], lstm(x)[0], atol=1e-6, rtol=0)
    assert lstm.to_torch().batch_first


def test_structured_forms_convert_to_torch():
    lstm = LSTM(10, 16, 2).replace_forms("lowrank", rank=3)
    x = torch.randn(5, 2, 10)
    torch.testing.assert_close(lstm.to_torch()(x)[0], lstm(x)[0], atol=1e-5, rtol=0)


def test_per_layer_sizes():
    lstm = LSTM(12, [9, 5, 7], 3)
    assert lstm.num_layers == 3 and lstm.hidden_size == [9, 5, 7]
    out, (h, c) = lstm(torch.randn(4, 2, 12))
    assert out.shape == (4, 2, 7)
    assert [tuple(t.shape) for t in h] == [(1, 2, 9), (1, 2, 5), (1, 2, 7)]
    # Feeding the returned state back in continues the sequence exactly.
    x = torch.randn(6, 2, 12)
    full, _ = lstm(x)
    first, state = lstm(x[:3])
    second, _ = lstm(x[3:], state)
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(lstm.to_torch()(x)[0], full, atol=1e-6, rtol=0)     # a chain of torch.nn.LSTMs


def test_num_layers_must_match_size_list():
    with pytest.raises(ValueError, match="num_layers=3 but hidden_size lists 2"):
        LSTM(650, [373, 315], 3)


def test_gradients_reach_every_form():
    lstm = LSTM(10, 16, 2)
    lstm.replace_forms("kronecker", layers=[0]).replace_forms("sparse", layers=[1], density=0.3)
    lstm(torch.randn(5, 3, 10))[0].sum().backward()
    for name, parameter in lstm.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_config_round_trip_rebuilds_the_same_model():
    lstm = LSTM(10, [16, 8], 2).replace_forms("kronecker", layers=[0]).replace_forms("lowrank", layers=[1], rank=2)
    clone = LSTM.from_config(lstm.config())
    clone.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 2, 10)
    torch.testing.assert_close(clone(x)[0], lstm(x)[0])


@pytest.mark.parametrize("bad, error, message", [
    (torch.randn(4, 2, 9), ValueError, r"input=10, got \(4, 2, 9\)"),
    (torch.randn(4, 2, 3, 10), ValueError, "expects input of shape"),
    (torch.ones(4, 2, 10, dtype=torch.long), TypeError, "must be floating point"),
])
def test_bad_inputs_get_clear_errors(bad, error, message):
    with pytest.raises(error, match=message):
        LSTM(10, 16, 2)(bad)


def test_bad_states_get_clear_errors():
    lstm = LSTM(10, 16, 2)
    x = torch.randn(4, 3, 10)
    with pytest.raises(ValueError, match=r"h0 of layer 0 must have shape \(3, 16\), got \(5, 16\)"):
        lstm(x, (torch.zeros(2, 5, 16), torch.zeros(2, 5, 16)))
    with pytest.raises(ValueError, match="holds 1 layers, the LSTM has 2"):
        lstm(x, (torch.zeros(1, 3, 16), torch.zeros(1, 3, 16)))
    with pytest.raises(TypeError, match="dtype"):
        lstm(x, (torch.zeros(2, 3, 16, dtype=torch.float64), torch.zeros(2, 3, 16)))
    with pytest.raises(TypeError, match="pair"):
        lstm(x, torch.zeros(2, 3, 16))


def test_from_torch_rejects_what_it_cannot_hold():
    with pytest.raises(TypeError, match="expects a torch.nn.LSTM"):
        LSTM.from_torch(nn.GRU(4, 4))


def test_stored_params_equal_torch_for_dense():
    reference = nn.LSTM(650, 650, 2)
    lstm = leanlstm.LSTM.from_torch(reference)
    assert lstm.stored_params() == lstm.dense_params() == sum(p.numel() for p in reference.parameters())


# --- growing a layer (hardware-guided training's valleys above a trained width) ------------------------------------
@pytest.mark.parametrize("options", [{}, {"proj_size": 3}, {"cell": "hlstm", "gate_hidden": [4, 5, 4, 3]}],
                         ids=["lstm", "projected", "hlstm"])
def test_a_widened_layer_computes_the_same_function_of_its_old_inputs(options):
    from leanlstm.nn import CELLS

    torch.manual_seed(0)
    cell = options.get("cell", "lstm")
    layer = CELLS[cell](5, 7, **{k: v for k, v in options.items() if k != "cell"}).eval()
    x = torch.randn(6, 2, 5)
    zeros = lambda size: torch.zeros(1, 2, size)                          # noqa: E731
    want = layer(x, zeros(layer.output_size), zeros(7))[0]
    places = torch.tensor([0, 2, 3, 5, 7])                                # the old inputs among 9
    wide = layer.widened(hidden_size=10, input_size=9, inputs=places).eval()
    x9 = torch.randn(6, 2, 9)
    x9[..., places] = x
    got = wide(x9, zeros(wide.output_size), zeros(10))[0]
    torch.testing.assert_close(got[..., :layer.output_size], want)
    assert (wide.hidden_size, wide.input_size) == (10, 9)
    with pytest.raises(ValueError, match="only grows a layer"):
        layer.widened(hidden_size=6)


def test_a_grown_bidirectional_stack_and_its_readers_keep_the_function():
    from leanlstm.methods.iss import widened_lstm, widened_reader

    torch.manual_seed(1)
    stack = LSTM(4, [6, 5], bidirectional=True).eval()
    head, reader = nn.Linear(10, 3), nn.LSTM(10, 4)
    x = torch.randn(7, 2, 4)
    out = stack(x)[0]
    want_head, want_reader = head(out), reader(out)[0]
    grown, channels = widened_lstm(stack, [8, 9])
    assert grown.hidden_sizes == [8, 9] and channels.tolist() == [*range(5), *range(9, 14)]
    new_out = grown.eval()(x)[0]
    torch.testing.assert_close(new_out[..., channels], out)
    torch.testing.assert_close(widened_reader(head, 18, channels)(new_out), want_head)
    torch.testing.assert_close(widened_reader(reader, 18, channels).eval()(new_out)[0], want_reader)
