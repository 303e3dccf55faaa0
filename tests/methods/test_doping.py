"""Doping (structured + annealed sparse matrix with co-matrix dropout) and the plain structured methods."""
import json

import pytest
import torch
from click.testing import CliRunner

from leanlstm import LSTM
from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.compress import compress_
from leanlstm.methods import METHODS, Doped, Structured, config_for, get_method
from leanlstm.methods.doping import DopedMethod, DopingConfig, StructuredConfig, StructuredMethod
from leanlstm.methods.pruning import final_entries, weight_compression
from leanlstm.nn.forms import BlockCirculant, Hybrid, Kronecker, LowRank
from leanlstm.nn.forms import Doped as DopedForm
from leanlstm.runs import RunConfig, compress_run, evaluate_run
from leanlstm.train import Callback

DOPED = {"doped-kp": Kronecker, "doped-lmf": LowRank, "doped-hmd": Hybrid}
PLAIN = {"kp": Kronecker, "lmf": LowRank, "hmd": Hybrid, "circulant": BlockCirculant}


def _method(name, **options):
    cls = get_method(name)
    return cls(cls.Config(**options))


@pytest.mark.parametrize("name", DOPED)
def test_doped_methods_land_on_the_target_compression(name):
    lstm = LSTM(200, 200, 2)                                           # 800 x 200 matrices
    method = _method(name, compression=20.0)
    method.prepare(lstm)
    for _, form in lstm.forms():
        assert isinstance(form, DopedForm) and isinstance(form.structured, DOPED[name])
        assert form.sparse.density() == 1.0                            # D starts dense
    method.finalize(lstm)                                              # D at its final density
    # within one sparse entry (6 bytes) of each matrix's 32 000-byte budget
    assert 20.0 <= weight_compression(lstm) <= 20.0 * 32_000 / (32_000 - 6)
    summary = method.summary(lstm)
    assert summary["lstm_weight_compression"] == weight_compression(lstm)
    assert all(0.005 < d < 0.012 for d in summary["sparse_density"].values())  # about 99% sparse
    assert summary["structure"] == METHODS[name].structure


def test_doping_arithmetic_for_a_medium_sized_matrix():
    # The worked example of the doping module's docstring: 2600x650 at 20x with doping_share 0.25.
    method = _method("doped-kp", compression=20.0)
    assert method.structure_bytes(2600, 650) == pytest.approx(0.75 * (338_000 - 2601 * 4))
    options = method.structure_options(2600, 650)
    assert options == {"factor_shapes": [[653, 94], [4, 7]]}
    form = DopedForm(2600, 650, "kronecker", options)
    assert final_entries("w", form, 20.0) == (338_000 - 61_410 * 4 - 2601 * 4) // 6 == 13_659


@pytest.mark.parametrize("name", PLAIN)
def test_plain_structured_methods_fit_the_largest_structure_in_the_budget(name):
    lstm = LSTM(200, 200, 2)
    method = _method(name, compression=20.0)
    method.prepare(lstm)
    assert all(type(form) is PLAIN[name] for _, form in lstm.forms())
    compression = weight_compression(lstm)
    assert 20.0 <= compression < 20.0 * 1.3
    assert method.summary(lstm)["lstm_weight_compression"] == compression
    assert not method.has_finetune


def test_the_next_larger_structure_would_not_fit():
    budget = 800 * 200 / 20                                            # float32 values
    rank = _method("lmf", compression=20.0).structure_options(800, 200)["rank"]
    assert rank * 1000 <= budget < (rank + 1) * 1000
    block = _method("circulant", compression=20.0).structure_options(800, 200)["block_size"]
    assert block == 20 and 40 * 10 * 20 == budget
    (m1, n1), (m2, n2) = _method("kp", compression=20.0).structure_options(800, 200)["factor_shapes"]
    assert m1 * m2 >= 800 and n1 * n2 >= 200 and budget * 0.9 < m1 * n1 + m2 * n2 <= budget


def test_conversion_keeps_the_function_while_d_is_dense():
    torch.manual_seed(0)
    lstm = LSTM(12, 16, 2).eval()
    x = torch.randn(7, 3, 12)
    with torch.no_grad():
        before = lstm(x)[0]
        _method("doped-hmd", compression=3.0).prepare(lstm)
        torch.testing.assert_close(lstm.eval()(x)[0], before, atol=1e-5, rtol=1e-5)


def test_registered_names_fix_their_structure():
    assert {"doped-kp", "doped-lmf", "doped-hmd", "kp", "lmf", "hmd", "circulant"} <= set(METHODS)
    assert get_method("doped-lmf").Config().structure == "lowrank"
    assert isinstance(get_method("doped-lmf").Config(), DopingConfig)
    assert get_method("circulant").Config.from_strings({"compression": "8"}).compression == 8.0
    with pytest.raises(ValueError, match="method doped-kp uses structure kronecker, not lowrank"):
        _method("doped-kp", structure="lowrank")
    with pytest.raises(ValueError, match="structure must be one of"):
        StructuredMethod(StructuredConfig(structure="toeplitz"))
    lstm = LSTM(20, 24)
    DopedMethod(DopingConfig(structure="circulant", compression=4.0)).prepare(lstm)   # any structure, unnamed
    assert isinstance(lstm.layers[0].weight_hh.structured, BlockCirculant)
    with pytest.raises(ValueError, match="row pointers alone"):
        _method("doped-kp", compression=40.0).prepare(LSTM(32, 32))


def test_cmr_is_on_before_finalize_and_off_after_it():
    model = torch.nn.Sequential(torch.nn.LSTM(20, 24))
    handle = compress_(model, Doped("lowrank", compression=4.0, cmr=0.3, cmr_mode="matrix"))
    assert all((form.cmr, form.cmr_mode) == (0.3, "matrix") for _, form in handle.forms())
    handle.finalize()
    assert all(form.cmr == 0.0 for _, form in handle.forms())
    again = compress_(model, Doped("lowrank", compression=4.0, cmr=0.3))   # re-attached: the forms are kept
    assert again.forms()[0][1] is handle.forms()[0][1] and again.forms()[0][1].cmr == 0.3


def test_public_configs_name_the_same_methods_as_the_cli():
    assert config_for("doped-kp", {"compression": 10}) == Doped("kronecker", compression=10)
    assert config_for("lmf") == Structured("lowrank")
    assert Doped.from_dict(Doped("hybrid", doping_share=0.5).to_dict()) == Doped("hybrid", doping_share=0.5)
    assert isinstance(get_method("kp")(config_for("kp")), StructuredMethod)
    with pytest.raises(ValueError, match="Doped has no option rank"):
        config_for("doped-lmf", {"rank": 3})


# --- runs ---------------------------------------------------------------------------------------------------
def _run(ptb_slice_dir, method="doped-kp", **options):
    return RunConfig(preset="tiny", method=method, data_dir=str(ptb_slice_dir), verify_data=False,
                     overrides={"epochs": 2, "max_batches": 8}, finetune_overrides={"epochs": 1},
                     method_config={"compression": 10.0, "prune_every": 2, **options})


def _final_densities(metrics):
    lstm = LSTM.from_config(load_checkpoint(metrics)["model_config"]["lstm"])
    return {f"lstm.{name}": final_entries(name, form, 10.0) / 4096 for name, form in lstm.forms()}


def test_doped_run_on_a_ptb_slice_anneals_d_to_its_target_and_resumes_exactly(tmp_path, ptb_slice_dir):
    straight = compress_run(_run(ptb_slice_dir), tmp_path / "a", progress=False)
    assert straight["sparse_density"] == _final_densities(tmp_path / "a" / "checkpoint.pt")
    assert all(d < 0.02 for d in straight["sparse_density"].values())
    assert 10.0 <= straight["lstm_weight_compression"] <= 10.0 * 1.005
    assert [(h["phase"], h["epoch"]) for h in straight["history"]] == [("compress", 1), ("compress", 2),
                                                                        ("finetune", 1)]

    halfway, annealed = {}, {}

    class Stop(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            densities = {f"lstm.{name}": form.sparse.density() for name, form in trainer.model.lstm.forms()}
            if epoch == 1:                                             # step 8 of 16; annealing ends at 12
                halfway.update(densities)
            if epoch == 2:                                             # step 16: the schedule, not finalize()
                annealed.update(densities)
                raise KeyboardInterrupt

    method = METHODS["doped-kp"]
    original = method.callbacks
    method.callbacks = lambda self: original(self) + [Stop()]
    try:
        with pytest.raises(KeyboardInterrupt):
            compress_run(_run(ptb_slice_dir), tmp_path / "b", progress=False)
    finally:
        method.callbacks = original
    assert all(straight["sparse_density"][name] < d < 0.2 for name, d in halfway.items())
    assert annealed == straight["sparse_density"]                     # reached during training
    resumed = compress_run(_run(ptb_slice_dir), tmp_path / "b", resume=True, progress=False)
    assert resumed["test_ppl"] == pytest.approx(straight["test_ppl"], rel=1e-6)
    assert resumed["sparse_density"] == straight["sparse_density"]


def test_plain_circulant_run_trains_and_checkpoints(tmp_path, ptb_slice_dir):
    run = RunConfig(preset="tiny", method="circulant", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 1, "max_batches": 4}, method_config={"compression": 8.0})
    metrics = compress_run(run, tmp_path / "c", progress=False)
    assert [h["phase"] for h in metrics["history"]] == ["compress"]
    assert metrics["lstm_weight_compression"] >= 8.0 and metrics["structure_options"]["lstm.layers.0.weight_ih"]


def test_cli_compress_with_doped_kp(tmp_path, ptb_slice_dir):
    out = tmp_path / "cli"
    args = ["compress", "--method", "doped-kp", "--preset", "tiny", "--set", "compression=10", "--out", str(out),
            "--epochs", "1", "--max-batches", "4", "--finetune-epochs", "1", "--data-dir", str(ptb_slice_dir),
            "--no-verify-data", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method_config"]["structure"] == "kronecker" and metrics["method_config"]["compression"] == 10.0
    assert 10.0 <= metrics["lstm_weight_compression"] <= 10.0 * 1.005
    assert printed["lstm_compression"] < metrics["lstm_weight_compression"]     # biases count there
    assert metrics["sparse_density"] == _final_densities(out / "checkpoint.pt")


def test_cli_compress_schedule_flags_and_no_finetuning(tmp_path, ptb_slice_dir):
    """--decay-after/--lr-decay shape the compression phase; --finetune-epochs 0 finalises without training."""
    out = tmp_path / "cli0"
    args = ["compress", "--method", "doped-kp", "--preset", "tiny", "--set", "compression=10", "--set",
            "prune_every=2", "--out", str(out), "--epochs", "2", "--lr", "0.5", "--decay-after", "1",
            "--lr-decay", "0.25", "--max-batches", "8", "--finetune-epochs", "0", "--latency-repeats", "0",
            "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(h["phase"], h["lr"]) for h in metrics["history"]] == [("compress", 0.5), ("compress", 0.125)]
    # the final step still ran: D at its final density, CMR off in the saved model
    assert metrics["sparse_density"] == _final_densities(out / "checkpoint.pt")
    assert "latency_us_per_step" not in metrics
    # the validation reported is the final model's, not the last epoch's from before the final step
    assert metrics["val_ppl"] == pytest.approx(evaluate_run(out, splits=("valid",))["valid"]["ppl"], rel=1e-6)
