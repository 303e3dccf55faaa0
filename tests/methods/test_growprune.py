"""Grow-and-prune (Dai, Yin & Jha): growth by the gradient of dormant connections, magnitude pruning with frozen
masks in between, exact resume mid-phase, H-LSTM and LSTM stacks in a user loop, bad input, and the CLI."""
import copy
import io
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import leanlstm
from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.compress import compress_
from leanlstm.methods import METHODS, GrowPrune
from leanlstm.methods.growprune import grow_, make_plan, prune_events
from leanlstm.methods.growprune import GrowPruneMethod
from leanlstm.methods.pruning import final_entries, weight_compression
from leanlstm.nn.forms import MaskedSparse
from leanlstm.runs import RunConfig, compress_run
from leanlstm.train import Callback
from tests.user_models import Tagger, random_batch as batch, train_steps as train


class Classifier(nn.Module):
    """A sequence classifier on a leanlstm stack of any cell: (B, T, 6) -> (B, 3) from the last step."""

    def __init__(self, cell: str = "hlstm") -> None:
        super().__init__()
        options = {"gate_hidden": 16} if cell == "hlstm" else None
        self.rnn = leanlstm.LSTM(6, 12, 2, batch_first=True, cell=cell, cell_options=options)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])






def masks(model):
    return {name: form.mask.clone() for name, form in leanlstm.graph.lstm_forms(model)}


# --- growth ------------------------------------------------------------------------------------------------
def test_growth_picks_exactly_the_largest_gradient_dormant_weights():
    form = MaskedSparse.from_dense(torch.ones(3, 4))
    active = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    form.set_mask(active)
    form.track_gradient()
    pull = torch.tensor([[9.0, 0.1, -4.0, 0.2],        # dL/dW = pull: the largest dormant |G| are -4, 3, -2.5
                         [0.3, -2.5, 8.0, 0.0],        # (9, 8, 7 are active and must not count)
                         [3.0, 0.05, -1.0, 7.0]])
    for _ in range(2):                                  # a window of two backward passes: G = 2 * pull
        (form.training_weight() * pull).sum().backward()
    torch.testing.assert_close(form.dense_grad, 2 * pull)
    assert form.weight.grad[~active].abs().max() == 0   # what weight.grad alone would have offered
    before = form.weight.detach().clone()
    picked = grow_(form, 3, init=form.dense_grad * (-0.1 / 2))
    assert sorted(picked.tolist()) == [2, 5, 8]         # flat (0, 2), (1, 1), (2, 0)
    expected = active.clone()
    expected[0, 2] = expected[1, 1] = expected[2, 0] = True
    assert torch.equal(form.mask, expected)
    grown = expected & ~active
    torch.testing.assert_close(form.weight[grown], -0.1 * pull[grown])             # one SGD step from zero
    assert torch.equal(form.weight[active], before[active])                        # the active ones untouched
    assert form.weight[~expected].abs().max() == 0


def test_growth_inside_the_method_follows_the_accumulated_gradient_of_an_lstm():
    model = Classifier("lstm")
    handle = compress_(model, GrowPrune(compression=2.0, seed_density=0.3, grow_steps=1, grow_ratio=0.25,
                                        grow_every=2, prune_every=1, growth_lr=0.5, total_steps=40))
    forms = dict(handle.forms())
    assert all(isinstance(form, MaskedSparse) for form in forms.values())
    assert set(forms) == {f"rnn.layers.{i}.weight_{m}" for i in (0, 1) for m in ("ih", "hh")}
    before = {name: (form.mask.clone(), form.weight.detach().clone()) for name, form in forms.items()}
    # the gradient w.r.t. each dense matrix, from a dense copy, summed over the window (the weights do not move)
    reference = copy.deepcopy(model)
    reference.rnn.replace_forms("dense")
    expected_sum = {name: 0.0 for name in forms}
    for step in range(2):
        x, y = batch(step)
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for name, form in leanlstm.graph.lstm_forms(reference):
            expected_sum[name] = expected_sum[name] + form.weight.grad
    train(model, handle, torch.optim.SGD(model.parameters(), lr=0.0), steps=2)
    for name, form in forms.items():
        mask, weight = before[name]
        dormant = ~mask
        count = round(0.25 * int(dormant.sum()))
        score = expected_sum[name].abs().masked_fill(mask, -1.0).flatten()
        chosen = score.topk(count).indices
        assert torch.equal(torch.nonzero((form.mask & dormant).flatten()).flatten().sort().values,
                           chosen.sort().values), name
        grown = (form.mask & dormant)
        torch.testing.assert_close(form.weight[grown], -0.5 * expected_sum[name][grown] / 2, atol=1e-7, rtol=1e-5)
        assert torch.equal(form.weight[mask], weight[mask])
        assert form.dense_grad is None          # the only growth step is done: no more sums


def test_random_growth_ablation_grows_as_many_dormant_entries_independent_of_the_gradient():
    form = MaskedSparse.from_dense(torch.ones(20, 30))
    form.set_mask(torch.rand(20, 30, generator=torch.Generator().manual_seed(0)) < 0.2)
    form.dense_grad = torch.arange(600.0).view(20, 30)            # the gradient would pick the last dormant ones
    before = form.mask.clone()
    picked = grow_(form, 50, generator=torch.Generator().manual_seed(3))
    assert len(picked) == 50 and not before.flatten()[picked].any()
    assert int(form.mask.sum()) == int(before.sum()) + 50
    by_gradient = form.dense_grad.masked_fill(before, -1).flatten().topk(50).indices
    assert len(set(picked.tolist()) & set(by_gradient.tolist())) < 25
    again = MaskedSparse.from_dense(torch.ones(20, 30))
    again.set_mask(before)
    again.dense_grad = form.dense_grad
    assert torch.equal(grow_(again, 50, generator=torch.Generator().manual_seed(3)), picked)   # reproducible


def test_gp_random_criterion_in_a_loop_reaches_the_target():
    torch.manual_seed(0)
    model = Classifier("lstm")
    handle = compress_(model, GrowPrune(compression=2.0, seed_density=0.3, grow_steps=1, grow_ratio=0.25,
                                        grow_every=2, prune_every=1, growth_lr=0.5, total_steps=40,
                                        grow_criterion="random"))
    train(model, handle, torch.optim.SGD(model.parameters(), lr=0.1), steps=40)
    handle.finalize()
    for name, form in handle.forms():
        assert form.nnz() <= final_entries(name, form, 2.0), name


# --- pruning -----------------------------------------------------------------------------------------------
def test_pruning_removes_the_smallest_active_weights_and_keeps_masks_frozen_under_adam():
    model = Classifier("hlstm")
    handle = compress_(model, GrowPrune(compression=4.0, seed_density=0.9, grow_steps=0, prune_ratio=0.3,
                                        prune_every=3, total_steps=40))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    drifted = False
    for step in range(12):
        x, y = batch(step)
        old = masks(model)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        # Adam's momentum moves just-pruned weights (their gradient is zero, their moments are not)
        drifted |= any(bool(form.weight[~form.mask].abs().max() > 0) for _, form in handle.forms())
        stepped = {name: form.weight.detach().clone() for name, form in handle.forms()}
        handle.after_step()
        new = masks(model)
        for name, form in handle.forms():
            assert form.weight[~form.mask].abs().max() == 0, (step, name)      # exactly zero, every step
            if (step + 1) % 3:
                assert torch.equal(new[name], old[name]), (step, name)          # frozen while retraining
            else:
                removed, kept = old[name] & ~new[name], new[name]
                assert not (new[name] & ~old[name]).any()                       # pruning never grows
                keep = max(final_entries(name, form, 4.0),
                           int(old[name].sum()) - max(1, round(0.3 * int(old[name].sum()))))
                assert int(kept.sum()) == keep
                if removed.any():
                    assert stepped[name][removed].abs().max() <= stepped[name][kept].abs().min()
    assert drifted


def test_loss_tolerance_stops_pruning_and_finalize_then_keeps_the_masks():
    model = Classifier("lstm")
    handle = compress_(model, GrowPrune(compression=4.0, seed_density=1.0, grow_steps=0, prune_ratio=0.1,
                                        prune_every=2, loss_tolerance=0.05, total_steps=100))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    method = handle.method
    assert method.observe_validation(5.0) and method.observe_validation(4.8)   # before pruning: the reference
    train(model, handle, optimizer, steps=4)                                   # two pruning steps
    assert method.reference_loss == 4.8
    assert method.observe_validation(5.0)                                      # within 5%
    assert not method.observe_validation(5.1)                                  # past 4.8 * 1.05: stop
    frozen = masks(model)
    train(model, handle, optimizer, steps=6, start=4)
    handle.finalize()
    assert all(torch.equal(frozen[name], mask) for name, mask in masks(model).items())
    assert weight_compression(model) < 4.0 and all(form.density() < 0.85 for _, form in handle.forms())
    summary = handle.summary()
    assert summary["gp_stopped_by_tolerance"] and summary["gp_reference_val_loss"] == 4.8


# --- resume ------------------------------------------------------------------------------------------------
CONFIG = dict(compression=3.0, seed_density=0.3, grow_steps=2, grow_ratio=0.4, grow_every=4, prune_ratio=0.25,
              prune_every=3, growth_lr=0.1, total_steps=40)


def start_run(cell):
    torch.manual_seed(0)
    model = Classifier(cell)
    handle = compress_(model, GrowPrune(**CONFIG))
    return model, handle, torch.optim.Adam(model.parameters(), lr=3e-3)


@pytest.mark.parametrize("cell", ["lstm", "hlstm"])
@pytest.mark.parametrize("stop", [6, 13], ids=["mid-growth-window", "mid-pruning"])
def test_resume_mid_phase_equals_no_interruption(cell, stop):
    model, handle, optimizer = start_run(cell)
    train(model, handle, optimizer, steps=26)
    assert handle.method.plan.growth_end == 8 and handle.method.plan.pruned(stop) == (stop > 8 + 3)

    first, first_handle, first_optimizer = start_run(cell)
    train(first, first_handle, first_optimizer, steps=stop)
    if stop < 8:
        assert any(form.dense_grad.abs().sum() > 0 for _, form in first_handle.forms())   # a window half-summed
    saved = io.BytesIO()
    torch.save({"handle": first_handle.state_dict(), "model": first.state_dict(),
                "optimizer": first_optimizer.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)

    torch.manual_seed(123)                               # a different fresh model and seed mask: all overwritten
    resumed = Classifier(cell)
    resumed_handle = compress_(resumed, GrowPrune(**CONFIG | {"generator_seed": 7}))
    resumed_handle.load_state_dict(state["handle"])
    resumed.load_state_dict(state["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=3e-3)
    resumed_optimizer.load_state_dict(state["optimizer"])
    train(resumed, resumed_handle, resumed_optimizer, steps=26 - stop, start=stop)

    straight, again = model.state_dict(), resumed.state_dict()
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    assert resumed_handle.step == handle.step == 26


def test_a_run_resumed_from_inside_a_growth_window_ends_as_an_uninterrupted_one(tmp_path, ptb_slice_dir):
    def run_config():    # 3 epochs of 6 steps: growth at steps 4 and 8, so epoch 1's checkpoint is mid-window
        return RunConfig(preset="tiny", method="gp", data_dir=str(ptb_slice_dir), verify_data=False,
                         overrides={"epochs": 3, "max_batches": 6}, finetune_overrides={"epochs": 1},
                         method_config={"compression": 3.0, "grow_every": 4, "prune_every": 2, "prune_ratio": 0.5},
                         latency_repeats=0)

    straight = compress_run(run_config(), tmp_path / "a", progress=False)

    class Stop(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            if (trainer.phase, epoch) == ("compress", 2):
                raise KeyboardInterrupt

    original = GrowPruneMethod.callbacks
    GrowPruneMethod.callbacks = lambda self: original(self) + [Stop()]
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_run(run_config(), tmp_path / "b", progress=False)
    finally:
        GrowPruneMethod.callbacks = original
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    method_state = saved["callbacks"][0]["method"]
    assert saved["step"] == 6 and method_state["plan"]["grow_every"] == 4      # between the growth steps 4 and 8
    assert len(method_state["dense_grad"]) == 4                                # the window's sums, every matrix
    resumed = compress_run(run_config(), tmp_path / "b", resume=True, progress=False)
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)
    assert resumed["sparse_density"] == straight["sparse_density"]
    assert resumed["gp_reference_val_loss"] == pytest.approx(straight["gp_reference_val_loss"], rel=1e-6)


# --- whole runs in a user loop -----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: Classifier("hlstm"), Tagger], ids=["hlstm-stack", "bidirectional-proj-lstm"])
def test_gp_in_a_user_loop_reaches_the_target_compression(build):
    model = build()
    steps = 48
    handle = compress_(model, GrowPrune(compression=4.0, growth_lr=0.5, total_steps=steps))
    names = [name for name, _ in handle.forms()]
    if isinstance(model, Classifier):
        assert {name.rsplit("_", 1)[1] for name in names} == {"ih", "hh", "i2", "f2", "g2", "o2"}
    else:
        assert any(name.endswith("weight_hr") for name in names) and len(names) == 12
    plan = handle.method.plan
    assert plan.pruning_end <= steps
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    densities = []
    for step in range(steps):
        if isinstance(model, Classifier):
            x, y = batch(step)
            loss = F.cross_entropy(model(x), y)
        else:
            x, y = torch.randn(3, 6, 10), torch.randint(0, 5, (3, 6))
            loss = F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
        densities.append(sum(form.nnz() for _, form in handle.forms()))
    assert densities[plan.grow_every - 2] < densities[plan.grow_every - 1] < densities[plan.growth_end - 1]
    assert max(densities) == densities[plan.growth_end - 1]                     # grown, then pruned
    for name, form in handle.forms():
        assert form.nnz() == final_entries(name, form, 4.0), name               # every matrix at its target
    assert weight_compression(model) >= 4.0
    before = masks(model)
    handle.finalize()
    assert all(torch.equal(before[name], mask) for name, mask in masks(model).items())
    assert handle.summary()["lstm_weight_compression"] >= 4.0


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"seed_density": 0.0}, "seed_density must lie in"),
    ({"seed_density": 1.5}, "seed_density must lie in"),
    ({"seed_density": -0.2}, "must be a finite number >= 0"),
    ({"prune_ratio": 1.0}, "prune_ratio must lie in"),
    ({"grow_ratio": 2.0}, "grow_ratio must lie in"),
    ({"compression": 0.5}, "compression must be at least 1"),
    ({"seed_mask": "lottery"}, "seed_mask must be one of"),
    ({"grow_every": 2.5}, "grow_every must be a whole number"),
])
def test_bad_options_are_refused_when_the_config_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        GrowPrune(**options)


def test_targets_and_schedules_that_cannot_be_met_are_refused_before_any_change():
    model = nn.Sequential(nn.LSTM(8, 16))
    with pytest.raises(ValueError, match="cannot reach 100.0x"):
        compress_(model, GrowPrune(compression=100.0))
    with pytest.raises(ValueError, match=r"cannot reach 4.0x in 20 optimiser steps: 2 growth steps x 5 steps, then "
                                         r"\d+ pruning steps"):
        compress_(model, GrowPrune(compression=4.0, grow_every=5, prune_every=5, total_steps=20))
    with pytest.raises(ValueError, match="cannot reach 4.0x in 10 optimiser steps"):   # too short to fit at all
        compress_(model, GrowPrune(compression=4.0, total_steps=10))
    assert isinstance(model[0], nn.LSTM)                                 # nothing changed
    unknown = compress_(nn.Sequential(nn.LSTM(8, 16)), GrowPrune(compression=4.0, growth_lr=0.1))
    with pytest.raises(ValueError, match="total_steps=N"):               # at the first step, not mid-run
        unknown.after_step()
    no_lr = compress_(nn.Sequential(nn.LSTM(8, 16)), GrowPrune(compression=4.0, total_steps=100))
    with pytest.raises(ValueError, match="growth_lr="):
        no_lr.after_step()
    assert prune_events(10, 100, 10, GrowPrune(grow_steps=0)) == 0
    assert make_plan(GrowPrune(grow_steps=0), [("w", 10, 100, 10)], total=0).pruning_end == 0


# --- the command line --------------------------------------------------------------------------------------
def test_cli_gp_on_a_ptb_slice(tmp_path, ptb_slice_dir):
    assert METHODS["gp"].Config is GrowPrune
    runner = CliRunner()
    common = ["--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress", "--latency-repeats", "0"]
    args = ["compress", "--method", "gp", "--preset", "tiny", "--set", "compression=4", "--set", "prune_ratio=0.5",
            "--epochs", "1", "--max-batches", "20", "--finetune-epochs", "1", "--out", str(tmp_path / "gp")] + common
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "gp" / "metrics.json").read_text())
    assert metrics["lstm_weight_compression"] >= 4.0 and metrics["gp_schedule"]["grow_steps"] == 2
    assert not metrics["gp_stopped_by_tolerance"] and metrics["gp_reference_val_loss"] > 0
    checkpoint = load_checkpoint(tmp_path / "gp" / "checkpoint.pt")
    assert any(key.endswith("weight_hh.csr_columns") for key in checkpoint["model_state"])   # masks saved as CSR
    bad = runner.invoke(main, ["compress", "--method", "gp", "--preset", "tiny", "--set", "seed_density=1.5",
                               "--out", str(tmp_path / "bad")] + common)
    assert bad.exit_code != 0 and "seed_density must lie in (0, 1]" in bad.output
    short = runner.invoke(main, args[:-len(common) - 2] + ["--max-batches", "3", "--out", str(tmp_path / "s")] + common)
    assert short.exit_code != 0 and "cannot reach 4.0x" in short.output
