"""Scripts behind BENCHMARKS.md: the sweep runner (parsing, resuming and waiting for the runs a command starts from)
and the one-shot conversion of a trained model."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanlstm.methods.pruning import final_entries, sparse_part
from leanlstm.graph import lstm_forms
from leanlstm.tasks.lm import LMConfig, WordLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep  # noqa: E402
from record_run import dropout_of, git_commit  # noqa: E402
from one_shot import convert  # noqa: E402


def test_sweep_parses_resumes_and_waits_for_unfinished_sources(tmp_path):
    runs = tmp_path / "runs"
    (tmp_path / "s.txt").write_text(
        "# a comment\n"
        "leanlstm train --preset small --out {runs}/base   # trailing comment\n"
        "leanlstm compress --method prune --from {runs}/base --out {runs}/pruned/\n"
        "leanlstm train --hidden-sizes-from {runs}/pruned --out {runs}/direct\n"
        "leanlstm train --preset small --distill-from {runs}/base --out {runs}/student\n")
    base, pruned, direct, student = sweep.commands(tmp_path / "s.txt", str(runs))
    assert base == ["leanlstm", "train", "--preset", "small", "--out", f"{runs}/base"]
    assert sweep.log_path(pruned) == runs / "pruned.log"               # beside the run, even with a slash
    assert sweep.prepared(base) == base                                # nothing there yet: start it
    (runs / "base").mkdir(parents=True)
    (runs / "base" / "checkpoint.pt").write_bytes(b"")
    assert sweep.prepared(base) == base + ["--resume"]
    assert not sweep.source_ready(pruned) and not sweep.source_ready(direct) and sweep.source_ready(base)
    assert not sweep.source_ready(student)                             # a half-trained teacher: wait
    (runs / "base" / "metrics.json").write_text("{}")
    assert sweep.prepared(base) is None                                # finished: skipped
    assert sweep.source_ready(pruned) and not sweep.source_ready(direct) and sweep.source_ready(student)
    (tmp_path / "bad.txt").write_text("python train.py --out x\n")
    with pytest.raises(SystemExit, match="bad.txt:1: expected a `leanlstm ... --out DIR` command"):
        sweep.commands(tmp_path / "bad.txt", str(runs))


def test_sweep_reads_its_files_again_skipping_what_it_started_and_what_finished(tmp_path):
    """``pending`` is what a running sweep has left after an edit of its file: the lines as they now stand, in their
    new order, less the commands it started (``done``) and the runs finished; a line given twice runs once."""
    runs, sweep_file = tmp_path / "runs", tmp_path / "s.txt"
    line = "leanlstm train --preset tiny --out {runs}/%s\n"
    sweep_file.write_text(line % "a" + line % "b" + line % "c")
    a, b, c = sweep.pending([sweep_file], str(runs), set())
    done = {tuple(a)}                                                 # a started
    (runs / "b").mkdir(parents=True)
    (runs / "b" / "metrics.json").write_text("{}")                   # b finished elsewhere
    sweep_file.write_text(line % "d" + line % "c" + line % "a" + line % "b" + line % "d")
    assert [sweep.out_of(x).name for x in sweep.pending([sweep_file], str(runs), done)] == ["d", "c"]
    d = sweep.commands(sweep_file, str(runs))[0]
    assert [sweep.out_of(x).name for x in sweep.pending([sweep_file], str(runs), done | {tuple(d)})] == ["c"]


def test_sweep_takes_several_files_as_one_list(tmp_path):
    """Finished runs of both files are skipped, and a run of the second whose source nothing in either makes is
    reported, not started."""
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text("{}")
    (tmp_path / "one.txt").write_text("leanlstm train --preset tiny --out {runs}/a\n")
    (tmp_path / "two.txt").write_text("leanlstm compress --method prune --from {runs}/a --out {runs}/b\n"
                                      "leanlstm compress --method prune --from {runs}/c --out {runs}/d\n")
    script = Path(sweep.__file__)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "one.txt"), str(tmp_path / "two.txt"),
                           "--runs", str(runs)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "start:" not in done.stdout
    assert f"NOT STARTED, the run it starts from is unfinished: leanlstm compress --method prune --from {runs}/c" \
        in done.stdout and done.stdout.count("NOT STARTED") == 1


def test_repeats_summarises_each_recipes_runs_and_median(tmp_path):
    def run(name, seed, test, val):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"overrides": {} if seed is None else {"seed": seed}}))
        (folder / "metrics.json").write_text(json.dumps({"metric": "wer", "test_wer": test, "val_wer": val,
                                                         "method": "gp", "test_word_errors": round(test * 1000)}))
        return str(folder)

    runs = [run("a", None, 0.004, 0.01), run("b", 1, 0.006, 0.02), run("c", 2, 0.005, 0.03)]
    script = Path(sweep.__file__).with_name("repeats.py")
    done = subprocess.run([sys.executable, str(script), "--recipe", "gp=" + ",".join(runs), "--recipe",
                           f"one={runs[0]}", "--out", str(tmp_path / "out.json")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    recipes = json.loads((tmp_path / "out.json").read_text())["recipes"]
    assert recipes["gp"]["median_test_wer"] == 0.005 and recipes["gp"]["median_val_wer"] == 0.02
    assert [r["seed"] for r in recipes["gp"]["runs"]] == ["the preset's", 1, 2]
    assert recipes["one"]["runs"][0]["test_word_errors"] == 4
    (tmp_path / "d").mkdir()
    unfinished = subprocess.run([sys.executable, str(script), "--recipe", f"x={tmp_path / 'd'}", "--out",
                                 str(tmp_path / "no.json")], capture_output=True, text=True, timeout=120)
    assert unfinished.returncode != 0 and "has not finished" in unfinished.stderr
    assert not (tmp_path / "no.json").exists()


def test_int8_latency_runs_compares_each_run_with_its_own_fastest_peer(tmp_path):
    def result(name, ort, torch_int8, ours):
        dense = {"onnxruntime-int8": ort, "torch-int8": torch_int8, "leanlstm-int8": ours}
        medians = {"dense/lstm": dense, "dense/model": dense, "blocks/lstm": {"leanlstm-int8": ours / 4}}
        (tmp_path / name).write_text(json.dumps({"medians": medians}))
        return str(tmp_path / name)

    script = Path(sweep.__file__).with_name("int8_latency_runs.py")
    files = [result("quiet.json", 100.0, 140.0, 50.0), result("busy.json", 240.0, 200.0, 80.0)]
    done = subprocess.run([sys.executable, str(script), *files, "--show", "dense/lstm,blocks/lstm"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    quiet, busy = done.stdout.splitlines()[2:]
    assert "| 50.0 (2.00x) | 12.5 (8.00x) |" in quiet          # ORT int8 is that run's best peer
    assert "| 80.0 (2.50x) | 20.0 (10.00x) |" in busy          # torch-int8 is this one's
    missing = subprocess.run([sys.executable, str(script), files[0], "--show", "other/lstm"], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode != 0 and "no leanlstm-int8 timing of other/lstm" in missing.stderr


def test_int8_dense_parts_splits_the_step_into_products_and_the_rest(tmp_path):
    script = Path(sweep.__file__).with_name("int8_dense_parts.py")
    out = tmp_path / "parts.json"
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--repeats", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    us, derived = result["median_us"], result["derived"]
    assert set(us) == {"recurrent", "recurrent_in_l2", "input", "leanlstm-int8", "onnxruntime-int8"}
    assert min(us.values()) > 0
    assert derived["rest_us"] == pytest.approx(us["leanlstm-int8"] - us["recurrent"] - us["input"])
    assert derived["recurrent_gb_per_s"] == pytest.approx(2 * 2600 * 650 / us["recurrent"] / 1e3)
    refused = subprocess.run([sys.executable, str(script), "--out", str(out), "--rounds", "0"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--repeats and --rounds must be at least 1" in refused.stderr


def test_sweep_waits_for_a_source_training_in_another_process(tmp_path):
    from leanlstm.runs import _lock

    (tmp_path / "base").mkdir()
    command = ["leanlstm", "compress", "--method", "prune", "--from", str(tmp_path / "base"), "--out", "x"]
    assert not sweep.trained_elsewhere(command)
    held = _lock(tmp_path / "base")                     # what a training holds while it runs
    try:
        assert sweep.trained_elsewhere(command) and not sweep.source_ready(command)
    finally:
        held.close()
    assert not sweep.trained_elsewhere(command)


def test_sweep_waits_for_its_own_run_training_in_another_process(tmp_path):
    """A command whose --out another process is training (an earlier sweep's) is not started beside it; once that
    process stops it is resumed, or skipped when it was finished."""
    from leanlstm.runs import _lock

    out = tmp_path / "run"
    out.mkdir()
    command = ["leanlstm", "train", "--task", "ptb", "--out", str(out)]
    assert not sweep.training_now(command)
    held = _lock(out)
    try:
        assert sweep.training_now(command)
        (out / "checkpoint.pt").write_bytes(b"")          # the other process saves its first checkpoint
    finally:
        held.close()
    assert not sweep.training_now(command)
    assert sweep.prepared(command) == command + ["--resume"]      # prepared when started, not when listed
    (out / "metrics.json").write_text("{}")
    assert sweep.prepared(command) is None


def test_sweep_runs_leanlstm_with_its_own_interpreter_without_it_on_path():
    command = sweep.executable(["leanlstm", "train", "--help"])
    assert command[0] == sys.executable
    bare_path = os.environ | {"PATH": "/usr/bin:/bin"}                 # no venv bin/ on it
    result = subprocess.run(command, env=bare_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout


def test_one_shot_converts_to_the_final_state_of_each_method():
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=50, embed_size=24, hidden_sizes=[24, 24]))
    weights = {name: form.materialize().detach().clone() for name, form in lstm_forms(model)}
    for method in ("prune", "doped-kp", "doped-lmf"):
        converted, record = convert(model, method, 4.0)
        assert record["lstm_weight_compression"] == pytest.approx(4.0, rel=0.01)
        for name, form in lstm_forms(converted):
            # the sparse part sits at its final budget at once, not at the schedule's start (dense)
            assert sparse_part(form).nnz() == final_entries(name, form, 4.0)
            entry = record["matrices"][name]
            if "structure_alone_error" in entry:     # D only ever removes error
                assert entry["error"] < entry["structure_alone_error"]
    _, record = convert(model, "lmf", 4.0)
    name, weight = next(iter(weights.items()))
    rank = 24 * 96 // (4 * (96 + 24))             # plain LMF: all of the budget for the factors
    singular = torch.linalg.svdvals(weight.double())
    expected = float(singular[rank:].norm() / singular.norm())   # Eckart-Young: the truncated SVD's error
    assert record["matrices"][name]["error"] == pytest.approx(expected, rel=1e-4)
    for name, form in lstm_forms(model):     # the source model is left as it was
        assert torch.equal(form.materialize(), weights[name])


def test_one_shot_takes_config_settings_after_the_method_name():
    torch.manual_seed(0)
    model = WordLM(LMConfig(vocab_size=50, embed_size=24, hidden_sizes=[24, 24]))
    name = next(name for name, _ in lstm_forms(model))
    entries = {share: sparse_part(dict(lstm_forms(convert(model, f"doped-kp:doping_share={share}", 4.0)[0]))
                                  [name]).nnz() for share in (0.25, 0.75)}
    assert entries[0.75] > entries[0.25]           # a larger share of the budget left to D: more entries
    with pytest.raises(ValueError, match="doping_share"):
        convert(model, "doped-kp:doping_share=1.5", 4.0)
    with pytest.raises(ValueError, match="key=value"):
        convert(model, "doped-kp:doping_share", 4.0)


def test_a_recorded_run_names_its_dropout_and_a_structured_training_run_is_no_baseline(tmp_path):
    config = {"task": "ptb", "preset": "medium-cpu", "dropout": None, "dropout_mode": "structured-window"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert dropout_of(tmp_path, {"method": "baseline"}) == {
        "dropout_mode": "structured-window", "dropout": 0.5, "method": "structured-window dropout (training)"}
    assert "method" not in dropout_of(tmp_path, {"method": "prune"})        # a compression keeps its name
    (tmp_path / "config.json").write_text(json.dumps(config | {"dropout": 0.4, "dropout_mode": "standard"}))
    assert dropout_of(tmp_path, {"method": "baseline"}) == {"dropout_mode": "standard", "dropout": 0.4}


def test_the_commit_recorded_is_the_scripts_checkout_from_any_directory(tmp_path, monkeypatch):
    expected = git_commit()
    monkeypatch.chdir(tmp_path)                                    # outside any git checkout
    assert git_commit() == expected
    if shutil.which("git") and (Path(__file__).resolve().parents[1] / ".git").exists():
        assert expected != "unknown"
