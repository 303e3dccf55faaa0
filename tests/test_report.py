"""Figures (the ISS component plot, the perplexity-compression trade-off) and the comparison report of recorded
results files (`leanlstm report results/*.json`)."""
import json
from pathlib import Path

import pytest

from leanlstm.files import FileProblem
from leanlstm.report import (baseline_of, build_report, collect, method_label, pareto_front, plot_components,
                             plot_tradeoff, row_numbers, rows_from_results)

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_plot_tradeoff_draws_one_line_per_method(tmp_path):
    report = {"baseline": {"test_ppl": 114.0}, "runs": [
        {"method": "prune", "lstm_compression": 10.0, "test_ppl": 120.0},
        {"method": "prune", "lstm_compression": 20.0, "test_ppl": 131.0},
        {"method": "doped-kp", "method_config": {"cmr": 0.0}, "lstm_compression": 20.0, "test_ppl": 125.0}]}
    out = plot_tradeoff(report, tmp_path / "tradeoff.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_method_label_marks_ablations_and_controls():
    assert method_label({"method": "doped-kp", "method_config": {"cmr": 0.5}}) == "doped-kp"
    assert method_label({"method": "doped-kp", "method_config": {"cmr": 0}}) == "doped-kp (no CMR)"
    shared = {"method": "doped-kp", "method_config": {"cmr": 0, "doping_share": 0.25}}
    assert method_label(shared) == "doped-kp (no CMR)"
    assert (method_label({"method": "doped-kp", "method_config": {"cmr": 0, "doping_share": 0.75}})
            == "doped-kp (no CMR) (doping share 0.75)")
    assert method_label({"method": "baseline", "role": "control"}) == "direct design (control)"
    assert method_label({"method": "iss", "source": None}) == "iss (from scratch)"
    assert method_label({"method": "iss", "source": "runs/ptb-small"}) == "iss"
    distilled = {"method": "iss", "source": None, "distilled_from": "runs/base"}
    assert method_label(distilled) == "iss (from scratch) (distilled)"


def test_plot_components_needs_iss_metrics(tmp_path):
    with pytest.raises(ValueError, match="--method iss"):
        plot_components({"history": []}, tmp_path / "c.png")


# --- the comparison report (`leanlstm report`) from recorded results files ---------------------------------------

def test_rows_of_a_comparison_file_carry_their_baseline_and_latencies():
    recorded = json.loads((RESULTS / "ptb-small-doping.json").read_text())
    rows, reason = rows_from_results(RESULTS / "ptb-small-doping.json")
    assert reason is None
    assert [row.name for row in rows] == [recorded["baseline"]["run"]] + [r["run"] for r in recorded["runs"]]
    assert rows[0].is_baseline and rows[0].method == "baseline" and rows[0].task == "ptb"
    prune = next(row for row in rows if row.name == "runs/ptb-small-prune-20x")
    entry = next(r for r in recorded["runs"] if r["run"] == "runs/ptb-small-prune-20x")
    numbers = row_numbers(prune, baseline_of(prune, rows))
    assert numbers["metric"] == entry["test_ppl"] and numbers["baseline_metric"] == entry["baseline_test_ppl"]
    assert numbers["change"] == pytest.approx(entry["test_ppl_change"])
    assert numbers["lstm_bytes"] == 4 * entry["lstm_params"]
    assert numbers["latency_us"] == entry["latency_us_per_step"]["lstm"]
    dense = entry["baseline_latency_us_per_step"]["lstm"]
    assert numbers["speedup_vs_dense"] == pytest.approx(min(dense.values()) / entry["latency_us_per_step"]["lstm"]
                                                        ["leanlstm"])
    # the only peer recorded is onnxruntime: the same model there, over leanlstm
    lstm = entry["latency_us_per_step"]["lstm"]
    assert numbers["speedup_vs_peer"] == pytest.approx(lstm["onnxruntime"] / lstm["leanlstm"])


def test_rows_of_a_table_file_and_of_one_runs_metrics():
    rows, _ = rows_from_results(RESULTS / "digits-medium-compressed.json")
    recorded = json.loads((RESULTS / "digits-medium-compressed.json").read_text())["rows"]
    assert [(r.name, r.task, r.metric) for r in rows] == [(e["run"], "digits", e["test_wer"]) for e in recorded]
    assert rows[0].latency == {"model": recorded[0]["us_per_step"]}        # the whole recogniser, as recorded
    doped = rows[1]
    numbers = row_numbers(doped, baseline_of(doped, rows))
    assert numbers["baseline"] == recorded[0]["run"] and numbers["latency_part"] == "model"
    assert numbers["speedup_vs_dense"] == pytest.approx(min(recorded[0]["us_per_step"].values())
                                                        / recorded[1]["us_per_step"]["leanlstm"])
    single, _ = rows_from_results(RESULTS / "ptb-small-baseline.json")
    metrics = json.loads((RESULTS / "ptb-small-baseline.json").read_text())
    assert [(r.name, r.metric, r.total_params) for r in single] == [
        ("/work/runs/ptb-small", metrics["test_ppl"], metrics["total_params"])]       # the name: its --out
    assert len(single[0].history) == metrics["epochs"]


def test_files_without_runs_are_skipped_with_the_reason():
    rows, reason = rows_from_results(RESULTS / "artifact-sizes.json")
    assert rows == [] and "test_ppl" in reason and "test_wer" in reason
    rows, skipped = collect([RESULTS / "artifact-sizes.json", RESULTS / "ptb-small-iss.json"])
    assert [s["input"] for s in skipped] == [str(RESULTS / "artifact-sizes.json")]
    assert len(rows) == 7


def test_the_same_run_read_twice_is_one_row():
    # runs/ptb-small-baseline-epyc.json is the metrics.json of the baseline both comparisons were made against
    rows, _ = collect([RESULTS / "ptb-small-baseline-epyc.json", RESULTS / "ptb-small-doping.json",
                       RESULTS / "ptb-small-doping-cmr.json"])
    assert len(rows) == 1 + 15            # the baseline (three times) and the 13 + 4 runs, 2 of them in both
    base = rows[0]
    assert base.name == "runs/ptb-small" and base.total_params is not None and base.latency   # both halves
    assert base.origins == [str(RESULTS / f) for f in ("ptb-small-baseline-epyc.json", "ptb-small-doping.json",
                                                       "ptb-small-doping-cmr.json")]
    assert all(baseline_of(row, rows) is base for row in rows)
    # another result of the same run directory (an older baseline) is a row of its own, labelled with its file
    rows, _ = collect([RESULTS / "ptb-small-baseline.json", RESULTS / "ptb-small-doping.json"])
    assert [row.label for row in rows[:2]] == ["/work/runs/ptb-small", "runs/ptb-small (ptb-small-doping.json)"]
    prune = next(row for row in rows if row.name == "runs/ptb-small-prune-20x")
    assert baseline_of(prune, rows) is rows[1]        # the one it was compared with, from its own file


def test_pareto_front_keeps_what_nothing_beats():
    assert pareto_front([(3, 0.9), (1, 0.5), (2, 0.8), (2, 0.4)], higher_is_better=True) == [(1, 0.5), (2, 0.8),
                                                                                               (3, 0.9)]


def test_report_of_the_recorded_results(tmp_path):
    inputs = sorted(RESULTS.glob("*.json"))
    report = build_report(inputs, tmp_path / "report", measure=False)
    tasks = {entry["task"]: entry for entry in report["tasks"]}
    assert set(tasks) == {"ptb", "digits"}
    ptb = {row["run"]: row for row in tasks["ptb"]["rows"]}
    recorded = json.loads((RESULTS / "ptb-small-iss.json").read_text())["runs"]
    for entry in recorded:
        assert ptb[entry["run"]]["metric"] == entry["test_ppl"]
    assert {s["input"] for s in report["skipped"]} >= {str(RESULTS / "artifact-sizes.json")}
    assert len(report["skipped"]) + len({o for e in report["tasks"] for r in e["rows"] for o in r["origins"]}) \
        == len(inputs)
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == sorted(report["files"])
    # the results were timed on two kinds of machine: a latency plot each, never one axis for both
    for task in ("ptb", "digits"):
        assert {f["file"] for f in tasks[task]["figures"]} == {
            f"{task}-pareto-latency-amd-epyc.png", f"{task}-pareto-latency-intel-xeon-processor.png",
            f"{task}-pareto-bytes.png", f"{task}-curves.png"}
    sections = {section["machine"]: section for section in tasks["ptb"]["latency"]}
    assert set(sections) == {"AMD EPYC", "Intel(R) Xeon(R) Processor"}
    for machine, section in sections.items():
        for row in section["rows"]:         # every latency from a file that names this machine
            assert row["machine"] == machine and _cpu(Path(row["session"])) == machine
        medium = [r["run"] for r in section["rows"] if r["is_baseline"] and r["preset"] == "medium-cpu"]
        expected = "runs/ptb-medium-cpu" if machine == "AMD EPYC" else "runs/ptb-medium-cpu-bf16"
        # one name may stand for runs made elsewhere too (the GPU-trained baseline): the report names the file
        assert [name.split(" (")[0] for name in medium] == [expected], medium
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == 8 and "http" not in html.replace("http-equiv", "")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "![" in markdown and "(ptb-pareto-latency-amd-epyc.png)" in markdown
    assert "### ptb: latency on Intel(R) Xeon(R) Processor" in markdown
    assert "| runs/ptb-small-iss-scratch-0.0025 | iss (from scratch) | small |" in markdown


def _cpu(results_file: Path) -> str:
    """The CPU a results file's latencies were measured on, as it records it."""
    data = json.loads(results_file.read_text())
    return ((data.get("latency_settings") or {}).get("machine") or data["machine"])["cpu"]


# --- latencies of two machines: shown apart, never divided by one another ----------------------------------------

EPYC, XEON = "AMD EPYC", "Intel(R) Xeon(R) Processor"


def _comparison(path: Path, machine: dict | None, baseline_us: float, runs: list[dict]) -> Path:
    """A results file as benchmarks/compression_results.py writes it: the dense baseline and runs, all timed in
    one interleaved run on ``machine``."""
    data = {"command": "python benchmarks/compression_results.py", "task": "ptb",
            "baseline": {"run": "runs/base", "method": "baseline", "preset": "tiny", "test_ppl": 150.0,
                         "lstm_params": 10_000, "latency_us_per_step": {"lstm": {"leanlstm": baseline_us,
                                                                                 "onnxruntime": baseline_us * 1.2}}},
            "runs": runs}
    if machine is not None:
        data["machine"] = machine
    path.write_text(json.dumps(data))
    return path


def _run(name: str, us: float, ppl: float, dense_us: float | None = None) -> dict:
    entry = {"run": name, "method": "prune", "preset": "tiny", "source": "runs/base", "test_ppl": ppl,
             "baseline_test_ppl": 150.0, "lstm_params": 2_000,
             "latency_us_per_step": {"lstm": {"leanlstm": us, "onnxruntime": us * 3}}}
    if dense_us is not None:
        entry["baseline_latency_us_per_step"] = {"lstm": {"leanlstm": dense_us, "onnxruntime": dense_us * 1.2}}
    return entry


def test_a_report_over_two_machines_never_divides_across_them(tmp_path):
    # the same dense baseline, timed on an EPYC (40 us) and on a Xeon (80 us), with a compressed run each; the
    # EPYC file's run recorded no baseline latency of its own: its speed-up comes from the baseline's row
    epyc = _comparison(tmp_path / "epyc.json", {"cpu": EPYC, "cpus": 2}, 40.0, [_run("runs/fast", 10.0, 160.0)])
    xeon = _comparison(tmp_path / "xeon.json", {"cpu": XEON, "cpus": 2}, 80.0,
                       [_run("runs/slow", 20.0, 158.0, dense_us=81.0)])
    # a Xeon table of a run compressed from the same baseline, without the baseline's latency: only the EPYC's
    # and the Xeon file's (another measurement) exist, so no speed-up over the dense model
    alone = tmp_path / "xeon-alone.json"
    alone.write_text(json.dumps({"machine": {"cpu": XEON}, "rows": [
        {**_run("runs/lonely", 30.0, 155.0), "task": "ptb"}]}))
    report = build_report([epyc, xeon, alone], tmp_path / "report", measure=False)
    (ptb,) = report["tasks"]
    base = next(row for row in ptb["rows"] if row["is_baseline"])
    assert base["run"] == "runs/base" and base["machines"] == [EPYC, XEON]      # one row, timed on both machines
    sections = {section["machine"]: {row["run"]: row for row in section["rows"]} for section in ptb["latency"]}
    assert list(sections) == [EPYC, XEON]
    assert set(sections[EPYC]) == {"runs/base", "runs/fast"}
    assert set(sections[XEON]) == {"runs/base", "runs/slow", "runs/lonely"}
    assert sections[EPYC]["runs/base"]["latency_us"]["leanlstm"] == 40.0      # each machine its own latency
    assert sections[XEON]["runs/base"]["latency_us"]["leanlstm"] == 80.0
    fast, slow, lonely = sections[EPYC]["runs/fast"], sections[XEON]["runs/slow"], sections[XEON]["runs/lonely"]
    assert fast["speedup_vs_dense"] == pytest.approx(40.0 / 10.0)             # the EPYC baseline, not the Xeon's
    assert slow["speedup_vs_dense"] == pytest.approx(81.0 / 20.0)             # its own recorded baseline
    assert lonely["speedup_vs_dense"] is None and lonely["dense_latency_us"] == {}
    for machine, rows in sections.items():
        for row in rows.values():
            peer = 1.2 if row["run"] == "runs/base" else 3.0      # the same model on onnxruntime, same file
            assert row["machine"] == machine and row["speedup_vs_peer"] == pytest.approx(peer)
    names = {figure["file"] for figure in ptb["figures"]}
    assert {"ptb-pareto-latency-amd-epyc.png", "ptb-pareto-latency-intel-xeon-processor.png"} <= names
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "### ptb: latency on AMD EPYC" in markdown and "### ptb: latency on Intel(R) Xeon(R) Processor" in markdown
    assert "| runs/base | baseline | tiny | 150 | AMD EPYC | 40.0 | 48.0 | 1.00× | 1.20× |" in markdown
    assert ("| runs/base | baseline | tiny | 150 | Intel(R) Xeon(R) Processor | 80.0 | 96.0 | 1.00× | 1.20× |"
            in markdown)
    assert "| runs/lonely | prune | tiny | 155 | Intel(R) Xeon(R) Processor | 30.0 | 90.0 | – | 3.00× |" in markdown
    assert "| runs/base | baseline | tiny | 10,000 | – | – | 150 | baseline | AMD EPYC, Intel(R) Xeon(R) Processor |" \
        in markdown
    html = (tmp_path / "report" / "index.html").read_text()
    assert 'data-machine="AMD EPYC"' in html and 'data-machine="Intel(R) Xeon(R) Processor"' in html


def test_latencies_without_a_machine_are_not_compared_across_rows(tmp_path):
    # two files recording no machine: each row's latency is labelled so, and divided only within its own file
    first = _comparison(tmp_path / "first.json", None, 40.0, [_run("runs/a", 10.0, 160.0)])
    second = tmp_path / "second.json"
    second.write_text(json.dumps({"rows": [{**_run("runs/b", 20.0, 158.0), "task": "ptb"}]}))
    # one run's metrics.json, with its own baseline timed in the same session (compress records both)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"task": "ptb", "method": "prune", "preset": "tiny", "test_ppl": 157.0,
                                   "command": "leanlstm compress --out runs/c", "latency_us_per_step": {
                                       "compressed": {"lstm": {"leanlstm": 5.0}},
                                       "baseline": {"lstm": {"leanlstm": 45.0}}}}))
    report = build_report([first, second, metrics], tmp_path / "report", measure=False)
    (ptb,) = report["tasks"]
    (section,) = ptb["latency"]
    assert section["machine"] == "unrecorded machine"
    rows = {row["run"]: row for row in section["rows"]}
    assert rows["runs/a"]["speedup_vs_dense"] == pytest.approx(4.0)       # same file as the baseline
    assert rows["runs/b"]["speedup_vs_dense"] is None                     # another file: perhaps another machine
    assert rows["runs/c"]["speedup_vs_dense"] == pytest.approx(9.0)       # its own recorded baseline
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "### ptb: latency on an unrecorded machine" in markdown and "different machines" in markdown
    assert "ptb-pareto-latency-unrecorded-machine.png" in report["files"]


def test_rows_carry_the_machine_their_latencies_were_measured_on():
    rows, _ = rows_from_results(RESULTS / "ptb-medium-cpu-bf16-iss-distill.json")
    assert {row.machines[0] for row in rows} == {XEON}
    rows, _ = rows_from_results(RESULTS / "ptb-small-iss-shrink-0.0045.json")     # a metrics.json: its own timing
    (row,) = rows
    numbers = row_numbers(row, None)
    assert numbers["machine"] == EPYC and numbers["latency_us"]["leanlstm"] > 0
    assert numbers["speedup_vs_dense"] == pytest.approx(row.timings[0].baseline_latency["lstm"]["leanlstm"]
                                                        / numbers["latency_us"]["leanlstm"])
    rows, _ = rows_from_results(RESULTS / "ptb-medium-cpu-baseline-bf16.json")     # not timed: no machine shown
    assert rows[0].machines == [] and row_numbers(rows[0], rows[0])["machine"] is None


def test_report_never_replaces_files_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("mine")
    with pytest.raises(FileProblem, match="index.html, not written by leanlstm report"):
        build_report([RESULTS / "ptb-small-iss.json"], out, measure=False)
    assert (out / "index.html").read_text() == "mine" and not (out / "report.json").exists()
    (out / "index.html").unlink()
    first = build_report([RESULTS / "ptb-small-iss.json", RESULTS / "digits-medium-compressed.json"], out,
                         measure=False)
    assert "digits-curves.png" not in first["files"] and (out / "digits-pareto-latency-amd-epyc.png").exists()
    again = build_report([RESULTS / "ptb-small-iss.json"], out, measure=False)   # its own files: replaced
    assert not (out / "digits-pareto-latency-amd-epyc.png").exists()             # and the stale ones removed
    assert sorted(p.name for p in out.iterdir()) == sorted(again["files"])


def test_report_refuses_inputs_without_runs_and_unwritable_folders(tmp_path):
    with pytest.raises(ValueError, match="no runs to report.*artifact-sizes.json: no runs in it"):
        build_report([RESULTS / "artifact-sizes.json"], tmp_path / "out", measure=False)
    with pytest.raises(FileProblem, match="cannot be written"):
        build_report([RESULTS / "ptb-small-iss.json"], "/proc/leanlstm-report", measure=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FileProblem, match="bad.json is not valid JSON"):
        build_report([bad], tmp_path / "out", measure=False)


def test_docstring_examples():
    import doctest

    import leanlstm.report

    result = doctest.testmod(leanlstm.report, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
