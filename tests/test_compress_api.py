"""``compress_`` on models written the way users write them, inside a plain user loop: ISS, pruning and doped
Kronecker; ``finalize``; outputs before and after; save/load through a state dict and a JSON config (no pickled
modules); resuming; and the errors a user meets."""
import doctest
import importlib
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import leanlstm
from leanlstm.compress import CompressError, Compression, compress_, compressed_config, restore_
from leanlstm.methods import ISS, Doped, Prune, Structured
from leanlstm.methods.iss import zero_components_
from leanlstm.methods.pruning import PruneMethod, weight_compression
from leanlstm.nn.forms import Doped as DopedForm
from leanlstm.nn.forms import Kronecker, MaskedSparse
from tests.user_models import KeywordSpotter, RNNModel, Tagger

STEPS = 4


@dataclass
class Case:
    """A user model, a batch of random data for it, its loss, and the units the ISS test kills by hand."""

    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    outputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dead: list[dict]             # zero_components_ arguments
    shrunk: tuple                # (hidden sizes, proj_size, the reader's in_features) after finalize
    reader: str                  # attribute of the module reading the LSTM (checked, never used by the library)
    compression: float           # a budget every matrix of the model can meet, pruned or doped


CASES = {
    "keyword_spotter": Case(
        build=KeywordSpotter,
        batch=lambda: (torch.randn(4, 6, 40), torch.randint(0, 12, (4,))),
        outputs=lambda model, x: model(x),
        loss=F.cross_entropy,
        dead=[dict(layer=0, units=[1, 5, 7]), dict(layer=1, units=list(range(0, 128, 2)))],
        shrunk=([125, 64], 0, 64), reader="fc", compression=8.0),
    "word_language_model": Case(
        build=RNNModel,
        batch=lambda: (torch.randint(0, 50, (5, 3)), torch.randint(0, 50, (15,))),
        outputs=lambda model, x: model(x, None)[0],      # (T * B, ntoken) log-probabilities
        loss=F.nll_loss,
        dead=[dict(layer=0, units=[1, 2]), dict(layer=1, units=[0, 3, 4])],
        shrunk=([22, 21], 0, 21), reader="decoder", compression=3.0),
    "bidirectional_tagger": Case(
        build=Tagger,
        batch=lambda: (torch.randn(3, 6, 10), torch.randint(0, 5, (3, 6))),
        outputs=lambda model, x: model(x),                # (B, T, tags)
        loss=lambda logits, y: F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1)),
        dead=[dict(layer=0, units=[1, 2, 3], group="hidden"), dict(layer=1, units=[2, 3, 4, 5], group="hidden")]
        + [dict(layer=flat, units=[0, 5], group="proj") for flat in range(4)],
        shrunk=([21, 24], 6, 12), reader="tags", compression=3.0),
}


def user_loop(model: nn.Module, handle: Compression, case: Case, steps: int = STEPS) -> torch.optim.Optimizer:
    """What a user writes: their own loss, their own Adam, the handle's three calls."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x, y = case.batch()
        loss = case.loss(case.outputs(model, x), y) + handle.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
    handle.on_epoch_end()
    return optimizer


def reload(model: nn.Module, case: Case, tmp_path) -> nn.Module:
    """Save as a user would without pickling modules (a state dict and a JSON config), rebuild, load."""
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "structure.json").write_text(json.dumps(compressed_config(model)))
    fresh = restore_(case.build(), json.loads((tmp_path / "structure.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    return fresh.eval()


def same_outputs(a: nn.Module, b: nn.Module, case: Case) -> None:
    x, _ = case.batch()
    with torch.no_grad():
        torch.testing.assert_close(case.outputs(a.eval(), x), case.outputs(b.eval(), x), rtol=1e-5, atol=1e-5)


# --- the three methods on the three models ---------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_iss_shrink_keeps_the_function_and_narrows_the_reader(name, tmp_path):
    case = CASES[name]
    model = case.build()
    handle = compress_(model, ISS(strength=1e-3))
    user_loop(model, handle, case)
    for dead in case.dead:                       # kill some units by hand so that the shrink removes something
        zero_components_(model, **dead)
    x, _ = case.batch()
    model.eval()
    with torch.no_grad():
        before = case.outputs(model, x)
        assert handle.finalize() is model
        torch.testing.assert_close(case.outputs(model, x), before, rtol=1e-5, atol=1e-5)
    lstm = next(module for module in model.modules() if isinstance(module, leanlstm.LSTM))
    sizes, proj, width = case.shrunk
    assert (lstm.hidden_sizes, lstm.proj_size, getattr(model, case.reader).in_features) == (sizes, proj, width)
    assert handle.summary()["iss_hidden_sizes"] == sizes
    user_loop(model, handle, case, steps=2)      # fine-tuning: a new optimizer, the frozen zeros stay zero
    params = dict(model.named_parameters())
    assert all(not params[name][~mask].any() for name, mask in handle.method.frozen.items())
    same_outputs(reload(model, case, tmp_path), model, case)


@pytest.mark.parametrize("name", CASES)
def test_pruning_in_a_user_loop_reaches_its_budget_and_round_trips(name, tmp_path):
    case = CASES[name]
    model = case.build()
    config = Prune(compression=case.compression, total_steps=STEPS, prune_every=1, anneal_end=1.0)
    handle = compress_(model, config)
    assert all(isinstance(form, MaskedSparse) for _, form in handle.forms())   # weight_hr of the tagger too
    user_loop(model, handle, case)
    handle.finalize()
    compression = weight_compression(model)
    assert case.compression <= compression < case.compression * 1.01
    kept = {name: form.mask.clone() for name, form in handle.forms()}
    user_loop(model, handle, case, steps=2)      # fine-tuning keeps the masks
    assert all(torch.equal(form.mask, kept[name]) for name, form in handle.forms())
    same_outputs(reload(model, case, tmp_path), model, case)


@pytest.mark.parametrize("name", CASES)
def test_doped_kronecker_in_a_user_loop_reaches_its_budget_and_round_trips(name, tmp_path):
    case = CASES[name]
    model = case.build()
    x, _ = case.batch()
    with torch.no_grad():
        dense = case.outputs(model.eval(), x)
    handle = compress_(model, Doped("kronecker", compression=case.compression, total_steps=STEPS,
                                                      prune_every=1, anneal_end=1.0))
    with torch.no_grad():                        # D starts dense: S + D is the trained matrix
        torch.testing.assert_close(case.outputs(model.eval(), x), dense, rtol=1e-4, atol=1e-5)
    assert all(isinstance(form, DopedForm) and isinstance(form.structured, Kronecker) for _, form in handle.forms())
    user_loop(model, handle, case)
    handle.finalize()
    assert all(form.cmr == 0.0 for _, form in handle.forms())
    assert case.compression <= weight_compression(model) <= case.compression * 1.01
    summary = handle.summary()
    assert summary["method"] == "Doped" and all(d < 0.5 for d in summary["sparse_density"].values())
    same_outputs(reload(model, case, tmp_path), model, case)


def test_the_hidden_state_a_shrunk_model_returns_can_be_carried():
    model = RNNModel()
    handle = compress_(model, ISS())
    zero_components_(model, layer=0, units=[0, 1])
    handle.finalize()
    tokens = torch.randint(0, 50, (5, 3))
    _, hidden = model(tokens, None)              # per-layer sizes now differ: the state is per layer
    out, _ = model(tokens, tuple(tuple(h.detach() for h in part) for part in hidden))
    assert out.shape == (15, 50) and [h.shape[-1] for h in hidden[0]] == [22, 24]


# --- resuming a user loop ----------------------------------------------------------------------------------
def test_a_checkpoint_mid_schedule_resumes_exactly():
    case = CASES["keyword_spotter"]
    config = Prune(compression=4.0, total_steps=6, prune_every=1, anneal_end=1.0)

    def batches():
        torch.manual_seed(1)
        return [case.batch() for _ in range(6)]

    def run(model, handle, optimizer, data):
        for x, y in data:
            loss = case.loss(case.outputs(model, x), y) + handle.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            handle.after_step()

    torch.manual_seed(0)
    straight = KeywordSpotter()
    handle = compress_(straight, config)
    run(straight, handle, torch.optim.Adam(straight.parameters(), lr=1e-2), batches())

    torch.manual_seed(0)
    first = KeywordSpotter()
    handle = compress_(first, config)
    optimizer = torch.optim.Adam(first.parameters(), lr=1e-2)
    run(first, handle, optimizer, batches()[:3])
    saved = {"model": first.state_dict(), "compression": handle.state_dict(), "optimizer": optimizer.state_dict()}

    resumed = KeywordSpotter()
    again = compress_(resumed, config)
    again.load_state_dict(saved["compression"])    # the handle first: it restores the structure
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    run(resumed, again, optimizer, batches()[3:])
    assert again.step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_finalized_iss_checkpoint_restores_the_smaller_structure_first():
    case = CASES["bidirectional_tagger"]
    model = case.build()
    handle = compress_(model, ISS())
    for dead in case.dead:
        zero_components_(model, **dead)
    handle.finalize()
    state, weights = handle.state_dict(), model.state_dict()
    fresh = case.build()
    again = compress_(fresh, ISS())
    again.load_state_dict(state)
    fresh.load_state_dict(weights)
    same_outputs(fresh, model, case)
    assert again.finalized and again.penalty() == 0.0
    with pytest.raises(CompressError, match="already called"):
        again.finalize()


# --- Trainer drives the same handle ----------------------------------------------------------------------------
def test_trainer_callbacks_call_the_same_handle():
    model = KeywordSpotter()
    handle = compress_(model, ISS(strength=0.1))
    callback, = handle.callbacks()
    replaced = []
    trainer = SimpleNamespace(model=model, config=SimpleNamespace(lr=0.1, epochs=3, max_batches=None),
                              task=SimpleNamespace(num_train_batches=lambda: 5), replace_model=replaced.append)
    callback.on_train_begin(trainer)
    assert handle.schedule_steps == 15
    torch.testing.assert_close(callback.extra_loss(trainer), handle.penalty())
    callback.after_step(trainer)
    metrics = {}
    callback.on_epoch_end(trainer, 1, metrics)
    assert handle.step == 1 and handle.epoch == 1 and metrics == {"iss_components": [128, 128]} and not replaced
    assert callback.state_dict()["step"] == 1
    with pytest.raises(CompressError, match="belongs to"):
        callback.after_step(SimpleNamespace(model=KeywordSpotter()))


def test_configs_round_trip_through_dicts_and_cli_names():
    for config in (ISS(strength=0.01), Prune(compression=10), Doped("kronecker", compression=20),
                   Structured("lowrank", compression=20)):
        assert type(config).from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert leanlstm.methods.config_for("doped-kp", {"compression": 20}) == Doped("kronecker", compression=20)
    assert leanlstm.methods.config_for("iss", {"strength": 0.01}) == ISS(strength=0.01)


def test_the_public_nouns_are_exported_at_the_top_level():
    assert (leanlstm.compress_, leanlstm.compressed_config, leanlstm.restore_) == (
        compress_, compressed_config, restore_)
    assert (leanlstm.ISS, leanlstm.Prune, leanlstm.Doped, leanlstm.Structured) == (ISS, Prune, Doped, Structured)


# --- bad input: clear errors, before anything changes -----------------------------------------------------------
def test_a_model_without_an_lstm_is_refused():
    with pytest.raises(CompressError, match="Sequential holds no LSTM"):
        compress_(nn.Sequential(nn.Linear(3, 4)), ISS())


def test_a_filter_that_matches_nothing_is_refused_and_changes_nothing():
    model = KeywordSpotter()
    with pytest.raises(CompressError, match=r"filter_fn accepted none of the model's LSTMs \('rnn'\)"):
        compress_(model, Prune(), filter_fn=lambda module, name: name == "encoder")
    assert isinstance(model.rnn, nn.LSTM)
    handle = compress_(model, Prune(compression=4), filter_fn=lambda module, name: name == "rnn")
    assert list(handle.lstms) == ["rnn"]


def test_finalize_twice_is_refused():
    model = KeywordSpotter()
    handle = compress_(model, Prune(compression=4))
    handle.finalize()
    with pytest.raises(CompressError, match=r"finalize\(\) was already called on this handle"):
        handle.finalize()


def test_a_handle_used_on_another_model_is_refused():
    model, other = KeywordSpotter(), KeywordSpotter()
    handle = compress_(model, ISS())
    with pytest.raises(CompressError, match="this handle belongs to the KeywordSpotter that compress_ was given"):
        handle.after_step(other)
    model.rnn = nn.LSTM(40, 128, 2, batch_first=True)     # the compressed LSTM is gone from the model
    for hook in (handle.penalty, handle.after_step, handle.finalize, handle.summary):
        with pytest.raises(CompressError, match="LSTM 'rnn' is no longer the one this handle compressed"):
            hook()


def test_other_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="expected a method config such as leanlstm.ISS"):
        compress_(KeywordSpotter(), "iss")
    with pytest.raises(CompressError, match="the model itself is a torch.nn.LSTM"):
        compress_(nn.LSTM(3, 4), ISS())

    class LastState(nn.Module):    # a head on h_n: ISS cannot tell which layer's channels it reads
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(3, 4, 2), nn.Linear(4, 2)

        def forward(self, x):
            _, (h, _) = self.rnn(x)
            return self.fc(h[-1])

    model = LastState()
    with pytest.raises(ValueError, match="'fc' reads its returned state"):
        compress_(model, ISS())
    assert isinstance(model.rnn, nn.LSTM)
    compress_(model, Prune(compression=2))          # methods that keep the sizes do not need the graph
    with pytest.raises(CompressError, match="module 'fc' is a Linear here but a torch.nn.LSTM"):
        restore_(model, {"format": 1, "modules": {"fc": {"type": "torch.nn.LSTM"}}})
    with pytest.raises(CompressError, match="does not have"):
        restore_(RNNModel(), compressed_config(model))


@pytest.mark.parametrize("name", ["leanlstm.compress", "leanlstm.methods.base", "leanlstm.methods.iss",
                                  "leanlstm.methods.pruning", "leanlstm.methods.doping"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- what a user ships: the compressed model through the engine and ONNX Runtime ---------------------------------
FIRST_SAMPLE = {"keyword_spotter": lambda x: x[:1], "word_language_model": lambda x: x[:, :1],
                "bidirectional_tagger": lambda x: x[:1]}
SHIPPED = {"iss": lambda case: leanlstm.ISS(strength=1e-3),
           "prune": lambda case: leanlstm.Prune(compression=case.compression, total_steps=STEPS),
           "doped-kp": lambda case: leanlstm.Doped("kronecker", compression=case.compression, total_steps=STEPS)}


@pytest.mark.parametrize("method", SHIPPED)
@pytest.mark.parametrize("name", CASES)
def test_compressed_user_models_run_in_the_engine_and_onnx_runtime_as_in_pytorch(name, method):
    import numpy as np
    import onnxruntime

    from leanlstm import runtime
    from leanlstm.runtime.onnx import to_onnx

    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    handle = compress_(model, SHIPPED[method](case))
    user_loop(model, handle, case)
    if method == "iss":                                  # dead units, so that finalize really shrinks
        for dead in case.dead:
            zero_components_(model, **dead)
    handle.finalize()
    if method == "iss":
        assert next(m for m in model.modules() if isinstance(m, leanlstm.LSTM)).hidden_sizes == case.shrunk[0]
    model.eval()
    x = FIRST_SAMPLE[name](case.batch()[0])
    with torch.no_grad():
        want = case.outputs(model, x).numpy().reshape(-1)
    got, _ = runtime.compile(model).run(x.numpy())
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-4, rtol=1e-4)
    proto = to_onnx(model, state_inputs=False)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    np.testing.assert_allclose(session.run(None, feed)[0].reshape(-1), want, atol=1e-4, rtol=1e-4)


# --- no silent slow-downs ---------------------------------------------------------------------------------------
class _Spotter(nn.Module):
    """The user trial's 2x128 keyword spotter (40 MFCC-like inputs, 12 keywords)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(40, 128, 2, batch_first=True), nn.Linear(128, 12)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_pruning_that_would_run_slower_than_dense_warns_with_its_numbers(caplog):
    # pruned 1.5x, the 512x128 recurrent product measured 15.6 us against 2.6 us dense per step (5.9x slower)
    torch.manual_seed(0)
    model = _Spotter()
    with caplog.at_level("WARNING", logger="leanlstm.compress"):
        handle = leanlstm.compress_(model, leanlstm.Prune(compression=1.5, total_steps=10))
    assert "rnn.layers.0.weight_hh: pruned 1.5x runs" in caplog.text and "once compressed" in caplog.text
    assert {s.name for s in handle.slow_downs} >= {"rnn.layers.0.weight_hh", "rnn.layers.1.weight_hh"}
    assert all(s.us > s.dense_us for s in handle.slow_downs)
    handle.finalize()
    assert handle.summary()["slow_downs"] and handle.summary()["kept_dense"] == []


def test_keep_slow_dense_keeps_those_matrices_dense_and_resumes_the_choice():
    torch.manual_seed(0)
    model = _Spotter()
    handle = leanlstm.compress_(model, leanlstm.Prune(compression=1.5, total_steps=10, keep_slow_dense=True))
    kept = handle.summary()["kept_dense"]
    assert {"rnn.layers.0.weight_hh", "rnn.layers.1.weight_hh"} <= set(kept)
    assert all(type(form).__name__ == "Dense" for name, form in handle.forms() if name in kept)
    state = handle.state_dict()
    assert state["kept_dense"] == kept
    handle.finalize()
    assert leanlstm.runtime.check_speed(model) == []          # nothing left that runs slower than dense
    fresh = _Spotter()
    again = leanlstm.compress.attach(fresh, PruneMethod(handle.config), state=state)
    assert again.method.kept_dense == set(kept)


def test_speed_check_off_measures_nothing():
    torch.manual_seed(0)
    model = _Spotter()
    handle = leanlstm.compress_(model, leanlstm.Prune(compression=1.5, total_steps=10, speed_check=False))
    handle.finalize()
    assert handle.slow_downs == [] and handle.summary()["kept_dense"] == []
