import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from leanlstm import LSTM, WeightForm
from leanlstm.cli import main
from leanlstm.nn.forms import Kronecker, LowRank, MaskedSparse
from leanlstm.runs import load_run
from leanlstm.runtime.onnx import ExportError, export_onnx, onnx_gate_order, to_onnx
from leanlstm.tasks.lm import LMConfig, WordLM

TOL = dict(atol=1e-5, rtol=1e-5)


def _run(proto, feeds):
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in feeds.items()})))


def _state_feeds(lstm, h0, c0):
    if lstm.uniform_sizes:
        return {"h0": h0, "c0": c0}
    return {**{f"h0_{i}": h for i, h in enumerate(h0)}, **{f"c0_{i}": c for i, c in enumerate(c0)}}


def _random_state(lstm, batch):
    h0 = [torch.randn(1, batch, size) for size in lstm.hidden_sizes]
    c0 = [torch.randn(1, batch, size) for size in lstm.hidden_sizes]
    return (torch.cat(h0), torch.cat(c0)) if lstm.uniform_sizes else (h0, c0)


def _check_lstm(lstm, x, with_state=True, **options):
    """Export, run with ONNX Runtime and compare output and final state with PyTorch; returns the proto."""
    lstm.eval()
    proto = to_onnx(lstm, state_inputs=with_state, **options)
    hx = _random_state(lstm, x.shape[0 if lstm.batch_first else 1]) if with_state else None
    feeds = {"x": x, **(_state_feeds(lstm, *hx) if with_state else {})}
    got = _run(proto, feeds)
    with torch.no_grad():
        y, (h_n, c_n) = lstm(x, hx)
    np.testing.assert_allclose(got["y"], y.numpy(), **TOL)
    expected = _state_feeds(lstm, h_n, c_n)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name.replace("0", "_n", 1)], value.numpy(), **TOL)
    return proto


def _ops(proto):
    ops = [node.op_type for node in proto.graph.node]
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops += [n.op_type for n in attr.g.node]
    return ops


def _float_values(proto):
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def test_onnx_gate_order_moves_output_gate_second():
    packed = torch.arange(4 * 3)  # [i i i | f f f | g g g | o o o]
    assert onnx_gate_order(packed).tolist() == [0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("with_state", [True, False])
def test_dense_lstm_runs_through_the_onnx_lstm_operator(with_state):
    lstm = LSTM.from_torch(nn.LSTM(10, 16, 2))
    proto = _check_lstm(lstm, torch.randn(9, 3, 10), with_state)
    assert _ops(proto).count("LSTM") == 2 and "Scan" not in _ops(proto)
    assert [i.name for i in proto.graph.input] == ["x", "h0", "c0"][: 3 if with_state else 1]


def test_a_torch_lstm_exports_directly():
    module = nn.LSTM(4, 5, 2).eval()
    x = torch.randn(3, 2, 4)
    got = _run(to_onnx(module, state_inputs=False), {"x": x})
    with torch.no_grad():
        y, (h_n, c_n) = module(x)
    for name, value in (("y", y), ("h_n", h_n), ("c_n", c_n)):
        np.testing.assert_allclose(got[name], value.numpy(), **TOL)


def test_per_layer_sizes_get_one_lstm_node_per_layer():
    lstm = LSTM(10, [24, 16])
    proto = _check_lstm(lstm, torch.randn(6, 2, 10))
    assert _ops(proto).count("LSTM") == 2
    assert [i.name for i in proto.graph.input] == ["x", "h0_0", "h0_1", "c0_0", "c0_1"]
    assert [o.name for o in proto.graph.output] == ["y", "h_n_0", "h_n_1", "c_n_0", "c_n_1"]


def test_streaming_one_step_at_a_time_matches_the_whole_sequence(tmp_path):
    lstm = LSTM(6, 8, 2).replace_forms("lowrank", layers=[1], rank=2).eval()
    x = torch.randn(5, 1, 6)
    session = onnxruntime.InferenceSession(export_onnx(lstm, tmp_path / "lstm.onnx"), providers=["CPUExecutionProvider"])
    h, c = np.zeros((2, 1, 8), np.float32), np.zeros((2, 1, 8), np.float32)
    steps = []
    for t in range(5):
        y, h, c = session.run(None, {"x": x[t:t + 1].numpy(), "h0": h, "c0": c})
        steps.append(y)
    with torch.no_grad():
        expected, _ = lstm(x)
    np.testing.assert_allclose(np.concatenate(steps), expected.numpy(), **TOL)


STRUCTURED = {
    "sparse": lambda w: MaskedSparse.from_dense(w, density=0.2),
    # factors cover 30x15 (for 28x13) and 30x9 (for 28x7): padded input and output
    "kronecker": lambda w: Kronecker.from_dense(w, ((5, 3), (6, 5)) if w.shape[1] == 13 else ((5, 3), (6, 3))),
    "lowrank": lambda w: LowRank.from_dense(w, rank=3),
}


@pytest.mark.parametrize("form", list(STRUCTURED))
def test_structured_forms_export_their_own_products(form):
    lstm = LSTM(13, 7, 2).replace_forms(STRUCTURED[form])
    proto = _check_lstm(lstm, torch.randn(8, 2, 13))
    ops = _ops(proto)
    assert "LSTM" not in ops and ops.count("Scan") == 2
    assert _float_values(proto) <= lstm.stored_params() < lstm.dense_params()  # nothing re-densified
    if form == "sparse":  # gathers in the loop, both products; no product before it
        assert {"Gather", "ReduceSum"} <= set(ops) and "MatMul" not in ops
        assert "ReduceSum" not in [node.op_type for node in proto.graph.node]
    if form == "kronecker":
        assert {"Pad", "Slice"} <= set(ops)


def test_mixed_forms_with_per_layer_sizes_and_a_dense_layer():
    lstm = LSTM(13, [12, 7, 5])
    lstm.layers[0].set_form("ih", MaskedSparse.from_dense(lstm.layers[0].weight_ih.weight, density=0.2))
    lstm.layers[0].set_form("hh", Kronecker.from_dense(lstm.layers[0].weight_hh.weight, ((7, 4), (7, 3))))
    lstm.layers[1].set_form("ih", LowRank.from_dense(lstm.layers[1].weight_ih.weight, rank=4))
    for with_state in (True, False):
        proto = _check_lstm(lstm, torch.randn(6, 3, 13), with_state)
        assert _ops(proto).count("Scan") == 2 and _ops(proto).count("LSTM") == 1  # layer 2 stays dense


def test_scan_recurrence_for_dense_layers_and_batch_first():
    lstm = LSTM(5, 6, 2, batch_first=True)
    proto = _check_lstm(lstm, torch.randn(2, 7, 5), recurrence="scan")
    assert "LSTM" not in _ops(proto)


def test_word_lm_logits_and_state():
    model = WordLM(LMConfig(vocab_size=50, embed_size=12, hidden_sizes=[16, 16])).eval()
    model.lstm.replace_forms("sparse", layers=[1], density=0.2)
    tokens = torch.randint(0, 50, (7, 1))
    state = model.init_state(1)
    state = ([torch.randn_like(h) for h in state[0]], [torch.randn_like(c) for c in state[1]])
    got = _run(to_onnx(model), {"tokens": tokens, "h0": torch.cat(state[0]), "c0": torch.cat(state[1])})
    with torch.no_grad():
        logits, _, (h_n, c_n) = model(tokens, state)
    np.testing.assert_allclose(got["logits"], logits.numpy(), **TOL)
    np.testing.assert_allclose(got["h_n"], torch.cat(h_n).numpy(), **TOL)
    np.testing.assert_allclose(got["c_n"], torch.cat(c_n).numpy(), **TOL)


class Doubled(WeightForm):
    """A form with no ONNX product (and no ``name``, so it stays out of the registry)."""

    def __init__(self, out_features, in_features):
        super().__init__(out_features, in_features)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))

    def materialize(self):
        return 2 * self.weight


def test_a_form_without_an_onnx_product_is_a_clear_error():
    lstm = LSTM(4, 3, 2)
    lstm.layers[1].set_form("hh", Doubled(12, 3))
    with pytest.raises(ExportError, match=r"layers\.1\.weight_hh \(Doubled\) has no ONNX product.*onnx_matvec"):
        to_onnx(lstm)


def test_the_lstm_operator_refuses_structured_forms():
    lstm = LSTM(4, 3).replace_forms("lowrank", rank=1)
    with pytest.raises(ExportError, match="only takes dense weights.*weight_ih is LowRank"):
        to_onnx(lstm, recurrence="lstm")


def test_cli_exports_a_trained_run_and_never_overwrites(tmp_path, tiny_trained_run):
    runner, run_dir = CliRunner(), tiny_trained_run
    result = runner.invoke(main, ["export", str(run_dir), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    path = run_dir / "model.onnx"
    before = path.read_bytes()
    _, model, _ = load_run(run_dir)
    tokens = torch.randint(0, model.config.vocab_size, (5, 1))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 1, 32), np.float32)
    logits = session.run(["logits"], {"tokens": tokens.numpy(), "h0": zeros, "c0": zeros})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(tokens)[0].numpy(), **TOL)

    again = runner.invoke(main, ["export", str(run_dir)])
    assert again.exit_code != 0 and "already exists" in again.output and "--force" in again.output
    assert path.read_bytes() == before
    forced = runner.invoke(main, ["export", str(run_dir), "--force", "--no-state-inputs"])
    assert forced.exit_code == 0, forced.output
    assert [i.name for i in onnx.load(path).graph.input] == ["tokens"]
    assert sorted(p.name for p in run_dir.iterdir() if "onnx" in p.name) == ["model.onnx"]  # no temp files left
    elsewhere = runner.invoke(main, ["export", str(run_dir), "--out", str(tmp_path / "lm.onnx")])
    assert elsewhere.exit_code == 0 and (tmp_path / "lm.onnx").is_file(), elsewhere.output
