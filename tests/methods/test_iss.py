"""ISS (Wen et al. 2018): components from the cells' groups and the module graph, regulariser, thresholding,
removal (with the readers of every stack), fine-tuning and whole runs."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.compress import compress_
from leanlstm.methods import ISS, METHODS
from leanlstm.methods.iss import (ISSMethod, UnitMap, components, group_lasso, kept_units, search_strength, shrink,
                                  surviving, threshold_, zero_components_)
from leanlstm.nn import LSTM
from leanlstm.nn.lstm import dense_lstm_params
from leanlstm.report import plot_components
from leanlstm.runs import RunConfig, compress_run, train_run
from leanlstm.tasks.lm import LMConfig, WordLM
from leanlstm.train import Callback


def _lm(hidden_sizes, vocab=7, embed=3):
    model = WordLM(LMConfig(vocab, embed, list(hidden_sizes), 0.0, 0.5))
    return model.eval()


class Tagger(nn.Module):
    """A bidirectional projected stack read per step by a head (the user model of the issue, small)."""

    def __init__(self, hidden=5, proj=3, layers=2):
        super().__init__()
        self.lstm = nn.LSTM(4, hidden, layers, bidirectional=True, proj_size=proj)
        self.head = nn.Linear(2 * proj, 6)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _tagger(**sizes):
    model = Tagger(**sizes)
    compress_(model, ISS())            # the stack becomes a leanlstm.LSTM, the head stays
    return model.eval()


def _grid(rows, cols):
    return {(r, c) for r in rows for c in cols}


def _group(groups, layer, name="hidden"):
    return next(g for g in groups if g.layer == layer and g.group == name)


# --- components -----------------------------------------------------------------------------------------------
def test_component_index_sets_on_a_stack_with_unequal_sizes():
    layers = components(_lm([2, 3]))  # embedding 3 -> layer 0 (2 units) -> layer 1 (3 units) -> decoder (7 words)
    assert [(g.layer, g.group, g.size) for g in layers] == [(0, "hidden", 2), (1, "hidden", 3)]
    # layer 0, unit 1: gate rows 1, 3, 5, 7 of both matrices, column 1 of its weight_hh and of layer 1's weight_ih
    assert layers[0].entries(1) == {
        "lstm.layers.0.weight_ih.weight": _grid([1, 3, 5, 7], range(3)),
        "lstm.layers.0.weight_hh.weight": _grid([1, 3, 5, 7], range(2)) | _grid(range(8), [1]),
        "lstm.layers.1.weight_ih.weight": _grid(range(12), [1]),
    }
    # layer 1 (top), unit 0: gate rows 0, 3, 6, 9; its reader, found from the module graph, is the decoder
    assert layers[1].entries(0) == {
        "lstm.layers.1.weight_ih.weight": _grid([0, 3, 6, 9], range(2)),
        "lstm.layers.1.weight_hh.weight": _grid([0, 3, 6, 9], range(3)) | _grid(range(12), [0]),
        "decoder.weight": _grid(range(7), [0]),
    }
    # a bare LSTM's top layer has no reader
    bare = components(LSTM(3, [2, 3]))
    assert bare[0].slices[-1].name == "layers.1.weight_ih.weight"
    assert bare[1].entries(2) == {
        "layers.1.weight_ih.weight": _grid([2, 5, 8, 11], range(2)),
        "layers.1.weight_hh.weight": _grid([2, 5, 8, 11], range(3)) | _grid(range(12), [2]),
    }


def test_bidirectional_projected_components_are_per_direction_and_reach_both_next_directions():
    groups = components(_tagger(hidden=5, proj=3))   # flat layers 0, 1 (layer 0 fwd, rev), 2, 3 (layer 1)
    assert [(g.layer, g.group, g.size) for g in groups] == [
        (f, name, size) for f in range(4) for name, size in (("hidden", 5), ("proj", 3))]
    # hidden unit 4 of layer 0's reverse direction: its gate rows and column 4 of its projection
    assert _group(groups, 1).entries(4) == {
        "lstm.layers.1.weight_ih.weight": _grid([4, 9, 14, 19], range(4)),
        "lstm.layers.1.weight_hh.weight": _grid([4, 9, 14, 19], range(3)),
        "lstm.layers.1.weight_hr.weight": _grid(range(3), [4]),
    }
    # projection unit 2 of the same direction is output channel 3 + 2 of layer 0: both of layer 1's directions read it
    assert _group(groups, 1, "proj").entries(2) == {
        "lstm.layers.1.weight_hr.weight": _grid([2], range(5)),
        "lstm.layers.1.weight_hh.weight": _grid(range(20), [2]),
        "lstm.layers.2.weight_ih.weight": _grid(range(20), [5]),
        "lstm.layers.3.weight_ih.weight": _grid(range(20), [5]),
    }
    # the top layer's reverse projections are the head's columns 3..5
    assert _group(groups, 3, "proj").entries(0)["head.weight"] == _grid(range(6), [3])


@pytest.mark.parametrize("kind", ["lm", "bare", "tagger"])
def test_vectorised_norms_equal_the_explicit_index_sets(kind):
    model = {"lm": lambda: _lm([3, 5, 2]), "bare": lambda: LSTM(4, [3, 5, 2]), "tagger": _tagger}[kind]()
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if name.endswith("1.weight_hh.weight"))[7, 2] = 0.0
    for group in components(model):
        expected_sq, expected_nz = [], []
        for unit in range(group.size):
            values = [params[name][r, c] for name, cells in group.entries(unit).items() for r, c in cells]
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


def test_bidirectional_projected_shrink_pads_to_one_size_per_layer_and_one_projection():
    model = _tagger(hidden=6, proj=4)
    for layer in model.lstm.layers:
        torch.nn.init.uniform_(layer.bias_ih, -0.5, 0.5)
    zero_components_(model, 0, [0, 1, 2], group="hidden")     # layer 0 forward loses 3 hidden units...
    zero_components_(model, 1, [5], group="hidden")           # ...its reverse direction 1: layer 0 keeps 5
    for flat, units in enumerate([[0, 1], [1, 3], [0, 2], [3]]):
        zero_components_(model, flat, units, group="proj")    # at least one projection live: proj_size 3
    groups = components(model)
    keep = kept_units(model.lstm, groups)
    assert [len(keep[(f, "hidden")]) for f in range(4)] == [5, 5, 6, 6]
    assert [len(keep[(f, "proj")]) for f in range(4)] == [3, 3, 3, 3]
    assert keep[(1, "hidden")].tolist() == [0, 1, 2, 3, 4]     # live units first; the rest are dead padding
    assert keep[(0, "hidden")].tolist() == [0, 1, 3, 4, 5]
    x = torch.randn(7, 2, 4)
    with torch.no_grad():
        before = model(x)
        small = shrink(model)
        torch.testing.assert_close(small(x), before, rtol=1e-5, atol=1e-6)
    assert small.lstm.hidden_sizes == [5, 6] and small.lstm.proj_size == 3 and small.head.in_features == 6


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


class TwoStacks(nn.Module):
    """A stack read by another stack (bidirectional), read per step by a head."""

    def __init__(self):
        super().__init__()
        self.first = nn.LSTM(3, 6, bidirectional=True)
        self.second = nn.LSTM(12, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.relu(self.second(self.first(x)[0])[0]))


@pytest.mark.parametrize("both", [True, False])
def test_a_stack_read_by_another_stack_narrows_it(both):
    model = TwoStacks().eval()
    only_first = None if both else (lambda module, name: name == "first")
    handle = compress_(model, ISS(), filter_fn=only_first)
    assert list(handle.lstms) == (["first", "second"] if both else ["first"])
    assert _group(handle.method.units(handle).components, 1).slices[-1].name == (
        "second.layers.0.weight_ih.weight" if both else "second.weight_ih_l0")
    zero_components_(model, 0, [0, 1], lstm="first")        # forward direction: columns 0, 1 of second's input
    zero_components_(model, 1, [4], lstm="first")           # reverse: column 6 + 4
    if both:
        zero_components_(model, 0, [2], lstm="second")      # and the head's column 2
    x = torch.randn(7, 2, 3)
    with torch.no_grad():
        before = model(x)
        handle.finalize()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert model.first.hidden_sizes == [5] and model.second.input_size == 10
    assert isinstance(model.second, LSTM if both else nn.LSTM)
    assert model.head.in_features == (4 if both else 5)


def test_a_reader_that_mixes_channels_is_refused_by_name():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.norm, self.fc = nn.LSTM(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.norm(self.rnn(x)[0]))

    model = Pooled()
    with pytest.raises(ValueError, match="read by 'norm', a LayerNorm"):
        compress_(model, ISS())
    assert isinstance(model.rnn, nn.LSTM)    # refused before anything changed


# --- regulariser, thresholding, freezing ----------------------------------------------------------------------
def test_regulariser_gradient_is_strength_times_w_over_component_norm():
    model, strength, eps = _lm([2, 3]), 0.3, 1e-3
    groups = components(model)
    (strength * group_lasso(groups, eps)).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = {}
    for group in groups:
        for unit in range(group.size):
            entries = group.entries(unit)
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
    threshold_(UnitMap.of(model), 0.05)
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
            hh = model.lstm.layers[0].weight_hh.weight
            hh[:, 2] = 1.5e-3 * torch.randn(hh.shape[0]).sign()  # above the threshold
        return model

    element_only = hovering()
    threshold_(UnitMap.of(element_only), 1e-3, group_rule=False)
    assert surviving(element_only) == [4, 5]
    model = hovering()
    threshold_(UnitMap.of(model), 1e-3, group_rule=True)  # RMS of unit 2: 16 of its 60+ entries
    assert surviving(model) == [3, 5]
    assert shrink(model).lstm.hidden_sizes == [3, 5]


def test_finalize_shrinks_in_place_and_fine_tuning_keeps_zeros_zero():
    model = _lm([4, 3]).train()
    handle = compress_(model, ISS(strength=0.1))
    zero_components_(model, 0, [1])
    with torch.no_grad():
        model.decoder.weight[0, 0] = 0.0
        model.lstm.layers[1].weight_hh.weight[0, 0] = 0.0
    decoder = model.decoder
    assert handle.finalize() is model and model.lstm.hidden_sizes == [3, 3]
    assert model.decoder is decoder                 # the top layer lost nothing: its reader stays as it was
    zeros = {name: ~mask for name, mask in handle.method.frozen.items()}
    assert sum(int(z.sum()) for z in zeros.values()) == 2
    assert handle.penalty() == 0.0                  # the term is off once finalized
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        tokens = torch.randint(0, 7, (5, 2))
        optimizer.zero_grad()
        model(tokens, targets=torch.randint(0, 7, (5, 2)))[1].backward()
        optimizer.step()
        handle.after_step()
    for name, zero in zeros.items():
        assert not params[name][zero].any()
    assert all(not torch.equal(p, start[n]) for n, p in params.items())  # the rest did train


def test_component_history_is_in_the_handle_state():
    model = _lm([4, 3])
    handle = compress_(model, ISS(strength=0.1))
    zero_components_(model, 0, [0, 3])
    assert handle.on_epoch_end() == {"iss_components": [2, 3]}
    state = handle.state_dict()
    again = _lm([4, 3])
    fresh = compress_(again, ISS(strength=0.1))
    fresh.load_state_dict(state)
    assert [(e["phase"], e["epoch"], e["components"]) for e in fresh.method.log] == [
        ("compress", 0, [4, 3]), ("compress", 1, [2, 3])]
    handle.finalize()
    summary = handle.summary()
    assert summary["iss_hidden_sizes"] == [2, 3] and summary["iss_units_removed"] == [2, 0]
    assert summary["iss_components"] == list(handle.method.log)


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
# first-layer units in the second epoch; the default threshold (1e-4, for the paper's lambda) is far below the level
# at which such strong components oscillate. From a one-epoch baseline the strength is a cliff: 0.06 leaves 30
# first-layer units, 0.063 leaves 10, 0.065 one.
OPTIONS = {"strength": 0.07, "threshold": 0.01}
FROM_BASELINE = {"strength": 0.063, "threshold": 0.01}


def _iss_run(ptb_slice_dir, source=None, finetune_epochs=1, options=OPTIONS):
    return RunConfig(preset="tiny", method="iss", data_dir=str(ptb_slice_dir), verify_data=False,
                     overrides={"epochs": 2, "max_batches": 10}, method_config=dict(options),
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

    original = ISSMethod.finetune_callbacks
    ISSMethod.finetune_callbacks = lambda self: [*original(self), Stop()]
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_run(_iss_run(ptb_slice_dir, finetune_epochs=2), tmp_path / "b", progress=False)
    finally:
        ISSMethod.finetune_callbacks = original
    resumed = compress_run(_iss_run(ptb_slice_dir, finetune_epochs=2), tmp_path / "b", resume=True,
                           progress=False)
    assert resumed["iss_components"] == straight["iss_components"]
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)


def test_shrinking_each_epoch_trains_the_smaller_model_and_resumes(tmp_path, ptb_slice_dir, monkeypatch):
    def run():
        config = _iss_run(ptb_slice_dir)
        config.overrides["epochs"] = 4
        config.method_config = OPTIONS | {"shrink_each_epoch": True, "strength": 0.055}  # 0.06: layer 0 dies whole
        return config

    trained = []  # hidden sizes of the model each compress epoch trained, seen at its end

    class Watch(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            if trainer.phase == "compress":
                trained.append(list(trainer.model.lstm.hidden_sizes))

    original = ISSMethod.callbacks
    monkeypatch.setattr(ISSMethod, "callbacks", lambda self: [Watch(), *original(self)])  # Watch sees the model first
    straight = compress_run(run(), tmp_path / "a", progress=False)
    _check_shrunk(straight, tmp_path / "a")
    counts = [e["components"] for e in straight["iss_components"] if e["phase"] == "compress"]
    assert trained[0] == [32, 32] and counts[3][0] < 32   # units died before the last epoch...
    assert trained[1:] == counts[1:-1]                     # ...and every later epoch trained only the survivors

    class Stop(Callback):  # interrupt after the last compress epoch, before it is saved
        def on_epoch_end(self, trainer, epoch, metrics):
            if trainer.phase == "compress" and epoch == 4:
                raise KeyboardInterrupt

    monkeypatch.setattr(ISSMethod, "callbacks", lambda self: [*original(self), Stop()])
    with pytest.raises(KeyboardInterrupt):
        compress_run(run(), tmp_path / "b", progress=False)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["epoch"] == 3 and saved["model_config"]["lstm"]["hidden_size"] == counts[3]
    monkeypatch.setattr(ISSMethod, "callbacks", original)
    resumed = compress_run(run(), tmp_path / "b", resume=True, progress=False)
    assert resumed["iss_components"] == straight["iss_components"]
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)


def test_iss_from_a_trained_baseline_and_from_the_cli(tmp_path, ptb_slice_dir):
    base = tmp_path / "base"
    train_run(RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False,
                        overrides={"epochs": 1, "max_batches": 10}), base, progress=False)
    metrics = compress_run(_iss_run(ptb_slice_dir, base, options=FROM_BASELINE), tmp_path / "iss", progress=False)
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
    whole = metrics["model_speedup"]["leanlstm_vs_baseline_leanlstm"]
    assert whole == pytest.approx(latency["baseline"]["model"]["leanlstm"] / latency["compressed"]["model"]["leanlstm"])

    args = ["compress", "--method", "iss", "--from", str(base), "--strength", "0.063", "--set", "threshold=0.01",
            "--out", str(tmp_path / "cli"), "--epochs", "2", "--max-batches", "10", "--finetune-epochs", "1",
            "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["hidden_sizes"] == metrics["hidden_sizes"]  # one path
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert saved["method_config"] == {"strength": 0.063, "threshold": 0.01, "eps": 1e-8, "group_rule": True,
                                      "shrink_each_epoch": False, "proximal": False, "lr": 1e-3, "target_params": 0,
                                      "target_latency_us": 0.0, "adapt_every": 20, "adapt_rate": 1.25}
    assert (tmp_path / "cli" / "components.png").is_file()
    assert "iss" in METHODS


# --- steering: targets, the proximal step under Adam, nothing-removed warning, summary from a user loop ---------
class Spotter(nn.Module):
    """The user trial's keyword spotter, small: a 2-layer LSTM read at its last step by a classifier head."""

    def __init__(self, inputs=8, hidden=32):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(inputs, hidden, 2, batch_first=True), nn.Linear(hidden, 4)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def _adam_loop(model, handle, steps, lr=1e-2, epoch_every=0):
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.randn(16, 6, 8), torch.randint(0, 4, (16,))
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
        if epoch_every and (step + 1) % epoch_every == 0:
            if handle.on_epoch_end().get("new_parameters"):
                optimizer = torch.optim.Adam(model.parameters(), lr=lr)


def test_iss_reaches_a_parameter_target_under_adam():
    torch.manual_seed(0)
    model = Spotter()
    full = dense_lstm_params(8, [32, 32])                     # 13 824
    target = full // 3
    handle = compress_(model, ISS(strength=0.5, proximal=True, lr=1e-2, target_params=target, adapt_every=5))
    _adam_loop(model, handle, steps=120)
    summary = handle.summary()
    assert summary["iss_strength"] == 0.0                     # the controller stopped at the target
    assert target <= summary["iss_projected_params"] <= 1.03 * target   # measured: 4620 for 4608
    handle.finalize()
    stored = handle.summary()["lstms"]["rnn"]["stored_params"]
    assert stored == summary["iss_projected_params"] and model.fc.in_features == model.rnn.hidden_sizes[-1]


def test_a_strength_past_the_cliff_never_crosses_the_target():
    # a proximal shrink of 10 per step zeroes every component at once; the cap gives units back
    torch.manual_seed(0)
    model = Spotter()
    target = dense_lstm_params(8, [32, 32]) // 2
    handle = compress_(model, ISS(strength=10.0, proximal=True, lr=1.0, target_params=target))
    _adam_loop(model, handle, steps=1)
    projected = handle.summary()["iss_projected_params"]
    assert target <= projected < target + 4 * (8 + 32 + 32 + 32 + 2) * 2   # within two units of the target
    assert handle.method.strength == 0.0


def test_a_warning_when_nothing_is_removed(caplog):
    torch.manual_seed(0)
    model = Spotter()
    handle = compress_(model, ISS(strength=1e-7))            # far too weak under Adam
    with caplog.at_level("WARNING", logger="leanlstm.methods.iss"):
        _adam_loop(model, handle, steps=10, epoch_every=5)
    assert caplog.text.count("ISS: nothing is being removed") == 2
    assert "epoch 1 ended with 64 live units" in caplog.text


def test_no_warning_while_units_are_removed(caplog):
    torch.manual_seed(0)
    model = Spotter()
    handle = compress_(model, ISS(strength=10.0, proximal=True, lr=0.03))    # a shrink of 0.3 per step
    with caplog.at_level("WARNING", logger="leanlstm.methods.iss"):
        _adam_loop(model, handle, steps=10, epoch_every=5)
    assert 0 < sum(handle.summary()["iss_live_sizes"]) < 64
    assert "nothing is being removed" not in caplog.text


def test_summary_follows_a_user_loop_that_shrinks_in_place():
    torch.manual_seed(0)
    model = Spotter()
    target = dense_lstm_params(8, [32, 32]) // 2
    handle = compress_(model, ISS(strength=10.0, proximal=True, lr=1.0, target_params=target,
                                  shrink_each_epoch=True))
    _adam_loop(model, handle, steps=4, epoch_every=2)         # the first epoch end shrinks the model in place
    summary = handle.summary()
    sizes = model.rnn.hidden_sizes
    assert sizes != [32, 32] and summary["iss_hidden_sizes"] == sizes == summary["iss_live_sizes"]
    assert summary["iss_units_removed"] == [32 - sizes[0], 32 - sizes[1]]
    assert summary["lstms"]["rnn"]["stored_params"] == dense_lstm_params(8, sizes) == summary["iss_projected_params"]


def test_target_options_are_checked():
    with pytest.raises(ValueError, match="target_latency_us must be 0 when target_params is given"):
        ISS(target_params=1000, target_latency_us=5.0)
    with pytest.raises(ValueError, match="strength must be > 0 with a target"):
        ISS(strength=0.0, target_params=1000)
    with pytest.raises(ValueError, match="adapt_rate"):
        ISS(adapt_rate=0.5)


def test_a_latency_target_becomes_a_parameter_target_from_engine_timings():
    torch.manual_seed(0)
    full = dense_lstm_params(8, [32, 32])
    loose = compress_(Spotter(), ISS(strength=0.5, proximal=True, target_latency_us=1e6))
    tight = compress_(Spotter(), ISS(strength=0.5, proximal=True, target_latency_us=1e-3))
    assert loose.method.target_params > 100 * full         # a million us: far more than the model has
    assert tight.method.target_params < full / 100          # a nanosecond a step: under 1% of it
    assert loose.summary()["iss_target_params"] == loose.method.target_params
