"""AntMan: the budget arithmetic hits its target, compress_ converts any user model and round-trips, a distilled
loop lowers the loss, and the CLI compresses a run with distillation from it."""
import copy
import doctest
import importlib
import json

import pytest
import torch
from click.testing import CliRunner

from leanlstm.cli import main
from leanlstm.compress import compress_, compressed_config, restore_
from leanlstm.methods import METHODS, AntMan, config_for
from leanlstm.methods.antman import AntManMethod, macs_reduction, multiply_adds
from leanlstm.methods.pruning import weight_compression
from leanlstm.nn.forms import GroupDense, GroupLowRank, LowRank
from leanlstm.runs import RunConfig, train_run
from leanlstm.tasks.distill import soft_target_loss
from tests.user_models import KeywordSpotter, Tagger

SHAPES = [(2600, 650), (800, 200), (512, 40), (512, 128), (128, 96), (36, 17)]


def _sized(structure, out, inp, reduction, **options):
    method = AntManMethod(AntMan(structure=structure, reduction=reduction, **options))
    return method, method.structure_options(out, inp)


def test_the_documented_example():
    _, options = _sized("grouplowrank", 2600, 650, 10.0)
    assert options == {"groups": 5, "rank": 250, "shuffle": True}
    assert GroupLowRank(2600, 650, **options).multiply_adds() == 162_500          # 10.4x; rank 275: 178 750
    assert _sized("group", 2600, 650, 10.0)[1] == {"groups": 10, "shuffle": True}
    assert _sized("lowrank", 2600, 650, 10.0)[1] == {"rank": 52}


@pytest.mark.parametrize("reduction", [2.0, 4.0, 10.0, 20.0, 37.5, 100.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_grouplowrank_meets_the_target_and_the_next_rank_would_not(shape, reduction):
    out, inp = shape
    budget = out * inp / reduction
    if budget < out + inp:                                                       # not even rank 1 fits
        with pytest.raises(ValueError, match="lower the reduction"):
            _sized("grouplowrank", out, inp, reduction)
        return
    method, options = _sized("grouplowrank", out, inp, reduction)
    g, rank = options["groups"], options["rank"]
    form = GroupLowRank(out, inp, **options)
    assert form.multiply_adds() <= budget and form.nbytes() <= 4 * budget        # macs and bytes alike
    capped = rank == g * min(out, inp)                                           # blocks as wide as they are tall
    assert capped or GroupLowRank(out, inp, g, rank + g * g).multiply_adds() > budget
    assert g == 1 or form.block_rank >= method.config.min_block_rank
    for more in (d for d in range(g + 1, min(out, inp) + 1) if out % d == 0 and inp % d == 0):
        bigger = AntManMethod(AntMan(reduction=reduction, groups=more)).structure_options
        try:
            assert GroupLowRank(out, inp, **bigger(out, inp)).block_rank < method.config.min_block_rank
        except ValueError:                                                       # no rank fits at all
            pass


@pytest.mark.parametrize("reduction", [2.0, 10.0, 30.0])
@pytest.mark.parametrize("shape", [(2600, 650), (800, 200), (512, 128)])
def test_group_and_lowrank_meet_the_target(shape, reduction):
    out, inp = shape
    budget = out * inp / reduction
    groups = _sized("group", out, inp, reduction)[1]["groups"]
    assert GroupDense(out, inp, groups).multiply_adds() <= budget
    smaller = [d for d in range(1, groups) if out % d == 0 and inp % d == 0]
    assert all(out * inp // d > budget for d in smaller)                         # fewer groups would not fit
    rank = _sized("lowrank", out, inp, reduction)[1]["rank"]
    assert rank * (out + inp) <= budget < (rank + 1) * (out + inp)


def test_a_byte_budget_and_explicit_groups():
    assert _sized("grouplowrank", 800, 200, 10.0, budget="bytes")[1] == _sized("grouplowrank", 800, 200, 10.0)[1]
    assert _sized("grouplowrank", 800, 200, 10.0, groups=4)[1] == {"groups": 4, "rank": 64, "shuffle": True}
    assert _sized("grouplowrank", 800, 200, 10.0, shuffle=False)[1] == {"groups": 2, "rank": 32,
                                                                        "shuffle": False}
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        _sized("grouplowrank", 800, 200, 10.0, groups=3)
    with pytest.raises(ValueError, match="lower the reduction"):
        _sized("group", 512, 40, 10.0)                                            # at most gcd = 8 groups
    for bad, message in (({"structure": "kron"}, "structure must be"), ({"budget": "flops"}, "budget must be"),
                         ({"reduction": 0.5}, "at least 1")):
        with pytest.raises(ValueError, match=message):
            AntManMethod(AntMan(**bad))


def test_cli_name_and_config_round_trip():
    assert METHODS["antman"] is AntManMethod and AntManMethod.distill_from_source
    config = AntMan(reduction=20, groups=2, shuffle=False)
    assert config_for("antman", config.to_dict()) == config
    assert AntMan.from_strings({"reduction": "20", "groups": "2", "shuffle": "false"}) == config


@pytest.mark.parametrize("build, batch", [(KeywordSpotter, lambda: torch.randn(4, 6, 40)),
                                          (Tagger, lambda: torch.randn(3, 6, 10))])
def test_compress_converts_a_user_model_and_round_trips(build, batch, tmp_path):
    model = build()
    handle = compress_(model, AntMan(reduction=4))
    forms = handle.forms()
    assert forms and all(isinstance(form, (GroupLowRank, LowRank)) for _, form in forms)
    summary = handle.summary()
    assert summary["lstm_macs_reduction"] == pytest.approx(macs_reduction(forms))
    assert summary["lstm_macs_reduction"] >= 4.0
    assert summary["lstm_weight_compression"] == pytest.approx(weight_compression(forms))
    assert summary["lstm_macs"] == sum(multiply_adds(f) for _, f in forms)
    assert summary["structure_options"] == {name: form.options() for name, form in forms}
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh = restore_(build(), json.loads(json.dumps(compressed_config(model))))
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_conversion_starts_near_the_dense_model_and_refuses_before_any_change():
    torch.manual_seed(0)
    model = KeywordSpotter()
    x = torch.randn(4, 6, 40)
    with torch.no_grad():
        dense = model.eval()(x)
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        compress_(model, AntMan(reduction=2, groups=3))
    assert type(model.rnn).__name__ == "LSTM" and type(model.rnn).__module__ == "torch.nn.modules.rnn"
    compress_(model, AntMan(reduction=1.5, structure="grouplowrank"))
    with torch.no_grad():
        assert (model.eval()(x) - dense).abs().max() < 0.5 * dense.abs().max()


def test_a_distilled_user_loop_lowers_the_loss():
    torch.manual_seed(0)
    teacher = KeywordSpotter(hidden=32).eval()
    with torch.no_grad():
        teacher.fc.weight.mul_(30.0)                                   # confident predictions worth learning
    student = copy.deepcopy(teacher)
    handle = compress_(student, AntMan(reduction=4, min_block_rank=2))
    assert any(form.groups > 1 for _, form in handle.forms())
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        x = torch.randn(16, 8, 40)
        with torch.no_grad():
            target = teacher(x)
        loss = soft_target_loss(student.train()(x), target)            # the teacher's distribution, weight 1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])                  # closer to the teacher
    assert handle.summary()["step"] == 60


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ptb_slice_dir):
    out = tmp_path_factory.mktemp("antman") / "base"
    run = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 1, "max_batches": 20})
    train_run(run, out, progress=False)
    return out


def test_cli_compresses_a_run_with_distillation_from_it_by_default(tmp_path, ptb_slice_dir, tiny_run):
    out = tmp_path / "antman"         # no --distill-from: AntMan learns from the model it compresses
    args = ["compress", "--method", "antman", "--from", str(tiny_run),
            "--set", "reduction=4", "--set", "min_block_rank=2", "--epochs", "2", "--max-batches", "6",
            "--latency-repeats", "0", "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method_config"]["reduction"] == 4.0 and metrics["distilled_from"] == str(tiny_run)
    assert json.loads((out / "config.json").read_text())["distill_from"] == str(tiny_run)
    assert metrics["lstm_macs_reduction"] >= 4.0 and metrics["structure"] == "grouplowrank"
    first, second = metrics["history"]
    assert second["val_loss"] < first["val_loss"]                              # training with the teacher helps
    options = metrics["structure_options"]["lstm.layers.0.weight_hh"]                # 128 x 32
    assert options == {"groups": 2, "rank": 12, "shuffle": True}                  # blocks of rank 3
    listed = CliRunner().invoke(main, ["methods"])
    assert "antman" in listed.output and "reduction=10.0" in listed.output


@pytest.mark.parametrize("name", ["leanlstm.methods.antman"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
