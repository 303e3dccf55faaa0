"""The two-phase compress flow that every method goes through, with a small method defined here."""
import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.methods import METHODS, Method, MethodConfig
from leanlstm.methods.iss import UnitMap, shrinkage
from leanlstm.methods.pruning import convert_forms
from leanlstm.nn import LSTM, LowRank
from leanlstm.runs import RunConfig, compress_run, load_run, train_run
from leanlstm.train import Callback


@dataclasses.dataclass
class ShrinkConfig(MethodConfig):
    rank: int = 4
    keep: int = 24


class LowRankThenSlice(Method):
    """Low-rank forms while compressing, counting the steps; then dense again, keeping only the first ``keep`` units
    of the top layer (through the ISS seam: zero the others' components, shrink the stack and its reader)."""

    name = "test-lowrank-slice"
    Config = ShrinkConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0

    def convert(self, handle):
        rank = self.config.rank
        convert_forms(handle, lambda name, dense: LowRank.from_dense(dense, rank=rank),
                      keep=lambda form: isinstance(form, LowRank) and form.options() == {"rank": rank})

    def after_step(self, handle):
        self.steps += 0 if handle.finalized else 1

    def finish(self, handle):
        for lstm in handle.lstms.values():
            lstm.replace_forms("dense")
        units = UnitMap.of(handle.model)
        top = units.of_layer(len(handle.lstms["lstm"].layers) - 1)
        top.zero_(torch.arange(self.config.keep, top.size))
        handle.install(shrinkage(units))

    def summarize(self, handle):
        return {"steps_counted": self.steps}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state, handle):
        self.steps = state["steps"]


@pytest.fixture
def baseline(tmp_path, ptb_slice_dir):
    run = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 1, "max_batches": 10})
    train_run(run, tmp_path / "base", progress=False)
    return tmp_path / "base"


def _compress(ptb_slice_dir, source):
    return RunConfig(preset="tiny", method="test-lowrank-slice", data_dir=str(ptb_slice_dir), verify_data=False,
                     overrides={"epochs": 2, "max_batches": 10}, method_config={"rank": 3, "keep": 20},
                     source=str(source), finetune_overrides={"epochs": 2})


def test_compress_then_finetune_with_resume_in_either_phase(tmp_path, ptb_slice_dir, baseline):
    assert "test-lowrank-slice" in METHODS
    straight = compress_run(_compress(ptb_slice_dir, baseline), tmp_path / "a", progress=False)
    assert straight["hidden_sizes"] == [32, 20]
    assert [(h["phase"], h["epoch"]) for h in straight["history"]] == [
        ("compress", 1), ("compress", 2), ("finetune", 1), ("finetune", 2)]
    assert straight["steps_counted"] == 20 and "baseline_test_ppl" in straight
    assert straight["lstm_compression"] > 1

    for phase, epoch in (("compress", 1), ("finetune", 1)):
        class Stop(Callback):
            def on_epoch_end(self, trainer, e, metrics):
                if (trainer.phase, e) == (phase, epoch + 1):
                    raise KeyboardInterrupt

        out = tmp_path / f"stop-{phase}"
        method = METHODS["test-lowrank-slice"]
        original, original_ft = method.callbacks, method.finetune_callbacks
        method.callbacks = lambda self: original(self) + ([Stop()] if phase == "compress" else [])
        method.finetune_callbacks = lambda self: original_ft(self) + ([Stop()] if phase == "finetune" else [])
        try:
            with pytest.raises(KeyboardInterrupt):
                compress_run(_compress(ptb_slice_dir, baseline), out, progress=False)
        finally:
            method.callbacks, method.finetune_callbacks = original, original_ft
        assert load_checkpoint(out / "checkpoint.pt")["phase"] == phase
        resumed = compress_run(_compress(ptb_slice_dir, baseline), out, resume=True, progress=False)
        assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)
        assert resumed["hidden_sizes"] == [32, 20]


def test_cli_compress_and_method_options(tmp_path, ptb_slice_dir, baseline):
    runner = CliRunner()
    args = ["compress", "--method", "test-lowrank-slice", "--from", str(baseline), "--set", "rank=2",
            "--set", "keep=16", "--out", str(tmp_path / "c"), "--epochs", "1", "--max-batches", "4",
            "--finetune-epochs", "1", "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["hidden_sizes"] == [32, 16]
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["method_config"] == {"rank": 2, "keep": 16} and saved["preset"] == "tiny"
    bad = runner.invoke(main, args[:5] + ["--set", "nope=1", "--out", str(tmp_path / "d")])
    assert bad.exit_code != 0 and "has no option nope" in bad.output
    for method, option in (("test-lowrank-slice", "rank=-2"), ("iss", "strength=nan"), ("prune", "compression=inf")):
        bad = runner.invoke(main, ["compress", "--method", method, "--set", option, "--out", str(tmp_path / "d")])
        name = option.split("=")[0]
        assert bad.exit_code != 0 and f"option {name} must be a finite number >= 0" in bad.output
    unknown = runner.invoke(main, ["compress", "--method", "nope", "--out", str(tmp_path / "e")])
    assert unknown.exit_code != 0 and "unknown method 'nope'" in unknown.output


def test_compression_is_counted_against_the_source_models_sizes(tmp_path, ptb_slice_dir):
    """A source trained at other sizes than its preset's: the factor is against the source's dense LSTM."""
    run = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False, hidden_sizes=[16, 24],
                    overrides={"epochs": 1, "max_batches": 4})
    train_run(run, tmp_path / "base", progress=False)
    compressed = compress_run(dataclasses.replace(_compress(ptb_slice_dir, tmp_path / "base"),
                                                  latency_repeats=0), tmp_path / "c", progress=False)
    assert compressed["hidden_sizes"] == [16, 20]
    source_dense = LSTM(32, [16, 24]).dense_params()   # tiny's embedding is 32 wide
    assert compressed["lstm_compression"] == pytest.approx(source_dense / compressed["lstm_params"])


def test_dropout_override_reaches_the_model_and_its_checkpoint(tmp_path, ptb_slice_dir, baseline):
    """``--dropout`` replaces the --from run's rate (ISS as published trains with less dropout than the
    baseline); the checkpoint records it, so a resumed run rebuilds the model with it (``load_run`` is that path)."""
    assert load_run(baseline)[1].config.dropout != 0.2
    runner = CliRunner()
    args = ["compress", "--method", "test-lowrank-slice", "--from", str(baseline), "--dropout", "0.2",
            "--out", str(tmp_path / "c"), "--epochs", "1", "--max-batches", "4", "--finetune-epochs", "1",
            "--latency-repeats", "0", "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    model = load_run(tmp_path / "c")[1]
    assert model.config.dropout == 0.2 and model.dropout.p == 0.2 and model.lstm.dropout == 0.2
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dropout"] == 0.2
    for bad in ("1.0", "-0.1"):
        refused = runner.invoke(main, args[:5] + ["--dropout", bad, "--out", str(tmp_path / "bad")])
        assert refused.exit_code != 0 and "--dropout" in refused.output
        assert not (tmp_path / "bad").exists()


def test_seed_option_sets_the_compression_run_seed(tmp_path, ptb_slice_dir, baseline):
    """``--seed`` (repeated runs of a method, their median the result) reaches the run: the same seed gives the same
    model, another seed another; a seed out of range is refused before any run directory is made."""
    runner = CliRunner()

    def compress(seed, out):
        args = ["compress", "--method", "test-lowrank-slice", "--from", str(baseline), "--seed", seed,
                "--out", str(tmp_path / out), "--epochs", "1", "--max-batches", "3", "--finetune-epochs", "0",
                "--dropout", "0.5", "--latency-repeats", "0", "--data-dir", str(ptb_slice_dir), "--no-verify-data",
                "--no-progress"]
        return runner.invoke(main, args)

    for seed, out in (("7", "a"), ("7", "b"), ("8", "c")):
        result = compress(seed, out)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["overrides"]["seed"] == 7
    weights = {out: [p.detach() for p in load_run(tmp_path / out)[1].parameters()] for out in "abc"}
    assert all(torch.equal(x, y) for x, y in zip(weights["a"], weights["b"]))
    assert not all(torch.equal(x, y) for x, y in zip(weights["a"], weights["c"]))
    refused = compress("-1", "bad")
    assert refused.exit_code != 0 and "--seed" in refused.output and not (tmp_path / "bad").exists()


def test_the_budget_search_refuses_a_single_methods_options_even_when_zero(tmp_path, baseline):
    result = CliRunner().invoke(main, ["compress", "--from", str(baseline), "--latency-budget-us", "5",
                                       "--dropout", "0", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "--dropout" in result.output and not (tmp_path / "s").exists()
