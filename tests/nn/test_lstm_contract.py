"""The full ``torch.nn.LSTM`` contract: PyTorch's own ModuleInfo samples and error inputs, bidirectional and
``proj_size`` models, state layouts, conversion both ways, configs and the cell seam."""
import copy

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

from leanlstm.nn import CELLS, LSTM, LSTMLayer
from leanlstm.nn.lstm import dense_lstm_params

MODULE_INFO = next(info for info in module_db if info.module_cls is nn.LSTM)


def _samples(training: bool):
    return MODULE_INFO.module_inputs_func(MODULE_INFO, device="cpu", dtype=torch.float32, requires_grad=False,
                                          training=training)


def _error_inputs():
    return MODULE_INFO.module_error_inputs_func(MODULE_INFO, device="cpu", dtype=torch.float32,
                                                requires_grad=False, training=True)


def _assert_same(expected, got, atol=1e-5):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    else:
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            _assert_same(a, b, atol)


def _cases():
    return [(training, index) for training in (True, False) for index in range(len(_samples(training)))]


@pytest.mark.parametrize("training, index", _cases())
def test_pytorch_module_info_samples(training, index):
    """All 64 of PyTorch's samples for nn.LSTM (32 per mode): same outputs and state as torch.nn.LSTM."""
    sample = _samples(training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(index)
    reference = nn.LSTM(*args, **kwargs).train(training)
    lstm = LSTM(*args, **kwargs).train(training)
    lstm.load_state_dict(LSTM.from_torch(reference).state_dict())
    forward = sample.forward_input
    expected = reference(*forward.args, **forward.kwargs)
    got = lstm(*forward.args, **forward.kwargs)
    _assert_same(expected, got)
    _assert_same(sample.reference_fn(lstm, *forward.args, **forward.kwargs), got)   # it copies lstm itself


@pytest.mark.parametrize("index", range(14))
def test_pytorch_module_error_inputs(index):
    """All 14 of PyTorch's error inputs for nn.LSTM raise the same error type and message."""
    sample = _error_inputs()[index]
    module_input = sample.module_error_input
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    with pytest.raises(sample.error_type, match=sample.error_regex):
        lstm = LSTM(*args, **kwargs)
        assert sample.error_on == ModuleErrorEnum.FORWARD_ERROR
        lstm(*module_input.forward_input.args, **module_input.forward_input.kwargs)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("proj_size", [0, 5])
@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_and_projection_match_torch_in_training(bidirectional, proj_size, batch_first):
    reference = nn.LSTM(6, 9, 3, bidirectional=bidirectional, proj_size=proj_size, batch_first=batch_first)
    lstm = LSTM.from_torch(reference)
    x = torch.randn(4, 7, 6, requires_grad=True)
    state = None if proj_size else (torch.randn(3 * (1 + bidirectional), 4 if batch_first else 7, 9),) * 2
    expected, (eh, ec) = reference(x, state)
    got, (gh, gc) = lstm(x, state)
    _assert_same((expected, eh, ec), (got, gh, gc))
    expected.square().sum().backward()
    expected_grad = {name: p.grad.clone() for name, p in reference.named_parameters()}
    got.square().sum().backward()
    got_grad = {name: p.grad for name, p in LSTM.from_torch(reference).to_torch().named_parameters()}
    back = lstm.to_torch()
    assert set(got_grad) == set(expected_grad)
    for index, layer in enumerate(lstm.layers):   # gradients reach every form, equal to torch's
        suffix = f"_l{index // lstm.num_directions}" + ("_reverse" if index % lstm.num_directions else "")
        for matrix, form in layer.forms():
            torch.testing.assert_close(form.weight.grad, expected_grad[f"weight_{matrix}{suffix}"], atol=1e-4,
                                       rtol=1e-4)
    _assert_same(reference(x.detach())[0], back(x.detach())[0])


def test_per_layer_sizes_with_both_directions_and_projection():
    lstm = LSTM(5, [9, 7], bidirectional=True, proj_size=3)
    assert [layer.input_size for layer in lstm.layers] == [5, 5, 6, 6]
    assert [layer.reverse for layer in lstm.layers] == [False, True, False, True]
    out, (h, c) = lstm(torch.randn(4, 2, 5))
    assert out.shape == (4, 2, 6) and lstm.output_size == 6
    assert [tuple(t.shape) for t in h] == [(1, 2, 3)] * 4
    assert [tuple(t.shape) for t in c] == [(1, 2, 9), (1, 2, 9), (1, 2, 7), (1, 2, 7)]
    x = torch.randn(6, 2, 5)       # the returned state feeds back in (reverse direction: a new sequence)
    first, state = lstm(x[:3])
    again, _ = lstm(x[:3], state)
    assert again.shape == first.shape
    assert lstm.stored_params() == lstm.dense_params() == sum(p.numel() for p in lstm.parameters())


def test_dense_params_equal_torch_for_every_shape():
    for kwargs in ({}, {"bidirectional": True}, {"proj_size": 4}, {"bidirectional": True, "proj_size": 4},
                   {"bias": False, "bidirectional": True}):
        reference = nn.LSTM(7, 10, 3, **kwargs)
        assert LSTM.from_torch(reference).dense_params() == sum(p.numel() for p in reference.parameters())
        assert dense_lstm_params(7, [10] * 3, kwargs.get("bias", True), proj_size=kwargs.get("proj_size", 0),
                                 bidirectional=kwargs.get("bidirectional", False)) == LSTM(7, 10, 3, **kwargs
                                                                                           ).dense_params()


def test_forms_cover_every_matrix_including_the_projection():
    lstm = LSTM(6, 8, 2, bidirectional=True, proj_size=3)
    names = [name for name, _ in lstm.forms()]
    assert len(names) == 12 and "layers.3.weight_hr" in names
    lstm.replace_forms("sparse", density=0.5)
    x = torch.randn(5, 2, 6)
    _assert_same(lstm.to_torch()(x)[0], lstm(x)[0])
    clone = LSTM.from_config(copy.deepcopy(lstm.config()))
    clone.load_state_dict(lstm.state_dict())
    _assert_same(lstm(x), clone(x), atol=0)


def test_replace_forms_is_atomic():
    lstm = LSTM(6, 8, 2)
    before = copy.deepcopy(lstm.state_dict())

    def fails_on_the_last(dense):                 # the fourth of four matrices fails
        if fails_on_the_last.calls == 3:
            raise ValueError("cannot convert")
        fails_on_the_last.calls += 1
        from leanlstm.nn import Dense
        return Dense.from_dense(dense * 2)

    fails_on_the_last.calls = 0
    with pytest.raises(ValueError, match="cannot convert"):
        lstm.replace_forms(fails_on_the_last)
    for key, value in lstm.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    with pytest.raises(ValueError, match="has matrices"):
        lstm.replace_forms("dense", matrices=["hr"])


def test_old_configs_still_load():
    lstm = LSTM(6, [8, 4]).replace_forms("lowrank", layers=[1], rank=2)
    old = {k: v for k, v in lstm.config().items() if k not in ("layers", "cell", "bidirectional", "proj_size")}
    old["forms"] = {name: form.config() for name, form in lstm.forms()}
    clone = LSTM.from_config(old)
    clone.load_state_dict(lstm.state_dict())
    x = torch.randn(3, 2, 6)
    _assert_same(lstm(x)[0], clone(x)[0], atol=0)


def test_conversion_keeps_mode_device_and_dtype():
    reference = nn.LSTM(4, 6, dtype=torch.float64).eval()
    lstm = LSTM.from_torch(reference)
    assert not lstm.training and lstm.layers[0].weight_ih.weight.dtype == torch.float64
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    _assert_same(reference(x)[0], lstm(x)[0], atol=1e-12)
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float32\) does not match"):
        lstm(x.float())


def test_the_cell_seam():
    assert CELLS["lstm"] is LSTMLayer
    layer = LSTMLayer(4, 6, proj_size=2)
    assert layer.config()["cell"] == "lstm" and set(layer.config()["forms"]) == {"ih", "hh", "hr"}
    groups = {group.name: group for group in layer.groups()}
    assert groups["hidden"].size == 6 and not groups["hidden"].output
    assert groups["proj"].size == 2 and groups["proj"].output
    with pytest.raises(ValueError, match="unknown cell"):
        LSTM(4, 6, cell="gru-like")


def test_select_keeps_the_function_of_the_kept_units():
    """Zero the components of some units by hand; the selected smaller layer computes the same outputs."""
    torch.manual_seed(0)
    layer = LSTMLayer(5, 6, proj_size=3)
    layer.reset_parameters(0.5)
    dead_hidden, dead_proj = torch.tensor([1, 4]), torch.tensor([2])
    groups = {group.name: group for group in layer.groups()}
    with torch.no_grad():
        for group, dead in ((groups["hidden"], dead_hidden), (groups["proj"], dead_proj)):
            for matrix, dim, index in group.parts:
                layer.form(matrix).weight.index_fill_(dim, index(dead), 0.0)
    keep = {"hidden": torch.tensor([0, 2, 3, 5]), "proj": torch.tensor([0, 1])}
    small = layer.select(keep)
    assert small.hidden_size == 4 and small.output_size == 2
    x = torch.randn(7, 2, 5)
    out, _, c = layer(x, torch.zeros(1, 2, 3), torch.zeros(1, 2, 6))
    small_out, _, small_c = small(x, torch.zeros(1, 2, 2), torch.zeros(1, 2, 4))
    _assert_same(out[..., keep["proj"]], small_out, atol=1e-6)
