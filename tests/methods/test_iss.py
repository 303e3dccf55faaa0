"""ISS (Wen et al. 2018): components, regulariser, thresholding, removal, fine-tuning and whole runs."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.methods import METHODS
from leanlstm.methods.iss import (ISS, FreezeZeros, ISSConfig, ISSRegularizer, components, search_strength,
                                  shrink, surviving, zero_components_)
from leanlstm.nn import LSTM
from leanlstm.nn.lstm import dense_lstm_params
from leanlstm.report import plot_components
from leanlstm.runs import RunConfig, compress_run, train_run
from leanlstm.tasks.lm import LMConfig, WordLM
from leanlstm.train import Callback


def _lm(hidden_sizes, vocab=7, embed=3):
    model = WordLM(LMConfig(vocab, embed, list(hidden_sizes), 0.0, 0.5))
    return model.eval()


def _entries(group, unit):
    """{parameter name: {(row, col), ...}} of one component, from its parts."""
    params = {"ih": group.weight_ih, "hh": group.weight_hh, "consumer": group.consumer}
    shapes = dict(zip(group.names, (p.shape if p is not None else None for p in params.values())))
    out = {}
    for part in group.parts(unit):
        rows = part.rows if part.rows is not None else range(shapes[part.name][0])
        cols = part.cols if part.cols is not None else range(shapes[part.name][1])
        out.setdefault(part.name, set()).update((r, c) for r in rows for c in cols)
    return out


def _grid(rows, cols):
    return {(r, c) for r in rows for c in cols}


# --- components -----------------------------------------------------------------------------------------------
def test_component_index_sets_on_a_stack_with_unequal_sizes():
    layers = components(_lm([2, 3]))  # embedding 3 -> layer 0 (2 units) -> layer 1 (3 units) -> decoder (7 words)
    assert [g.hidden_size for g in layers] == [2, 3]
    # layer 0, unit 1: gate rows 1, 3, 5, 7 of both matrices, column 1 of its weight_hh and of layer 1's weight_ih
    assert _entries(layers[0], 1) == {
        "lstm.layers.0.weight_ih.weight": _grid([1, 3, 5, 7], range(3)),
        "lstm.layers.0.weight_hh.weight": _grid([1, 3, 5, 7], range(2)) | _grid(range(8), [1]),
        "lstm.layers.1.weight_ih.weight": _grid(range(12), [1]),
    }
    # layer 1 (top), unit 0: gate rows 0, 3, 6, 9; its consumer is the decoder
    assert _entries(layers[1], 0) == {
        "lstm.layers.1.weight_ih.weight": _grid([0, 3, 6, 9], range(2)),
        "lstm.layers.1.weight_hh.weight": _grid([0, 3, 6, 9], range(3)) | _grid(range(12), [0]),
        "decoder.weight": _grid(range(7), [0]),
    }
    # a bare LSTM's top layer has no consumer
    bare = components(LSTM(3, [2, 3]))
    assert bare[0].names[2] == "layers.1.weight_ih.weight"
    assert _entries(bare[1], 2) == {
        "layers.1.weight_ih.weight": _grid([2, 5, 8, 11], range(2)),
        "layers.1.weight_hh.weight": _grid([2, 5, 8, 11], range(3)) | _grid(range(12), [2]),
    }


@pytest.mark.parametrize("bare", [False, True])
def test_vectorised_norms_equal_the_explicit_index_sets(bare):
    model = LSTM(4, [3, 5, 2]) if bare else _lm([3, 5, 2])
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        params["layers.1.weight_hh.weight" if bare else "lstm.layers.1.weight_hh.weight"][7, 2] = 0.0
    for group in components(model):
        expected_sq, expected_nz = [], []
        for unit in range(group.hidden_size):
            values = [params[name][r, c] for name, entries in _entries(group, unit).items() for r, c in entries]
            expected_sq.append(sum(float(v) ** 2 for v in values))
            expected_nz.append(sum(1 for v in values if v != 0))
        assert group.squared_norms().tolist() == pytest.approx(expected_sq, rel=1e-5)
        assert group.nonzeros().tolist() == expected_nz


def test_non_dense_forms_and_other_models_are_refused():
    model = _lm([4, 4])
    model.lstm.replace_forms("lowrank", rank=2, layers=[1])
    with pytest.raises(ValueError, match="lstm.layers.1.weight_ih is a LowRank form"):
        components(model)
    with pytest.raises(TypeError, match="from_torch"):
        components(torch.nn.LSTM(3, 4))


# --- removal --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[6], [6, 4], [5, 7, 3]])
@pytest.mark.parametrize("bare", [False, True])
def test_shrink_equals_the_masked_model(sizes, bare):
    model = LSTM(3, sizes) if bare else _lm(sizes)
    for layer in model.lstm.layers if not bare else model.layers:
        torch.nn.init.uniform_(layer.bias_ih, -0.5, 0.5)  # dead units keep live biases: h_k is not zero
    dead = {layer: list(range(1, size, 2)) for layer, size in enumerate(sizes)}   # every other unit
    for layer, units in dead.items():
        zero_components_(model, layer, units)
    keep = [[u for u in range(size) if u not in dead[layer]] for layer, size in enumerate(sizes)]
    small = shrink(model)
    lstm = small if bare else small.lstm
    assert lstm.hidden_sizes == [len(k) for k in keep]
    assert (model if bare else model.lstm).hidden_sizes == sizes  # the input model is left alone
    assert lstm.stored_params() == dense_lstm_params(3, lstm.hidden_sizes)
    x = torch.randn(6, 2, 3) if bare else torch.randint(0, 7, (6, 2))
    with torch.no_grad():
        if bare:
            out, (h, c) = model(x)
            out_s, (h_s, c_s) = small(x)
            torch.testing.assert_close(out_s, out[..., keep[-1]], rtol=1e-5, atol=1e-6)
        else:
            out, _, (h, c) = model(x)
            out_s, _, (h_s, c_s) = small(x)
            torch.testing.assert_close(out_s, out, rtol=1e-5, atol=1e-6)   # logits
            assert small.decoder.in_features == len(keep[-1])
        h, c = _per_layer(h), _per_layer(c)
        for layer, units in enumerate(keep):
            torch.testing.assert_close(_per_layer(h_s)[layer], h[layer][..., units], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(_per_layer(c_s)[layer], c[layer][..., units], rtol=1e-5, atol=1e-6)
    if not bare:  # the shrunk model round-trips through a checkpoint's config and state
        again = WordLM.from_model_config(small.model_config())
        again.load_state_dict(small.state_dict())
        assert again.config.hidden_sizes == lstm.hidden_sizes


def _per_layer(state):
    return list(state.split(1)) if isinstance(state, torch.Tensor) else list(state)


def test_a_partly_zero_component_keeps_its_unit():
    model = _lm([4, 3])
    zero_components_(model, 0, [2])
    with torch.no_grad():
        model.lstm.layers[1].weight_ih.weight[5, 2] = 0.1   # one entry of unit 2's consumer column is left
        model.lstm.layers[0].weight_ih.weight[1] = 0.0      # unit 1 loses only its input-gate row
    assert surviving(model) == [4, 3]
    assert shrink(model).lstm.hidden_sizes == [4, 3]
    with torch.no_grad():
        model.lstm.layers[1].weight_ih.weight[5, 2] = 0.0
    assert shrink(model).lstm.hidden_sizes == [3, 3]


def test_a_layer_that_loses_every_unit_keeps_one():
    model = _lm([3, 2])
    zero_components_(model, 1, [0, 1])
    assert surviving(model) == [3, 0] and shrink(model).lstm.hidden_sizes == [3, 1]


# --- regulariser, thresholding, freezing ----------------------------------------------------------------------
def test_regulariser_gradient_is_strength_times_w_over_component_norm():
    model, strength, eps = _lm([2, 3]), 0.3, 1e-3
    regularizer = ISSRegularizer(strength=strength, eps=eps)
    regularizer.penalty(model).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = {}
    for group in components(model):
        for unit in range(group.hidden_size):
            entries = _entries(group, unit)
            norm = math.sqrt(sum(float(params[n][r, c]) ** 2 for n, e in entries.items() for r, c in e) + eps)
            norms[group.layer, unit] = norm
            for name, cells in entries.items():
                for r, c in cells:
                    expected[name][r, c] += strength * params[name][r, c] / norm
    for name, grad in grads.items():
        if "bias" in name or "embedding" in name:
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
    # layer 0 weight_hh row 2 (unit 0's forget gate) column 1 lies in components 0 and 1: it gets both terms
    grad, w = grads["lstm.layers.0.weight_hh.weight"], params["lstm.layers.0.weight_hh.weight"]
    both = strength * w[2, 1] * (1 / norms[0, 0] + 1 / norms[0, 1])
    torch.testing.assert_close(grad[2, 1], both)
    # column 0 of the same row is unit 0's own feedback: one component, one term
    torch.testing.assert_close(grad[2, 0], strength * w[2, 0] / norms[0, 0])


def test_thresholding_zeroes_small_weights_only():
    model = _lm([3, 3])
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ISSRegularizer(threshold=0.05, group_rule=False).after_step(SimpleNamespace(model=model))
    for name, p in model.named_parameters():
        if name.endswith("weight_ih.weight") or name.endswith("weight_hh.weight") or name == "decoder.weight":
            small = before[name].abs() < 0.05
            assert small.any() and not p[small].any()
            assert torch.equal(p[~small], before[name][~small])
        else:  # biases and the embedding are not in any component
            assert torch.equal(p, before[name])


def test_group_rule_zeroes_a_hovering_component_that_the_element_rule_leaves():
    """A collapsed component whose entries hover around the threshold dies whole only under the group rule."""
    def hovering():
        model = _lm([4, 5])
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-0.1, 0.1)
            group = components(model)[0]
            group.zero_(torch.tensor([2]))
            group.weight_hh[:, 2] = 1.5e-3 * torch.randn(group.weight_hh.shape[0]).sign()  # above the threshold
        return model

    element_only = hovering()
    ISSRegularizer(threshold=1e-3, group_rule=False).after_step(SimpleNamespace(model=element_only))
    assert surviving(element_only) == [4, 5]
    model = hovering()
    ISSRegularizer(threshold=1e-3).after_step(SimpleNamespace(model=model))  # RMS of unit 2: 16 of its 60+ entries
    assert surviving(model) == [3, 5]
    assert shrink(model).lstm.hidden_sizes == [3, 5]


def test_freeze_keeps_zeros_zero_while_fine_tuning():
    model = _lm([4, 3]).train()
    zero_components_(model, 0, [1])
    with torch.no_grad():
        model.decoder.weight[0, 0] = 0.0
    freeze, trainer = FreezeZeros(), SimpleNamespace(model=model)
    freeze.on_train_begin(trainer)
    zeros = [~m for m in freeze.masks]
    assert sum(int(z.sum()) for z in zeros) == 12 + 28 + 12 + 1  # unit 1's rows, column, consumer; decoder[0, 0]
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        tokens = torch.randint(0, 7, (5, 2))
        optimizer.zero_grad()
        model(tokens, targets=torch.randint(0, 7, (5, 2)))[1].backward()
        optimizer.step()
        freeze.after_step(trainer)
    weights = [model.lstm.layers[0].weight_ih.weight, model.lstm.layers[0].weight_hh.weight,
               model.lstm.layers[1].weight_ih.weight, model.lstm.layers[1].weight_hh.weight, model.decoder.weight]
    for weight, zero in zip(weights, zeros):
        assert not weight[zero].any()
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))  # the rest did train
    assert shrink(model).lstm.hidden_sizes == [3, 3]


def test_component_history_is_in_every_callback_state():
    method = ISS(ISSConfig(strength=0.1))
    model = _lm([4, 3])
    trainer = SimpleNamespace(model=model, phase="compress", config=SimpleNamespace(lr=1.0))
    method.regularizer.on_train_begin(trainer)
    zero_components_(model, 0, [0, 3])
    metrics = {}
    method.regularizer.on_epoch_end(trainer, 1, metrics)
    assert metrics["iss_components"] == [2, 3]
    state = method.finetune_callbacks()[0].state_dict()  # the fine-tuning callback carries the whole log
    fresh = ISS(ISSConfig())
    fresh.freeze.load_state_dict(state)
    assert [(e["phase"], e["epoch"], e["components"]) for e in fresh.log] == [
        ("compress", 0, [4, 3]), ("compress", 1, [2, 3])]
    assert fresh.summary(shrink(model)) == {"iss_hidden_sizes": [2, 3], "iss_units_removed": [2, 0],
                                            "iss_components": list(fresh.log)}


def test_search_strength_bisects_in_log_space():
    calls = []

    def size(strength):  # a monotone stand-in for "hidden units left after an ISS run"
        calls.append(strength)
        return 400 / (1 + 1000 * strength)

    found = search_strength(size, target=100, low=1e-5, high=1.0, steps=10)
    assert found.reached and len(calls) == 10 and found.trials[0][0] == pytest.approx(10**-2.5)
    assert size(found.strength) <= 100
    assert 0.003 <= found.strength <= 0.003 * (1.0 / 1e-5) ** (1 / 2**10)
    unreachable = search_strength(size, target=0.1, low=1e-5, high=1.0, steps=3)
    assert not unreachable.reached and unreachable.strength == 1.0
    with pytest.raises(ValueError):
        search_strength(size, 100, low=1.0, high=0.5)


def test_plot_components(tmp_path):
    log = [{"phase": "compress", "epoch": e, "components": [8 - e, 8]} for e in range(3)]
    log.append({"phase": "finetune", "epoch": 1, "components": [6, 8]})
    path = plot_components({"iss_components": log}, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--method iss"):
        plot_components({"history": []}, tmp_path / "d.png")


# --- whole runs on a PTB slice ---------------------------------------------------------------------------------
# On the tiny preset (all units alike from the initialisation), strength 0.07 with threshold 0.01 collapses most
# first-layer units in the second epoch (0.06: none yet, 0.08: all); the default
# threshold (1e-4, for the paper's lambda) is far below the level at which such strong components oscillate.
OPTIONS = {"strength": 0.07, "threshold": 0.01}


def _iss_run(ptb_slice_dir, source=None, finetune_epochs=1):
    return RunConfig(preset="tiny", method="iss", data_dir=str(ptb_slice_dir), verify_data=False,
                     overrides={"epochs": 2, "max_batches": 10}, method_config=OPTIONS,
                     source=str(source) if source else None, finetune_overrides={"epochs": finetune_epochs})


def _check_shrunk(metrics, out):
    sizes = metrics["hidden_sizes"]
    assert sizes[0] < 32 and sizes[1] <= 32 and math.isfinite(metrics["test_ppl"])
    assert metrics["lstm_compression"] > 1.2
    assert metrics["iss_components"][0] == {"phase": "compress", "epoch": 0, "components": [32, 32]}
    assert metrics["iss_components"][-1]["components"] == sizes
    assert load_checkpoint(out / "checkpoint.pt")["model_config"]["lstm"]["hidden_size"] == sizes
    assert (out / "components.png").read_bytes()[:4] == b"\x89PNG"


def test_iss_from_scratch_removes_units_and_resume_keeps_the_history(tmp_path, ptb_slice_dir):
    straight = compress_run(_iss_run(ptb_slice_dir, finetune_epochs=2), tmp_path / "a", progress=False)
    _check_shrunk(straight, tmp_path / "a")
    assert [(e["phase"], e["epoch"]) for e in straight["iss_components"]] == [
        ("compress", 0), ("compress", 1), ("compress", 2), ("finetune", 1), ("finetune", 2)]

    class Stop(Callback):  # interrupt fine-tuning after its first epoch, before that epoch is saved
        def on_epoch_end(self, trainer, epoch, metrics):
            if trainer.phase == "finetune":
                raise KeyboardInterrupt

    original = ISS.finetune_callbacks
    ISS.finetune_callbacks = lambda self: [self.freeze, Stop()]
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_run(_iss_run(ptb_slice_dir, finetune_epochs=2), tmp_path / "b", progress=False)
    finally:
        ISS.finetune_callbacks = original
    resumed = compress_run(_iss_run(ptb_slice_dir, finetune_epochs=2), tmp_path / "b", resume=True,
                           progress=False)
    assert resumed["iss_components"] == straight["iss_components"]
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)


def test_shrinking_each_epoch_trains_the_smaller_model_and_resumes(tmp_path, ptb_slice_dir, monkeypatch):
    def run():
        config = _iss_run(ptb_slice_dir)
        config.overrides["epochs"] = 4
        config.method_config = OPTIONS | {"shrink_each_epoch": True, "strength": 0.06}  # 0.07: layer 0 dies whole
        return config

    trained = []  # hidden sizes of the model each compress epoch trained, seen at its end

    class Watch(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            if trainer.phase == "compress":
                trained.append(list(trainer.model.lstm.hidden_sizes))

    original = ISS.callbacks
    monkeypatch.setattr(ISS, "callbacks", lambda self: [Watch(), *original(self)])  # Watch sees the model first
    straight = compress_run(run(), tmp_path / "a", progress=False)
    _check_shrunk(straight, tmp_path / "a")
    counts = [e["components"] for e in straight["iss_components"] if e["phase"] == "compress"]
    assert trained[0] == [32, 32] and counts[3][0] < 32   # units died before the last epoch...
    assert trained[1:] == counts[1:-1]                     # ...and every later epoch trained only the survivors

    class Stop(Callback):  # interrupt after the last compress epoch, before it is saved
        def on_epoch_end(self, trainer, epoch, metrics):
            if trainer.phase == "compress" and epoch == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(ISS, "callbacks", lambda self: [*original(self), Stop()])
    with pytest.raises(KeyboardInterrupt):
        compress_run(run(), tmp_path / "b", progress=False)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["epoch"] == 3 and saved["model_config"]["lstm"]["hidden_size"] == counts[3]
    monkeypatch.setattr(ISS, "callbacks", original)
    resumed = compress_run(run(), tmp_path / "b", resume=True, progress=False)
    assert resumed["iss_components"] == straight["iss_components"]
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)


def test_iss_from_a_trained_baseline_and_from_the_cli(tmp_path, ptb_slice_dir):
    base = tmp_path / "base"
    train_run(RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False,
                        overrides={"epochs": 1, "max_batches": 10}), base, progress=False)
    metrics = compress_run(_iss_run(ptb_slice_dir, base), tmp_path / "iss", progress=False)
    _check_shrunk(metrics, tmp_path / "iss")
    assert "baseline_test_ppl" in metrics and metrics["source"] == str(base)
    # the shrunk model and its dense baseline, whole and LSTM stack only, on both backends, in one run
    latency = metrics["latency_us_per_step"]
    for label in ("compressed", "baseline"):
        for part in ("lstm", "model"):
            assert set(latency[label][part]) == {"leanlstm", "onnxruntime"}
            assert all(math.isfinite(v) and v > 0 for v in latency[label][part].values())
        assert latency[label]["model"]["leanlstm"] > latency[label]["lstm"]["leanlstm"]  # + embedding, decoder
    speedup = metrics["lstm_speedup"]["leanlstm_vs_baseline_onnxruntime"]
    assert speedup == pytest.approx(latency["baseline"]["lstm"]["onnxruntime"] / latency["compressed"]["lstm"]["leanlstm"])

    args = ["compress", "--method", "iss", "--from", str(base), "--strength", "0.1", "--set", "threshold=0.01",
            "--out", str(tmp_path / "cli"), "--epochs", "2", "--max-batches", "10", "--finetune-epochs", "1",
            "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["hidden_sizes"] == metrics["hidden_sizes"]
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["method_config"] == {"strength": 0.1, "threshold": 0.01, "eps": 1e-8, "group_rule": True,
                                      "shrink_each_epoch": False}
    assert (tmp_path / "cli" / "components.png").is_file()
    assert "iss" in METHODS
