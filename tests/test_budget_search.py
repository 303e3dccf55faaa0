"""The search across methods to a latency budget (``leanlstm.budget_search``, ``leanlstm compress
--latency-budget-us N`` without ``--method``): sizing on a synthetic latency, the front and the pick of a real
search on a tiny PTB run, resume, bad input."""
import json

import pytest
import torch
from click.testing import CliRunner

from leanlstm import budget_search
from leanlstm.budget_search import BudgetSearch, size_method
from leanlstm.cli import main
from leanlstm.nn import LSTM


@pytest.fixture
def tiny_run(tmp_path, ptb_slice_dir):
    run_dir = tmp_path / "base"
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--out", str(run_dir), "--data-dir",
                                       str(ptb_slice_dir), "--max-tokens", "3000", "--epochs", "1", "--max-batches",
                                       "4", "--no-verify-data", "--no-progress"])
    assert result.exit_code == 0, result.output
    return run_dir


def synthetic_latency(monkeypatch, us_of_strength):
    """Structures measure ``us_of_strength(knob value)`` (None: the method refuses to build it)."""
    def fake(name, settings, model, backend, config):
        value = us_of_strength(next(iter(settings.values()), 1.0))
        return "cannot reach it" if value is None else float(value)
    monkeypatch.setattr(budget_search, "_structure_us", fake)


def test_a_knob_takes_the_weakest_ladder_value_that_fits(monkeypatch):
    synthetic_latency(monkeypatch, lambda strength: 100 / strength)
    row = size_method("prune", LSTM(8, 16), BudgetSearch(latency_budget_us=30, margin=0.1))
    assert row["settings"] == {"compression": 4} and row["structure_us"] == 25.0   # 3 gives 33.3 > 27
    assert row["how"] == "compression ladder" and row["backend"] == "leanlstm"


def test_a_method_out_of_reach_is_left_out_with_how_close_it_came(monkeypatch):
    synthetic_latency(monkeypatch, lambda strength: 50 + 10 / strength if strength <= 8 else None)
    row = size_method("doped-kp", LSTM(8, 16), BudgetSearch(latency_budget_us=30))
    assert row["settings"] is None and "fastest: 51.25 us" in row["note"]
    synthetic_latency(monkeypatch, lambda strength: 40.0)
    row = size_method("int8", LSTM(8, 16), BudgetSearch(latency_budget_us=30, backend="onnxruntime"))
    assert row["settings"] is None and row["backend"] == "onnxruntime-int8" and "over the budget less its margin (27.00 us)" in row["note"]


def test_methods_with_a_budget_of_their_own_take_it():
    config = BudgetSearch(latency_budget_us=25, backend="onnxruntime")
    row = size_method("symbiotic", LSTM(8, 16), config)
    assert row["settings"] == {"latency_budget_us": 25, "backend": "onnxruntime"}
    row = size_method("iss", LSTM(8, 16), config)                  # ISS's target is the engine's latency
    assert row["settings"] is None and "leanlstm engine" in row["note"]
    assert size_method("iss", LSTM(8, 16), BudgetSearch(latency_budget_us=25))["settings"] == {
        "target_latency_us": 25}


def test_structures_are_measured_on_a_copy_and_sparser_runs_faster():
    torch.manual_seed(0)
    lstm = LSTM(256, 256, num_layers=2)
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    config = BudgetSearch(latency_budget_us=1e6, repeats=5, seq_len=10)
    dense = budget_search._structure_us("prune", {"compression": 1.0001}, lstm, "leanlstm", config)
    sparse = budget_search._structure_us("prune", {"compression": 30}, lstm, "leanlstm", config)
    assert isinstance(sparse, float) and sparse < dense
    assert all(torch.equal(v, before[k]) for k, v in lstm.state_dict().items())


def test_search_trains_measures_and_picks_the_most_accurate_within_the_budget(tmp_path, tiny_run, ptb_slice_dir):
    out = tmp_path / "search"
    args = ["compress", "--from", str(tiny_run), "--latency-budget-us", "1000", "--methods", "int8,prune",
            "--epochs", "1", "--finetune-epochs", "1", "--max-batches", "3", "--latency-repeats", "3",
            "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "search.json").read_text())
    assert [row["method"] for row in state["front"]] == ["dense", "int8", "prune"]
    assert [row["backend"] for row in state["front"]] == ["leanlstm", "leanlstm-int8", "leanlstm"]
    assert state["sizing"][1]["settings"] == {"compression": 1.5}     # a generous budget: the weakest strength
    within = [row for row in state["front"] if row["within_budget"]]
    assert within and all(isinstance(row["stack_us"], float) and row["stack_us"] <= 1000 for row in within)
    best = min(within, key=lambda row: row["val_ppl"])
    assert state["picked"] == best["method"] and state["picked_run"] == str(out / best["method"])
    assert state["front"][0]["run"] == str(tiny_run)
    for row in state["front"]:
        metrics = json.loads((tmp_path / row["run"] / "metrics.json").read_text())
        assert metrics["val_ppl"] == row["val_ppl"]
    stamp = (out / "prune" / "metrics.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args + ["--resume"])          # finished candidates are not trained again
    assert again.exit_code == 0, again.output
    assert (out / "prune" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "search.json").read_text())["sizing"] == state["sizing"]


def test_a_method_with_its_own_budget_takes_it_from_the_option(tmp_path, tiny_run):
    out = tmp_path / "iss"
    result = CliRunner().invoke(main, ["compress", "--method", "iss", "--from", str(tiny_run), "--latency-budget-us",
                                       "5", "--epochs", "1", "--max-batches", "2", "--finetune-epochs", "0",
                                       "--latency-repeats", "0", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["method_config"]["target_latency_us"] == 5.0


@pytest.mark.parametrize("args, message", [
    (["--out", "x"], "or --latency-budget-us N"),
    (["--latency-budget-us", "5", "--out", "x"], "give --from RUN"),
    (["--latency-budget-us", "5", "--set", "compression=4", "--out", "x"], "--set configure one method"),
    (["--method", "prune", "--latency-budget-us", "5", "--out", "x"], "method prune takes no latency budget"),
    (["--method", "prune", "--backend", "torch", "--out", "x"], "belong to the search"),
])
def test_bad_input_is_refused_with_what_to_do(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compress", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_bad_search_settings_name_what_is_wrong(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        BudgetSearch(latency_budget_us=5, backend="tpu")
    with pytest.raises(ValueError, match="latency_budget_us must"):
        BudgetSearch()
    result = CliRunner().invoke(main, ["compress", "--from", str(tiny_run), "--latency-budget-us", "5", "--methods",
                                       "prune,quantum", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "quantum" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["compress", "--from", str(tiny_run), "--latency-budget-us", "5", "--out",
                                       str(tmp_path / "full"), "--methods", "int8", "--latency-repeats", "3"])
    assert result.exit_code != 0 and "is not empty" in result.output
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_docstring_examples():
    import doctest

    result = doctest.testmod(budget_search, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
