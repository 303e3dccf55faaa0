"""latency() and ``leanlstm bench``: structure and sanity of the measurements (no timing thresholds)."""
import importlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import leanlstm
from leanlstm.checkpoint import save_checkpoint
from leanlstm.files import write_json
from leanlstm.cli import main
from leanlstm.runtime import latency, measure
from leanlstm.runtime.backends import get_backend
from leanlstm.runtime.latency import _interleave, medians, model_size, stack_and_model
from leanlstm.tasks.lm import LMConfig, WordLM

ALL = ("leanlstm", "torch", "torch-int8", "onnxruntime", "onnxruntime-forms", "leanlstm-stream",
       "onnxruntime-stream", "leanlstm-int8", "leanlstm-int8-stream", "leanlstm-bf16", "leanlstm-bf16-stream",
       "onnxruntime-int8")


def test_latency_of_a_tiny_lstm_on_every_backend():
    import numba

    model = leanlstm.LSTM(8, 16, 2).replace_forms("sparse", layers=[1], density=0.3)
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)                                  # the caller's settings, to be restored
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        result = latency(model, backends=ALL, seq_len=6, repeats=4, warmup=1)
        after = torch.get_num_threads(), numba.get_num_threads()
    finally:    # conftest pins one thread for the whole session only: left at 2, every later test would run on 2
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)
    assert result["errors"] == {}
    assert set(result["backends"]) == set(ALL)
    for stats in result["backends"].values():
        assert 0 < stats["min"] <= stats["p25"] <= stats["median"] <= stats["p75"] <= stats["max"]
        assert stats["iqr"] == stats["p75"] - stats["p25"] and stats["samples"] == 4
    assert result["threads"] == 1 and result["seq_len"] == 6 and result["unit"] == "us per time step"
    assert after == (2, min(2, numba.config.NUMBA_NUM_THREADS))   # latency() restored them after pinning to 1


@pytest.mark.parametrize("language_model", [False, True])
def test_streaming_backends_compute_the_sequence_one_step_at_a_time(language_model):
    torch.manual_seed(0)
    if language_model:
        model, inputs = WordLM(LMConfig(vocab_size=30, embed_size=6, hidden_sizes=[8, 8])).eval(), np.arange(5)
    else:
        model = leanlstm.LSTM(6, [8, 5]).replace_forms("lowrank", layers=[0], rank=2)
        inputs = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    whole = get_backend("leanlstm")(model, inputs, 1)()[0]
    for name in ("leanlstm-stream", "onnxruntime-stream"):
        steps = get_backend(name)(model, inputs, 1)
        for _ in range(2):                                    # every run starts again from the zero state
            np.testing.assert_allclose(np.stack([np.reshape(y, -1) for y in steps()]), whole, atol=1e-5)


def test_batch_first_models_are_timed_on_one_sequence_by_every_backend():
    torch.manual_seed(0)
    model = leanlstm.LSTM(6, 8, 2, batch_first=True).replace_forms("lowrank", layers=[0], rank=2)
    inputs = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    whole = get_backend("leanlstm")(model, inputs, 1)()[0]
    for name in ("torch", "onnxruntime", "onnxruntime-forms"):
        out = get_backend(name)(model, inputs, 1)()
        out = out if isinstance(out, torch.Tensor) else out[0]
        np.testing.assert_allclose(np.reshape(np.asarray(out), (5, 8)), whole, atol=1e-5, err_msg=name)
    assert model.batch_first                              # the backends changed copies only


def test_a_failing_backend_is_reported_not_fatal():
    model = leanlstm.LSTM(8, [16, 12])
    model.layers[0].set_form("hh", _NoOnnx(64, 16))
    result = latency(model, backends=("leanlstm", "onnxruntime-forms"), seq_len=4, repeats=2, warmup=1)
    assert "leanlstm" in result["backends"]
    assert "onnxruntime-forms" in result["errors"]


class _NoOnnx(leanlstm.nn.forms.WeightForm):
    """A form with neither an ONNX product nor a runtime op: ``W = 0.3 * I``."""

    name = "test_form_without_onnx"

    def materialize(self):
        return 0.3 * torch.eye(self.out_features, self.in_features)

    def nbytes(self):
        return 4


def test_measure_interleaves_models_of_different_kinds():
    lm = WordLM(LMConfig(vocab_size=30, embed_size=6, hidden_sizes=[8, 8]))
    result = measure({"lm": lm, "lstm": leanlstm.LSTM(6, 8)}, ("leanlstm", "torch", "onnxruntime"),
                     seq_len=5, repeats=3, warmup=1)
    assert set(result["models"]) == {"lm", "lstm"}
    assert all(set(m["backends"]) == {"leanlstm", "torch", "onnxruntime"} for m in result["models"].values())


@pytest.mark.parametrize("warm", [False, True])
def test_warm_runs_each_sample_after_an_untimed_run_of_its_own(warm, monkeypatch):
    """``warm``: each timed sample (here 2 runs) comes right after one more run of the same runner, so its caches
    hold its own data; without it the rotation goes straight from one runner's sample to the next runner's."""
    monkeypatch.setattr(importlib.import_module("leanlstm.runtime.latency"), "_calibrate", lambda run, warmup: 2)
    calls = []
    runners = {("a", "x"): lambda: calls.append("a"), ("b", "x"): lambda: calls.append("b")}
    samples = _interleave(runners, seq_len=1, repeats=3, warmup=1, errors={}, warm=warm)
    assert all(len(values) == 3 for values in samples.values())
    per_sample = 3 if warm else 2
    assert len(calls) == 2 * 3 * per_sample
    blocks = [calls[i:i + per_sample] for i in range(0, len(calls), per_sample)]
    assert all(len(set(block)) == 1 for block in blocks)
    assert [block[0] for block in blocks] == ["a", "b", "b", "a", "a", "b"]      # the rotating order


def test_stack_and_model_times_the_lstm_stack_and_the_whole_model():
    big = WordLM(LMConfig(vocab_size=20000, embed_size=16, hidden_sizes=[256, 256]))   # decoder >> stack
    small = WordLM(LMConfig(vocab_size=2000, embed_size=16, hidden_sizes=[8, 8]))
    result = stack_and_model({"big": big, "small": small}, ("leanlstm", "onnxruntime"), seq_len=5, repeats=5)
    for label in ("big", "small"):
        for part in ("lstm", "model"):
            assert set(medians(result["models"][label][part])) == {"leanlstm", "onnxruntime"}
        assert result["models"][label]["errors"] == {}
    big_stack = medians(result["models"]["big"]["lstm"])["leanlstm"]
    assert big_stack > medians(result["models"]["small"]["lstm"])["leanlstm"]
    assert medians(result["models"]["big"]["model"])["leanlstm"] > big_stack   # embedding + decoder on top


def test_model_size_counts_stored_bytes():
    lstm = leanlstm.LSTM(10, 20)
    assert model_size(lstm) == {"params": lstm.dense_params(), "bytes": 4 * lstm.dense_params()}
    lstm.replace_forms("lowrank", rank=2)
    assert model_size(lstm)["params"] == lstm.stored_params()
    for form, options in (("hybrid", {"full_rows": 8, "rank": 2}), ("doped", {"density": 0.1})):
        lstm = leanlstm.LSTM(10, 12)                       # forms made of forms count once
        lstm.replace_forms(form, **options)
        forms = [f for _, f in lstm.forms()]
        biases = 2 * 4 * 12
        assert model_size(lstm) == {"params": lstm.stored_params(),
                                    "bytes": sum(f.nbytes() for f in forms) + 4 * biases}


def _run_dir(path, hidden, form=None):
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=50, embed_size=8, hidden_sizes=hidden))
    if form:
        model.lstm.replace_forms(form, rank=2)
    path.mkdir()
    write_json(path / "config.json", {"task": "ptb", "preset": "tiny", "method": "baseline"})
    save_checkpoint(path / "checkpoint.pt", {"phase": "train", "model_config": model.model_config(),
                                             "model_state": model.state_dict()})
    return path


def test_cli_bench_prints_runs_side_by_side(tmp_path):
    first, second = _run_dir(tmp_path / "dense", [16, 16]), _run_dir(tmp_path / "lowrank", [16, 16], "lowrank")
    runner = CliRunner()
    args = ["bench", str(first), str(second), "--seq-len", "5", "--repeats", "3"]
    result = runner.invoke(main, args + ["--json", "--backend", "leanlstm", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runs = report["runs"]
    assert [r["run"] for r in runs] == [str(first), str(second)]
    assert runs[0]["ratio_to_first"]["leanlstm"] == 1.0 and runs[1]["bytes"] < runs[0]["bytes"]
    assert set(runs[1]["latency_us"]) == {"leanlstm", "torch"}
    assert report["settings"]["warm"] is False
    warm = runner.invoke(main, args + ["--json", "--backend", "leanlstm", "--warm"])
    assert warm.exit_code == 0, warm.output
    assert json.loads(warm.stdout)["settings"]["warm"] is True
    table = runner.invoke(main, args + ["--backend", "leanlstm"])
    assert table.exit_code == 0, table.output
    assert "ratio" in table.stdout and str(second) in table.stdout and "1.00x" in table.stdout
    missing = runner.invoke(main, ["bench", str(tmp_path)])
    assert missing.exit_code != 0 and "not a leanlstm run directory" in missing.output


def test_latency_of_one_model_passes_warm_on(monkeypatch):
    seen = []
    module = importlib.import_module("leanlstm.runtime.latency")
    interleave = module._interleave
    monkeypatch.setattr(module, "_interleave", lambda *args: seen.append(args[-1]) or interleave(*args))
    result = latency(leanlstm.LSTM(4, 8), backends=("leanlstm",), seq_len=3, repeats=2, warm=True)
    assert seen == [True] and result["warm"] is True and result["backends"]["leanlstm"]["median"] > 0


def test_calibration_is_timed_after_the_warm_up():
    import time

    from leanlstm.runtime.latency import _calibrate

    calls = []

    def run():                     # the first call compiles (slow); later ones take microseconds
        calls.append(None)
        if len(calls) == 1:
            time.sleep(0.05)
    assert _calibrate(run, warmup=1) > 10
