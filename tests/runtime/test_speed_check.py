"""The speed guard: matrices that run slower than dense are found, reported with their numbers, kept dense on
request; ONNX export writes a layer's structure only where ONNX Runtime runs it faster."""
import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import leanlstm
from leanlstm.methods.pruning import csr_entries_within
from leanlstm.runtime import check_speed, keep_dense_
from leanlstm.runtime.onnx import export_onnx, layer_choices, to_onnx
from leanlstm.runtime.speed_check import SlowDown, check_forms, speed_checks_off, time_form


def _pruned(out: int, inp: int, compression: float) -> leanlstm.MaskedSparse:
    entries = csr_entries_within(out, inp, out * inp * 4 / compression)
    return leanlstm.MaskedSparse.from_dense(torch.randn(out, inp), density=entries / (out * inp))


def test_a_lightly_pruned_matrix_is_reported_slower_with_its_numbers(caplog):
    # 512x128 pruned 1.5x (44% dense): its per-step product measured 15.6 us against 2.6 us dense (5.9x slower)
    torch.manual_seed(0)
    form = _pruned(512, 128, 1.5)
    with caplog.at_level(logging.WARNING, logger="leanlstm.runtime.speed_check"):
        slow = check_forms([("rnn.layers.0.weight_hh", form)])
    assert [s.name for s in slow] == ["rnn.layers.0.weight_hh"]
    assert slow[0].form == "pruned" and slow[0].compression == pytest.approx(1.5, rel=0.01)
    assert slow[0].us > 2 * slow[0].dense_us             # measured margin 5.9x
    assert "rnn.layers.0.weight_hh: pruned 1.5x runs" in caplog.text and "dense per step on leanlstm" in caplog.text


def test_a_heavily_pruned_large_matrix_is_not_reported():
    # 2600x650 pruned 20x: 30 us against 85 us dense per step, 11 against 38 batched (about 3x faster)
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(650, 650)
    for matrix in ("ih", "hh"):
        lstm.layers[0].set_form(matrix, _pruned(2600, 650, 20))
    assert check_speed(lstm) == []
    timing = time_form(lstm.layers[0].weight_hh)
    assert timing.us < 0.7 * timing.dense_us


def test_dense_models_and_disabled_checks_measure_nothing():
    assert check_speed(leanlstm.LSTM(8, 16, 2)) == []
    with speed_checks_off():
        assert check_forms([("w", _pruned(512, 128, 1.5))]) == []


def test_timings_are_cached_per_kind_shape_and_entries():
    torch.manual_seed(0)
    first, second = _pruned(64, 32, 2), _pruned(64, 32, 2)     # same entry count, other positions
    assert time_form(first) is time_form(second)


def test_keep_dense_keeps_the_function():
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(40, 128, 2).replace_forms("sparse", density=0.45)
    x = torch.randn(7, 1, 40)
    before = lstm(x)[0]
    slow = check_speed(lstm, warn=False)
    assert {s.name for s in slow} >= {"layers.0.weight_hh", "layers.1.weight_hh"}
    assert sorted(keep_dense_(lstm, slow)) == sorted(s.name for s in slow)
    assert all(type(lstm.layers[i].weight_hh).__name__ == "Dense" for i in (0, 1))
    torch.testing.assert_close(lstm(x)[0], before)
    assert check_speed(lstm) == []


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        check_speed(leanlstm.LSTM(4, 4), backend="tpu")
    with pytest.raises(ValueError, match="no matrix named layers.7.weight_hh"):
        keep_dense_(leanlstm.LSTM(4, 4), ["layers.7.weight_hh"])
    with pytest.raises(TypeError, match="takes an nn.Module"):
        check_speed("model")


def test_slow_down_message():
    assert str(SlowDown("layers.0.weight_hh", "pruned", 3.0, 26.0, 10.0, "leanlstm")) == (
        "layers.0.weight_hh: pruned 3.0x runs 26.0 us against 10.0 us dense per step on leanlstm (batch 1)")


# --- ONNX: the structure only where ONNX Runtime runs it faster ------------------------------------------------
def test_onnx_auto_writes_a_slow_sparse_layer_as_the_dense_lstm_operator(tmp_path):
    # the gather-based sparse Scan of a 2x128 layer pruned 2.2x measured 270-510 us per step against 4-5 us for
    # the fused dense LSTM operator
    torch.manual_seed(0)
    lstm = leanlstm.LSTM(40, 128, 2).replace_forms("sparse", density=0.3).eval()
    choices = layer_choices(lstm, repeats=3)
    assert [c.structured for c in choices] == [(), ()] and all(c.slower for c in choices)
    assert all(c.structure_us > 5 * c.dense_us for c in choices)
    path = export_onnx(lstm, tmp_path / "auto.onnx", state_inputs=False)
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("LSTM") == 2 and "Scan" not in ops
    assert "Scan" in [node.op_type for node in to_onnx(lstm, state_inputs=False).graph.node]   # "always"
    import onnxruntime

    x = torch.randn(6, 1, 40)
    y = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, lstm(x)[0].detach().numpy(), atol=1e-5)
    slow = check_speed(lstm, backend="onnxruntime", warn=False)
    assert [s.name for s in slow] == ["layers.0", "layers.1"] and slow[0].backend == "onnxruntime"


def test_onnx_structure_never_and_bad_values():
    lstm = leanlstm.LSTM(8, 16).replace_forms("lowrank", rank=2)
    assert "Scan" not in [n.op_type for n in to_onnx(lstm, structure="never").graph.node]
    with pytest.raises(ValueError, match="structure must be one of"):
        to_onnx(lstm, structure="sometimes")
    assert layer_choices(nn.Sequential(leanlstm.LSTM(8, 16))) == []
