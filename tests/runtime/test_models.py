"""Whole user models through the engine and ONNX Runtime: the outputs of eager PyTorch, and clear refusals."""
import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leanlstm
from leanlstm.nn import LSTMLayer
from leanlstm.runtime import EngineError, ExportError, compile, latency, pipeline_of, stack_and_model
from leanlstm.runtime.onnx import to_onnx
from leanlstm.tasks.lm import LMConfig, WordLM
from tests.user_models import KeywordSpotter, RNNModel, Tagger

TOL = dict(atol=1e-5, rtol=1e-5)


def _session(model, **options):
    proto = to_onnx(model, **options)
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _onnx(model, feeds, **options):
    session = _session(model, **options)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: np.asarray(v) for k, v in feeds.items()})))


def _ops(session_model):
    proto = to_onnx(session_model)
    ops = [node.op_type for node in proto.graph.node]
    return ops + [n.op_type for node in proto.graph.node for a in node.attribute if a.g is not None for n in a.g.node]


# --- the three user models ----------------------------------------------------------------------------------
def test_keyword_spotter_reads_the_last_step():
    model = KeywordSpotter(features=12, hidden=16, keywords=5).eval()
    x = torch.randn(1, 9, 12)                                        # batch_first
    with torch.no_grad():
        want = model(x)[0].numpy()                                   # (5,)
    engine = compile(model)
    got, (h, c) = engine.run(x[0].numpy())
    np.testing.assert_allclose(got, want, **TOL)
    assert got.shape == (5,) and len(h) == 2
    got, _ = engine.run(x.numpy())                                   # (1, T, F): its own batch-first layout
    np.testing.assert_allclose(got, want, **TOL)
    out = _onnx(model, {"x": torch.randn(3, 9, 12)}, state_inputs=False)   # a batch of three, (B, 5)
    assert out["logits"].shape == (3, 5)
    np.testing.assert_allclose(_onnx(model, {"x": x}, state_inputs=False)["logits"][0], want, **TOL)


def test_a_last_step_model_streams_its_head_at_every_step():
    model = KeywordSpotter(features=6, hidden=8, keywords=4).eval()
    x = torch.randn(1, 5, 6)
    stream = compile(model).stream()
    for t in range(5):
        with torch.no_grad():
            want = model(x[:, :t + 1])[0].numpy()                    # as if the sequence ended at step t
        np.testing.assert_allclose(stream.step(x[0, t].numpy()), want, **TOL)


def test_word_language_model_log_probabilities_and_hidden_state():
    model = RNNModel(ntoken=30, ninp=8, nhid=12, nlayers=2).eval()
    tokens = torch.randint(0, 30, (7, 1))
    hidden = tuple(torch.randn_like(t) for t in model.init_hidden(1))
    with torch.no_grad():
        want, (h_n, c_n) = model(tokens, hidden)                     # (T*B, V) after view(-1, ntoken)
    state = ([t.numpy() for t in hidden[0]], [t.numpy() for t in hidden[1]])
    got, (h, c) = compile(model).run(tokens[:, 0].numpy(), state)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)         # log-probabilities: a long product
    np.testing.assert_allclose(np.stack(h), h_n[:, 0].numpy(), **TOL)
    out = _onnx(model, {"tokens": tokens, "h0": hidden[0], "c0": hidden[1]})
    assert out["logits"].shape == (7, 30)                            # the view(-1, ntoken) is kept
    np.testing.assert_allclose(out["logits"], want.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["c_n"], c_n.numpy(), **TOL)


def test_bidirectional_tagger_with_projection():
    model = Tagger(features=6, hidden=12, proj=5, tags=4).eval()
    x = torch.randn(1, 8, 6)
    with torch.no_grad():
        want = model(x)[0].numpy()                                   # (T, tags)
        _, (h_n, c_n) = model.lstm(x)
    engine = compile(model)
    got, (h, c) = engine.run(x[0].numpy())
    np.testing.assert_allclose(got, want, **TOL)
    assert [a.shape for a in h] == [(5,)] * 4 and [a.shape for a in c] == [(12,)] * 4    # (L*D) layers
    np.testing.assert_allclose(np.stack(h), h_n[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(np.stack(c), c_n[:, 0].numpy(), **TOL)
    batch = torch.randn(3, 8, 6)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx(model, {"x": batch}, state_inputs=False)["logits"], model(batch).numpy(),
                                   **TOL)
    with pytest.raises(EngineError, match="lstm is bidirectional.*run\\(\\)"):
        engine.stream()
    with pytest.raises(EngineError, match="bidirectional"):
        engine.step(x[0, 0].numpy())


def test_word_lm_and_a_model_with_input_normalisation():
    lm = WordLM(LMConfig(vocab_size=20, embed_size=6, hidden_sizes=[8, 7])).eval()
    tokens = torch.randint(0, 20, (5, 1))
    with torch.no_grad():
        np.testing.assert_allclose(compile(lm).run(tokens.numpy())[0], lm(tokens)[0][:, 0].numpy(), **TOL)

    class Normalised(nn.Module):                                     # the spoken-digit model's shape
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.randn(6))
            self.register_buffer("std", torch.rand(6) + 0.5)
            self.lstm, self.head = leanlstm.LSTM(6, 9), nn.Linear(9, 3)

        def forward(self, x, state=None):
            output, state = self.lstm((x - self.mean) / self.std, state)
            return F.relu(self.head(output)), state

    model = Normalised().eval()
    x = torch.randn(7, 1, 6)
    with torch.no_grad():
        want = model(x)[0]
    np.testing.assert_allclose(compile(model).run(x.numpy())[0], want[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(_onnx(model, {"x": x}, state_inputs=False)["logits"], want.numpy(), **TOL)


# --- stacks: bidirectional, projections, forms ---------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(bidirectional=True), dict(proj_size=3),
                                     dict(bidirectional=True, proj_size=4, bias=False)])
def test_torch_lstms_with_random_state_engine_and_onnx(options):
    module = nn.LSTM(5, 7, 2, **options).eval()
    D, out = 2 if module.bidirectional else 1, module.proj_size or 7
    x, h0, c0 = torch.randn(6, 1, 5), torch.randn(2 * D, 1, out), torch.randn(2 * D, 1, 7)
    with torch.no_grad():
        want, (h_n, c_n) = module(x, (h0, c0))
    got, (h, c) = compile(module).run(x.numpy(), (h0.numpy(), c0.numpy()))
    np.testing.assert_allclose(got, want[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(np.stack(h), h_n[:, 0].numpy(), **TOL)
    np.testing.assert_allclose(np.stack(c), c_n[:, 0].numpy(), **TOL)
    batch = torch.randn(6, 3, 5)
    h0, c0 = torch.randn(2 * D, 3, out), torch.randn(2 * D, 3, 7)
    with torch.no_grad():
        want, (h_n, c_n) = module(batch, (h0, c0))
    for recurrence in ("auto", "scan"):
        got = _onnx(module, {"x": batch, "h0": h0, "c0": c0}, recurrence=recurrence)
        for name, value in (("y", want), ("h_n", h_n), ("c_n", c_n)):
            np.testing.assert_allclose(got[name], value.numpy(), **TOL, err_msg=f"{recurrence}: {name}")


def test_onnx_uses_the_bidirectional_lstm_operator_and_scan_for_projections():
    assert _ops(nn.LSTM(4, 5, 2, bidirectional=True)).count("LSTM") == 2       # one node per layer
    ops = _ops(nn.LSTM(4, 5, 2, proj_size=3))
    assert "LSTM" not in ops and ops.count("Scan") == 2
    with pytest.raises(ExportError, match="no projection.*layers.0.*weight_hr"):
        to_onnx(nn.LSTM(4, 5, proj_size=3), recurrence="lstm")


def test_structured_forms_on_every_matrix_of_a_bidirectional_projected_stack():
    lstm = leanlstm.LSTM(6, [10, 8], bidirectional=True, proj_size=4, batch_first=True).eval()
    lstm.replace_forms("lowrank", matrices=["hr"], rank=2)
    lstm.replace_forms("sparse", layers=[1, 3], matrices=["ih", "hh"], density=0.4)
    lstm.replace_forms("kronecker", layers=[2], matrices=["ih"])
    x = torch.randn(1, 7, 6)
    state = ([torch.randn(1, 1, 4) for _ in range(4)], [torch.randn(1, 1, s) for s in (10, 10, 8, 8)])
    with torch.no_grad():
        want, (h_n, c_n) = lstm(x, state)
    got, (h, c) = compile(lstm).run(x[0].numpy(), tuple([t.reshape(-1).numpy() for t in part] for part in state))
    np.testing.assert_allclose(got, want[0].numpy(), **TOL)
    for a, b in zip(h + c, h_n + c_n):
        np.testing.assert_allclose(a, b.reshape(-1).numpy(), **TOL)
    feeds = {"x": x, **{f"h0_{i}": t for i, t in enumerate(state[0])}, **{f"c0_{i}": t for i, t in enumerate(state[1])}}
    got = _onnx(lstm, feeds)
    np.testing.assert_allclose(got["y"], want.numpy(), **TOL)
    np.testing.assert_allclose(got["c_n_3"], c_n[3].numpy(), **TOL)


def test_last_step_through_the_final_hidden_state_and_two_stacks():
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.LSTM(5, 8, batch_first=True)
            self.second = leanlstm.LSTM(8, 6, proj_size=3)               # time-major
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            y, _ = self.first(x)
            _, (h, c) = self.second(y.transpose(0, 1))
            return torch.sigmoid(self.out(h[-1]))

    model = Stacked().eval()
    x = torch.randn(1, 6, 5)
    with torch.no_grad():
        want = model(x)[0].numpy()
    assert pipeline_of(model).describe() == ("x (5) -> first (LSTM 8) -> second (LSTM 6, proj 3) -> last step -> "
                                             "out (Linear 3->2) -> sigmoid")
    engine = compile(model)
    np.testing.assert_allclose(engine.run(x[0].numpy())[0], want, **TOL)
    assert len(engine.initial_state()[0]) == 2                       # one cell layer per stack
    got = _onnx(model, {"x": x}, state_inputs=False)
    np.testing.assert_allclose(got["logits"][0], want, **TOL)
    assert {"first.h_n", "second.c_n"} <= set(got)                   # several stacks: names by stack


class _ReturnsTheTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, 2)

    def forward(self, x):
        return self.rnn(x)


class _TransposedIn(nn.Module):
    """Reads (B, T, F), runs a time-major LSTM, returns (T*B, C) probabilities for every step."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))
        out = F.dropout(out, 0.2, self.training).contiguous()
        return self.fc(out.reshape(-1, out.size(-1))).softmax(dim=-1)


class _TimeMajorLastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return torch.tanh(self.fc(out[-1]))


@pytest.mark.parametrize("model, shape, layout", [
    (_ReturnsTheTuple(), (5, 1, 4), ("T", "B", "F")),
    (_TransposedIn(), (1, 5, 4), ("TB", "F")),
    (_TimeMajorLastStep(), (5, 1, 4), ("B", "F")),
])
def test_views_transposes_and_the_last_step_keep_the_models_own_layout(model, shape, layout):
    model.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    pipeline = pipeline_of(model)
    assert pipeline.output_layout == layout
    got, _ = compile(model).run(x.numpy())                          # a batch of one in the model's own layout
    np.testing.assert_allclose(got.reshape(want.shape), want, **TOL)
    out = _onnx(model, {"x": x}, state_inputs=False)
    np.testing.assert_allclose(next(iter(out.values())), want, **TOL)


# --- what the runtime refuses -----------------------------------------------------------------------------------
class _Wrapped(nn.Module):
    def __init__(self, front, back=None):
        super().__init__()
        self.front, self.rnn, self.back = front, nn.LSTM(4, 6), back

    def forward(self, x):
        out, _ = self.rnn(self.front(x))
        return self.back(out) if self.back is not None else out


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.rnn = nn.Conv1d(4, 4, 3, padding=1), nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        out, _ = self.rnn(self.conv(x.transpose(1, 2)).transpose(1, 2))
        return out


class _StateFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.init, self.rnn = nn.Linear(4, 6), nn.LSTM(4, 6)

    def forward(self, x):
        h0 = self.init(x[0]).unsqueeze(0)
        return self.rnn(x, (h0, torch.zeros_like(h0)))[0]


class _FirstStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0][:, 0]


class _NoLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("model, message", [
    (_Conv(), r"conv \(torch.nn.Conv1d\)"),
    (_Wrapped(nn.GRU(4, 4)), r"front \(torch.nn.GRU\)"),
    (_Wrapped(nn.Identity(), nn.LayerNorm(6)), r"back \(torch.nn.LayerNorm\)"),
    (_Wrapped(nn.Identity(), nn.Softmax(dim=0)), "normalises over dim=0"),
    (_StateFromInput(), r"rnn \(torch.nn.LSTM\) starts from a state computed from the model's input"),
    (_FirstStep(), "indexes axis T with 0"),
    (_NoLSTM(), "no LSTM on the path"),
    (nn.GRU(4, 5), r"the model itself, a torch.nn.GRU"),
])
def test_modules_the_runtime_cannot_run_are_named(model, message):
    with pytest.raises(EngineError, match=message):
        compile(model)
    with pytest.raises(ExportError, match=message):
        to_onnx(model)


class _UnregisteredCell(LSTMLayer):
    """An LSTM layer under a cell name the runtime has no entry for."""

    cell = "test-unregistered"


def test_a_cell_without_a_runtime_step_is_named():
    lstm = leanlstm.LSTM(4, 5, cell="test-unregistered")
    with pytest.raises(EngineError, match=r"layers.0: .* no engine step for cell 'test-unregistered' "
                                          r"\(_UnregisteredCell\).*register"):
        compile(lstm)
    with pytest.raises(ExportError, match="no ONNX step for cell 'test-unregistered'"):
        to_onnx(lstm)


def test_latency_times_whole_user_models_and_reports_what_cannot_run():
    backends = ("leanlstm", "torch", "onnxruntime", "leanlstm-stream", "onnxruntime-stream")
    result = latency(KeywordSpotter(features=6, hidden=8, keywords=3), backends, seq_len=4, repeats=2, warmup=1)
    assert result["errors"] == {} and set(result["backends"]) == set(backends)
    result = latency(Tagger(features=6, hidden=8, proj=3), backends, seq_len=4, repeats=2, warmup=1)
    assert set(result["backends"]) == {"leanlstm", "torch", "onnxruntime"}
    assert all("bidirectional" in result["errors"][name] for name in ("leanlstm-stream", "onnxruntime-stream"))
    result = latency(_Conv(), backends, seq_len=4, repeats=2, warmup=1)
    assert result["backends"] == {} and set(result["errors"]) == set(backends)
    assert "conv (torch.nn.Conv1d)" in result["errors"]["torch"]
    parts = stack_and_model({"conv": _Conv()}, ("leanlstm",), seq_len=4, repeats=2)["models"]["conv"]
    assert set(parts["lstm"]) == {"leanlstm"} and "Conv1d" in parts["errors"]["model/leanlstm"]   # its one stack


# --- compressed heads (FormLinear) ------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_a_compressed_decoder_runs_through_its_form_in_the_engine_onnx_and_the_dense_peers(precision):
    from leanlstm.nn import FormLinear
    from leanlstm.nn.forms import BlockSparse
    from leanlstm.runtime.backends import DenseTorch

    model = RNNModel(ntoken=40, ninp=8, nhid=16, nlayers=2).eval()
    dense_weight = model.decoder.weight.detach()
    model.decoder = FormLinear.from_linear(model.decoder, BlockSparse.from_dense(dense_weight, density=0.3,
                                                                                   block_rows=8, block_cols=4))
    tokens = torch.randint(0, 40, (6, 1))
    hidden = model.init_hidden(1)
    with torch.no_grad():
        want = model(tokens, hidden)[0].numpy()
    got, _ = compile(model, precision=precision, choose="always").run(tokens[:, 0].numpy())
    np.testing.assert_allclose(got, want, atol=1e-4 if precision == "float32" else 2e-2)
    if precision == "int8":
        return
    out = _onnx(model, {"tokens": tokens}, state_inputs=False)
    np.testing.assert_allclose(out["logits"], want, atol=1e-4)
    shapes = {tuple(init.dims) for init in to_onnx(model).graph.initializer}
    assert (16, 40) not in shapes and (40, 16) not in shapes            # the decoder written through its blocks
    with torch.no_grad():
        peer = DenseTorch(model)(tokens).reshape(want.shape).numpy()    # torch and its int8: a dense nn.Linear
    np.testing.assert_allclose(peer, want, atol=1e-4)
    dense = pipeline_of(model).dense().stages
    assert not any(isinstance(getattr(stage, "module", None), FormLinear) for stage in dense)
