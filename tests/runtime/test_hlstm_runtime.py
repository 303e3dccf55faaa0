"""The H-LSTM cell in the engine and in ONNX: the outputs of its PyTorch forward, with any weight forms."""
import numpy as np
import onnxruntime
import pytest
import torch

import leanlstm
from leanlstm.runtime import EngineError, ExportError, compile, latency
from leanlstm.runtime.onnx import to_onnx

TOL = dict(atol=2e-5, rtol=1e-4)


def _hlstm(*args, widths=(3, 4, 5, 6), **kwargs):
    torch.manual_seed(0)
    return leanlstm.LSTM(*args, cell="hlstm", cell_options={"gate_hidden": list(widths)}, **kwargs).eval()


def _onnx(model, x):
    proto = to_onnx(model, state_inputs=False)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (2, True)])
def test_engine_stream_and_onnx_equal_the_pytorch_forward(layers, bidirectional):
    model = _hlstm(5, 7, layers, bidirectional=bidirectional)
    x = torch.randn(9, 1, 5)
    with torch.no_grad():
        want, (h_n, c_n) = model(x)
    ys, (h, c) = compile(model).run(x[:, 0].numpy())
    np.testing.assert_allclose(ys, want[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(np.stack(h), h_n[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(np.stack(c), c_n[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(_onnx(model, x.numpy())[0], want.numpy(), **TOL)
    if not bidirectional:
        stream = compile(model).stream()
        np.testing.assert_allclose(np.stack([stream.step(v) for v in x[:, 0].numpy()]), want[:, 0].numpy(), **TOL)


@pytest.mark.parametrize("form, options", [("sparse", {"density": 0.3}), ("lowrank", {"rank": 2})])
def test_every_matrix_runs_through_its_form(form, options):
    """Grow-and-prune leaves masked sparse matrices; each of the six runs through its own op."""
    model = _hlstm(6, 8, 2, widths=(4, 4, 4, 4)).replace_forms(form, **options)
    assert type(model.layers[0].weight_o2).__name__ != "Dense"
    x = torch.randn(7, 1, 6)
    with torch.no_grad():
        want = model(x)[0]
    np.testing.assert_allclose(compile(model).run(x[:, 0].numpy())[0], want[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(_onnx(model, x.numpy())[0], want.numpy(), **TOL)


def test_a_stack_mixing_cells_runs_layer_by_layer():
    torch.manual_seed(1)
    model = leanlstm.LSTM(5, [6, 4], cell=["hlstm", "lstm"], cell_options=[{"gate_hidden": 3}, {}]).eval()
    x = torch.randn(8, 1, 5)
    with torch.no_grad():
        want = model(x)[0][:, 0].numpy()
    np.testing.assert_allclose(compile(model).run(x[:, 0].numpy())[0], want, **TOL)
    result = latency(model, ("leanlstm", "onnxruntime", "torch"), seq_len=3, repeats=2, warmup=1)
    assert set(result["backends"]) == {"leanlstm", "onnxruntime"}
    assert "LSTM cells only" in result["errors"]["torch"]          # torch.nn.LSTM has no H-LSTM: said, not hidden


def test_bad_shapes_and_the_lstm_operator_are_refused():
    model = _hlstm(5, 7)
    model.layers[0].weight_f2 = leanlstm.nn.Dense(7, 9)             # the f gate's hidden layer has 4 units
    with pytest.raises(EngineError, match=r"weight_f2 is 7x9, the layer needs 7x4"):
        compile(model)
    with pytest.raises(ExportError, match="cannot compute an H-LSTM"):
        to_onnx(_hlstm(5, 7), recurrence="lstm")
