"""Every option is checked before work starts (issue 29, one test per item), and the run files are read with errors
that name the file; plus the CLI's data inheritance of ``compress --from`` and bench's faster/slower words."""
import json
import math
import resource
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import leanlstm
from leanlstm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from leanlstm.cli import main
from leanlstm.cli.bench import _print_table, speed
from leanlstm.files import FileProblem, check_writable, read_json, write_json
from leanlstm.methods import ISS, AntMan, Doped, GrowPrune, Prune, Structured
from leanlstm.runs import RunConfig, ignored_options, train_run
from leanlstm.runtime.profile import ProfileSettings, check_sizes, profile
from leanlstm.train import ConfigError, NoTrainingData, Trainer, TrainConfig, TrainingDiverged
from tests.test_train import StopAfter


def _common(data_dir) -> list[str]:
    return ["--preset", "tiny", "--data-dir", str(data_dir), "--no-verify-data", "--max-items", "400",
            "--max-batches", "1", "--no-progress"]


def _train(args, data_dir, out):
    return CliRunner().invoke(main, ["train", *_common(data_dir), "--epochs", "1", "--out", str(out), *args])


def _compress(args, data_dir, out, method="iss"):
    return CliRunner().invoke(main, ["compress", "--method", method, *_common(data_dir), "--epochs", "1",
                                     "--finetune-epochs", "1", "--latency-repeats", "0", "--out", str(out), *args])


def _refused(result, *words, code=2):
    """A clean usage error: the exit code, a message with ``words``, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def _unfinished(data_dir, out, **changes) -> Path:
    """A run stopped after its first epoch's checkpoint."""
    run = RunConfig(preset="tiny", data_dir=str(data_dir), verify_data=False, max_tokens=400,
                    overrides={"epochs": 2, "max_batches": 1}, **changes)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, out, progress=False, callbacks=[StopAfter(2)])
    return Path(out)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ptb_slice_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _train([], ptb_slice_dir, out)
    assert result.exit_code == 0, result.output
    return out


# --- 1. sizes are checked before anything is built --------------------------------------------------------------
def test_1_a_huge_profile_request_is_refused_at_once(tmp_path):
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    result = CliRunner().invoke(main, ["profile", "--sizes", "1:1000000000", "--out", str(tmp_path / "p")])
    _refused(result, "--sizes", "1000000000", "at most 100000")
    assert time.perf_counter() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024   # KiB: under 100 MiB
    assert not (tmp_path / "p").exists()
    too_large = CliRunner().invoke(main, ["profile", "--sizes", "1:100000:1000", "--out", str(tmp_path / "p")])
    _refused(too_large, "--sizes", "99001", "memory")
    with pytest.raises(ConfigError, match="memory"):        # the Python API checks the same
        profile([8, 500_000], tmp_path / "q", ProfileSettings(backend="torch"))
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="number of sizes"):
        check_sizes(10**6, 10, ProfileSettings())


# --- 2. a negative clip -------------------------------------------------------------------------------------------
def test_2_a_negative_clip_is_refused(tmp_path, ptb_slice_dir):
    _refused(_train(["--clip", "-5"], ptb_slice_dir, tmp_path / "r"), "--clip", "-5", "[0, 1000000]")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match=r"clip must lie in \[0, 1000000\]"):
        TrainConfig(clip=-5)
    assert TrainConfig(clip=0).clip == 0        # 0: no clipping


# --- 3. learning rates and their decay ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [(["--lr", "1e30"], "--lr"), (["--lr", "0"], "--lr"),
                                          (["--lr", "nan"], "--lr"), (["--lr-decay", "-1", "--decay-after", "0"],
                                                                       "--lr-decay"),
                                          (["--lr-decay", "1e308"], "--lr-decay"),
                                          (["--finetune-lr", "-0.1"], "--finetune-lr")])
def test_3_learning_rates_out_of_range_are_refused(tmp_path, ptb_slice_dir, args, option):
    _refused(_compress(args, ptb_slice_dir, tmp_path / "c"), option)
    assert not (tmp_path / "c").exists()


class _Task:
    """The least a Trainer needs, with a validation perplexity that overflowed."""

    metric, train_metric_name = "ppl", "ppl"

    def num_train_batches(self):
        return 1

    def train_batches(self, epoch=1):
        yield torch.ones(2, 3)

    def training_loss(self, model, batch, state):
        return model(batch).pow(2).mean(), None

    def train_metric(self, loss):
        return math.exp(loss)

    def evaluate(self, model, split):
        return {"loss": 120.0, "ppl": math.inf}


def test_3_an_infinite_validation_metric_stops_training_and_json_refuses_infinities(tmp_path):
    trainer = Trainer(torch.nn.Linear(3, 1), _Task(), TrainConfig(epochs=1, lr=0.1))
    with pytest.raises(TrainingDiverged, match="validation ppl became inf"):
        trainer.fit()
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"ppl": math.inf})
    assert not (tmp_path / "m.json").exists()


# --- 4. counts that would train nothing --------------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [(["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
                                          (["--max-batches", "0"], "--max-batches"),
                                          (["--max-batches", "-1"], "--max-batches"),
                                          (["--max-tokens", "0"], "--max-items"),
                                          (["--max-tokens", "-5"], "--max-items")])
def test_4_counts_that_train_nothing_are_refused(tmp_path, ptb_slice_dir, args, option):
    _refused(_train(args, ptb_slice_dir, tmp_path / "r"), option, args[1])
    assert not (tmp_path / "r").exists()


def test_4_data_too_small_for_one_batch_is_never_marked_finished(tmp_path, ptb_slice_dir):
    for items in ("10", "30"):      # too few for a batch of 20 columns; for one of 2 rows
        result = _train(["--max-items", items], ptb_slice_dir, tmp_path / "r")
        _refused(result, "batch", code=1)
        assert not (tmp_path / "r" / "metrics.json").exists()
    again = _train(["--max-items", "400"], ptb_slice_dir, tmp_path / "r")   # the directory is not blocked
    assert again.exit_code == 0, again.output
    trainer = Trainer(torch.nn.Linear(3, 1), type("Empty", (_Task,), {"num_train_batches": lambda self: 0})(),
                      TrainConfig(epochs=1))
    with pytest.raises(NoTrainingData):
        trainer.fit()


# --- 5. a checkpoint of another run is not adopted ----------------------------------------------------------------
def test_5_a_checkpoint_of_another_run_is_refused_on_resume(tmp_path, ptb_slice_dir):
    ours = _unfinished(ptb_slice_dir, tmp_path / "ours")
    theirs = _unfinished(ptb_slice_dir, tmp_path / "theirs", hidden_sizes=[8, 8])
    original = (ours / "checkpoint.pt").read_bytes()
    (ours / "checkpoint.pt").write_bytes((theirs / "checkpoint.pt").read_bytes())
    run = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False)
    with pytest.raises(CheckpointError, match=r"belongs to another run \(hidden_sizes \[8, 8\] there, None here"):
        train_run(run, ours, resume=True, progress=False)
    payload = load_checkpoint(theirs / "checkpoint.pt")        # without the record of its run: the sizes tell
    del payload["run_info"], payload["format_version"]
    save_checkpoint(ours / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError, match=r"hidden sizes \[8, 8\] there, \[32, 32\] here"):
        train_run(run, ours, resume=True, progress=False)
    assert not (ours / "metrics.json").exists()
    (ours / "checkpoint.pt").write_bytes(original)
    assert train_run(run, ours, resume=True, progress=False)["hidden_sizes"] == [32, 32]


# --- 6. huge finite values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, args, words", [
    ("compress", ["--set", "threshold=1e308"], ["--set:", "threshold must lie in [0, 1]", "1e+308"]),
    ("compress-hmd", ["--set", "full_row_share=1e308"], ["--set:", "full_row_share must lie in [0, 1]"]),
    ("compress", ["--strength", "-1"], ["--strength:", "strength must be a finite number >= 0"]),
    ("train", ["--hidden-sizes", "99999999,8"], ["--hidden-sizes", "99999999"]),
    ("train", ["--hidden-sizes", "30000,30000"], ["--hidden-sizes", "memory"]),
])
def test_6_huge_finite_values_are_refused(tmp_path, ptb_slice_dir, command, args, words):
    if command == "train":
        result = _train(args, ptb_slice_dir, tmp_path / "r")
    else:
        result = _compress(args, ptb_slice_dir, tmp_path / "r", "hmd" if command.endswith("hmd") else "iss")
    _refused(result, *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("make", [lambda: ISS(threshold=1e308), lambda: ISS(strength=-1.0),
                                  lambda: Structured("hybrid", full_row_share=1e308), lambda: Prune(compression=0.5),
                                  lambda: Prune(anneal_start=0.9, anneal_end=0.1), lambda: Doped(cmr=1.0),
                                  lambda: Doped(cmr_mode="column"), lambda: GrowPrune(growth_lr=1e30),
                                  lambda: AntMan(reduction=math.inf), lambda: AntMan(groups=-1)])
def test_6_method_configs_check_their_ranges_in_the_python_api(make):
    with pytest.raises(ConfigError, match="must (be|lie)"):
        make()


# --- 7. run files ------------------------------------------------------------------------------------------------
def _copy_run(source: Path, out: Path) -> Path:
    out.mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            (out / path.name).write_bytes(path.read_bytes())
    return out


def test_7_a_malformed_config_json_is_named(tmp_path, finished):
    broken = _copy_run(finished, tmp_path / "broken")
    (broken / "config.json").write_text('{"task": "ptb",\n')
    for command in (["show", str(broken)], ["eval", str(broken)]):
        _refused(CliRunner().invoke(main, command), "config.json", "not valid JSON", "line 2", "restore",
                 code=1)
    values = json.loads((finished / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(values | {"colour": "blue"}))
    _refused(CliRunner().invoke(main, ["show", str(broken)]), "config.json", "colour", code=1)
    (broken / "config.json").write_text(json.dumps(values | {"preset": "huge"}))
    _refused(CliRunner().invoke(main, ["show", str(broken)]), "config.json", "huge", code=1)


def test_7_compress_from_a_run_with_a_malformed_metrics_json_fails_before_training(tmp_path, ptb_slice_dir,
                                                                                 finished):
    broken = _copy_run(finished, tmp_path / "broken")
    (broken / "metrics.json").write_text('{"task": "ptb",\n\n')
    result = CliRunner().invoke(main, ["compress", "--method", "iss", "--from", str(broken), "--epochs", "1",
                                       "--max-batches", "1", "--max-items", "400", "--latency-repeats", "0",
                                       "--no-progress", "--out", str(tmp_path / "c")])
    _refused(result, "metrics.json", "not valid JSON", code=1)
    assert not (tmp_path / "c" / "checkpoint.pt").exists()
    _refused(CliRunner().invoke(main, ["show", str(broken)]), "metrics.json", code=1)
    with pytest.raises(FileProblem, match="x.json"):
        read_json(tmp_path / "x.json", "write it")


def test_7_a_run_directory_without_config_json_gives_advice_that_leads_somewhere(tmp_path, ptb_slice_dir):
    run = _unfinished(ptb_slice_dir, tmp_path / "r")
    (run / "config.json").unlink()
    resumed = _train(["--resume"], ptb_slice_dir, run)
    _refused(resumed, "no config.json", "restore config.json", code=1)
    assert "drop --resume" not in resumed.output
    fresh = _train([], ptb_slice_dir, run)
    _refused(fresh, "config.json missing", "choose another --out", code=1)
    assert (run / "checkpoint.pt").exists()                 # nothing of the user's is touched


# --- 8. unwritable output paths ----------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_8_unwritable_outputs_are_clean_errors(tmp_path, ptb_slice_dir, finished):
    export = CliRunner().invoke(main, ["export", str(finished), "--out", "/proc/leanlstm-x/m.onnx"])
    _refused(export, "--out /proc/leanlstm-x/m.onnx cannot be written", code=1)
    _refused(_train([], ptb_slice_dir, "/proc/leanlstm-run"), "--out /proc/leanlstm-run cannot be written", code=1)
    profiled = CliRunner().invoke(main, ["profile", "--sizes", "8", "--out", "/proc/leanlstm-x"])
    _refused(profiled, "--out /proc/leanlstm-x cannot be written", code=1)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileProblem, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run", "--out")
    assert (tmp_path / "file").read_text() == "mine"


# --- 9. the LSTM's inputs (done in leanlstm.nn; checked here) ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_9_other_input_dtypes_are_refused_as_torch_refuses_them(dtype):
    x = torch.randn(5, 3, 8, dtype=dtype)
    with pytest.raises(ValueError) as ours:
        leanlstm.LSTM(8, 16, 2)(x)
    with pytest.raises(ValueError) as theirs:
        torch.nn.LSTM(8, 16, 2)(x)
    assert str(dtype) in str(ours.value) and str(ours.value) == str(theirs.value)


def test_9_a_state_of_nones_is_a_clear_type_error():
    with pytest.raises(TypeError, match="h0 must be a tensor"):
        leanlstm.LSTM(8, 16, 2)(torch.randn(5, 3, 8), (None, None))


def test_9_replace_forms_that_fails_half_way_changes_nothing():
    lstm = leanlstm.LSTM(8, 16, 2)
    before = {name: form for name, form in lstm.forms()}
    weights = {name: p.clone() for name, p in lstm.state_dict().items()}
    built = []

    def build(dense):
        if len(built) == 2:
            raise ValueError("the third matrix cannot be converted")
        built.append(dense.shape)
        return leanlstm.LowRank.from_dense(dense, rank=2)

    with pytest.raises(ValueError, match="third matrix"):
        lstm.replace_forms(build)
    assert len(built) == 2
    assert all(form is before[name] for name, form in lstm.forms())
    assert all(torch.equal(p, weights[name]) for name, p in lstm.state_dict().items())


# --- 10. a checkpoint that needs unpickling ----------------------------------------------------------------------
class Pickled:
    """Not a tensor nor plain data: ``torch.load(weights_only=True)`` refuses it."""


def test_10_the_corrupt_checkpoint_message_never_suggests_unsafe_loading_without_its_warning(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format_version": 1, "model": Pickled()}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "weights_only=False" in message and "arbitrary code" in message and "trust" in message
    path.write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(CheckpointError, match="corrupt or not a leanlstm checkpoint") as caught:
        load_checkpoint(path)
    assert "weights_only=False" not in str(caught.value) or "arbitrary code" in str(caught.value)


# --- 11. a resumed run names the options it ignores --------------------------------------------------------------
def test_11_resume_warns_naming_the_options_that_differ(tmp_path, ptb_slice_dir, caplog):
    run = _unfinished(ptb_slice_dir, tmp_path / "r")
    asked = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False, max_tokens=300,
                      overrides={"epochs": 7, "max_batches": 1})
    with caplog.at_level("WARNING", logger="leanlstm"):
        metrics = train_run(asked, run, resume=True, progress=False)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "--epochs 7 (the run has 2)" in warned and "--max-items 300 (the run has 400)" in warned
    assert "--max-batches" not in warned                     # the same as the run's: nothing ignored
    assert metrics["epochs"] == 2
    saved = RunConfig(preset="tiny", overrides={"epochs": 2})
    assert ignored_options(RunConfig(preset="tiny", overrides={"epochs": 2}), saved) == []
    assert ignored_options(RunConfig(preset="tiny", dropout=0.3), saved) == ["--dropout 0.3 (the run has None)"]


# --- issue 28: the CLI's data inheritance and bench's words ------------------------------------------------------
def test_compress_from_a_run_inherits_its_data_options(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("LEANLSTM_DATA", str(tmp_path / "nowhere"))
    result = CliRunner().invoke(main, ["compress", "--method", "iss", "--from", str(finished), "--epochs", "1",
                                       "--max-batches", "1", "--max-items", "400", "--finetune-epochs", "1",
                                       "--latency-repeats", "0", "--no-progress", "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    source, made = (json.loads((d / "config.json").read_text()) for d in (finished, tmp_path / "c"))
    assert (made["data_dir"], made["verify_data"]) == (source["data_dir"], False)


def test_bench_says_faster_or_slower(capsys):
    assert (speed(1.34), speed(1 / 1.25), speed(1.001)) == ("1.34x slower", "1.25x faster", "same speed")
    stats = {"median": 10.0, "iqr": 1.0}
    report = {"settings": {"seq_len": 5, "threads": 1}, "backends": ["leanlstm"],
              "runs": [{"run": "a", "params": 100, "bytes": 400, "latency_us": {"leanlstm": stats},
                        "ratio_to_first": {"leanlstm": 1.0}, "errors": {}},
                       {"run": "b", "params": 50, "bytes": 200, "latency_us": {"leanlstm": stats},
                        "ratio_to_first": {"leanlstm": 1.34}, "errors": {}}]}
    _print_table(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].rstrip().endswith("1.34x slower") and "1.00x (first)" in lines[-2]


def test_task_training_settings_have_ranges_too():
    from leanlstm.tasks.digits import DigitsTrainConfig
    from leanlstm.tasks.ptb import LMTrainConfig

    with pytest.raises(ConfigError, match=r"bptt must be at least 1 .* got 0"):
        LMTrainConfig(bptt=0)
    with pytest.raises(ConfigError, match=r"eval_batch_size must be at least 1 .* got 0"):
        DigitsTrainConfig(eval_batch_size=0)
    with pytest.raises(ConfigError, match=r"beam_width must be at least 0 .* got -1"):
        DigitsTrainConfig(beam_width=-1)
