"""int8 ONNX (``runtime.onnx_int8``): ONNX Runtime's dynamic quantisation of the dense export, and its backend."""
import collections

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

import leanlstm
from leanlstm.cli import main
from leanlstm.runs import load_run
from leanlstm.runtime import latency
from leanlstm.runtime.onnx import ExportError, export_onnx, to_onnx
from leanlstm.runtime.onnx_int8 import (DEFAULT_WEIGHT_TYPE, compare, export_onnx_int8, int8_ops, quantize,
                                        to_onnx_int8, write_onnx_int8)
from leanlstm.tasks.lm import LMConfig, WordLM


def _ops(proto):
    return collections.Counter(node.op_type for node in proto.graph.node)


def _loaded_ops(proto, tmp_path):
    """The op types of the graph ONNX Runtime actually runs, after its own fusions at load."""
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(tmp_path / "optimised.onnx"))


def _lm(vocab=50, embed=12, hidden=(16, 16)):
    torch.manual_seed(0)
    return WordLM(LMConfig(vocab_size=vocab, embed_size=embed, hidden_sizes=list(hidden))).eval()


def _int8_initializers(proto):
    return {t.name for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
            and len(t.dims) >= 2}


def test_the_lstm_operator_becomes_dynamic_quantize_lstm():
    torch.manual_seed(0)
    proto = to_onnx_int8(leanlstm.LSTM(8, [16, 16]).eval())
    ops = _ops(proto)
    assert ops["DynamicQuantizeLSTM"] == 2 and "LSTM" not in ops
    assert "com.microsoft" in {o.domain for o in proto.opset_import}
    assert len(_int8_initializers(proto)) == 4                       # W and R of both layers, int8
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x", "h0", "c0"]       # the float export's signature
    assert [o.name for o in proto.graph.output] == ["y", "h_n", "c_n"]


@pytest.mark.parametrize("weight_type", ["qint8", "quint8"])
def test_word_lm_quantises_lstm_head_and_embedding(tmp_path, weight_type):
    proto = to_onnx_int8(_lm(), weight_type=weight_type)
    ops = int8_ops(proto)
    assert ops["DynamicQuantizeLSTM"] == 2
    assert ops["MatMulInteger"] == 1 and ops["DynamicQuantizeLinear"] == 1      # the decoder head
    assert ops["DequantizeLinear"] == 1                                         # the int8 embedding table
    assert not {"LSTM", "MatMul"} & set(_ops(proto))
    loaded = _loaded_ops(proto, tmp_path)                                       # fused by ONNX Runtime on load
    assert loaded["DynamicQuantizeLSTM"] == 2 and loaded["DynamicQuantizeMatMul"] == 1
    assert "MatMulInteger" not in loaded and "LSTM" not in loaded


def test_the_float_proto_is_left_alone():
    proto = to_onnx(leanlstm.LSTM(8, 16).eval())
    before = proto.SerializeToString()
    quantize(proto)
    assert proto.SerializeToString() == before


@pytest.mark.parametrize("weight_type", ["qint8", "quint8"])
def test_outputs_close_to_float32_and_pytorch(weight_type):
    model = _lm(vocab=200, embed=32, hidden=(64, 64))
    tokens = torch.randint(0, 200, (20, 1))
    h0, c0 = 0.1 * torch.randn(2, 1, 64), 0.1 * torch.randn(2, 1, 64)
    session = onnxruntime.InferenceSession(to_onnx_int8(model, weight_type=weight_type).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    logits, h_n, c_n = session.run(None, {"tokens": tokens.numpy(), "h0": h0.numpy(), "c0": c0.numpy()})
    with torch.no_grad():
        want, _, (want_h, want_c) = model(tokens, (h0, c0))
    want = want.numpy().reshape(logits.shape)
    want_h, want_c = (torch.cat(list(s)) if isinstance(s, (list, tuple)) else s for s in (want_h, want_c))
    scale = np.abs(want).max()
    assert np.abs(logits - want).max() < 0.05 * scale                 # int8: close, not equal
    assert np.abs(h_n - want_h.numpy()).max() < 0.02 and np.abs(c_n - want_c.numpy()).max() < 0.05
    assert np.abs(logits - want).max() > 0                            # it really is quantised
    assert (logits.argmax(-1) == want.argmax(-1)).mean() > 0.8


@pytest.mark.parametrize("args, options", [((16, 32, 2), dict(bidirectional=True, batch_first=True)),
                                           ((16, 32, 2), dict(proj_size=8)), ((16, [32, 24]), {})])
def test_other_layouts_run_close_to_float32(args, options):
    torch.manual_seed(0)
    model = leanlstm.LSTM(*args, **options).eval()
    float_proto = to_onnx(model, structure="never")
    int8_proto = quantize(float_proto)
    errors = compare(model, float_proto, int8_proto)
    assert 0 < errors["relative"] < 0.03
    assert all(value < 0.05 for value in errors.values())
    ops = int8_ops(int8_proto)
    if "proj_size" in options:          # a Scan: the batched input products are int8, the loop's stay float32
        assert ops["MatMulInteger"] == 2 and "DynamicQuantizeLSTM" not in ops
    else:
        assert ops["DynamicQuantizeLSTM"] == 2


def test_file_is_about_a_quarter_of_float32(tmp_path):
    model = _lm(vocab=2000, embed=128, hidden=(128, 128))
    float_path = export_onnx(model, tmp_path / "float.onnx")
    written = write_onnx_int8(model, tmp_path / "int8.onnx")
    float_bytes, int8_bytes = float_path.stat().st_size, written.path.stat().st_size
    assert written.int8_bytes == int8_bytes and written.float_bytes == pytest.approx(float_bytes, rel=0.01)
    assert 3.6 < float_bytes / int8_bytes < 4.05, (float_bytes, int8_bytes)
    assert written.ops["DynamicQuantizeLSTM"] == 2 and written.ops["MatMulInteger"] == 1
    assert 0 < written.errors["relative"] < 0.05
    logits, *_ = onnxruntime.InferenceSession(written.path, providers=["CPUExecutionProvider"]).run(
        None, {"tokens": np.zeros((3, 1), np.int64), "h0": np.zeros((2, 1, 128), np.float32),
               "c0": np.zeros((2, 1, 128), np.float32)})
    assert logits.shape == (3, 1, 2000)


def test_export_refuses_to_overwrite_and_checks_weight_type(tmp_path):
    model = leanlstm.LSTM(4, 8).eval()
    path = export_onnx_int8(model, tmp_path / "m.onnx", state_inputs=False, check=False)
    assert [i.name for i in onnx.load(path).graph.input] == ["x"]
    with pytest.raises(ExportError, match="already exists"):
        export_onnx_int8(model, path, overwrite=False)
    with pytest.raises(ExportError, match="weight_type"):
        to_onnx_int8(model, weight_type="int4")
    assert DEFAULT_WEIGHT_TYPE in ("qint8", "quint8")


def test_backend_runs_through_latency():
    model = _lm(vocab=100, embed=16, hidden=(32, 32))
    result = latency(model, backends=("onnxruntime", "onnxruntime-int8"), seq_len=6, repeats=3, warmup=1)
    assert result["errors"] == {}
    for stats in result["backends"].values():
        assert stats["samples"] == 3 and 0 < stats["min"] <= stats["median"]


def test_cli_exports_int8(tiny_trained_run):
    runner, run_dir = CliRunner(), tiny_trained_run
    result = runner.invoke(main, ["export", str(run_dir), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "smaller" in result.output
    path = run_dir / "model.int8.onnx"
    proto = onnx.load(path)
    assert int8_ops(proto)["DynamicQuantizeLSTM"] == 2
    _, model, _ = load_run(run_dir)
    tokens = torch.randint(0, model.config.vocab_size, (5, 1))
    zeros = np.zeros((2, 1, 32), np.float32)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"tokens": tokens.numpy(), "h0": zeros, "c0": zeros})[0]
    with torch.no_grad():
        want = model.eval()(tokens)[0].numpy().reshape(logits.shape)
    assert np.abs(logits - want).max() < 0.05 * np.abs(want).max()
    again = runner.invoke(main, ["export", str(run_dir), "--precision", "int8"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_export_onnx_precision_keyword(tmp_path):
    import inspect

    if "precision" not in inspect.signature(export_onnx).parameters:
        pytest.skip("runtime.onnx.export_onnx has no precision keyword yet")
    path = export_onnx(leanlstm.LSTM(4, 8).eval(), tmp_path / "m.onnx", precision="int8")
    assert int8_ops(onnx.load(path))["DynamicQuantizeLSTM"] == 1
    with pytest.raises(ExportError, match="precision"):
        export_onnx(leanlstm.LSTM(4, 8).eval(), tmp_path / "n.onnx", precision="int4")
