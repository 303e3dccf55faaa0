"""`leanlstm report` on tiny runs made here: the numbers in its tables, and its page in a real browser."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from leanlstm.cli import main
from leanlstm.report import _slug
from leanlstm.runtime.latency import machine_info

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
TINY = ["--data-dir", None, "--no-verify-data", "--max-items", "2000", "--max-batches", "4", "--no-progress"]
BACKENDS = ["--backend", "leanlstm", "--backend", "torch", "--backend", "onnxruntime"]


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ptb_slice_dir):
    """A tiny dense baseline and two compressions of it (pruning, low rank): three methods, three sizes."""
    root = tmp_path_factory.mktemp("report-runs")
    common = [str(ptb_slice_dir) if a is None else a for a in TINY]
    base, prune, lmf = root / "base", root / "prune", root / "lmf"
    _invoke("train", "--preset", "tiny", "--epochs", "2", "--out", base, *common)
    _invoke("compress", "--method", "prune", "--from", base, "--set", "compression=4", "--epochs", "1",
            "--finetune-epochs", "1", "--latency-repeats", "2", "--out", prune, *common)
    _invoke("compress", "--method", "lmf", "--from", base, "--set", "compression=3", "--epochs", "1",
            "--finetune-epochs", "0", "--latency-repeats", "0", "--out", lmf, *common)
    return {"baseline": base, "prune": prune, "lmf": lmf}


def _metrics(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def test_report_of_run_directories_measures_and_tabulates_every_run(runs, tmp_path):
    out = tmp_path / "report"
    _invoke("report", *runs.values(), "--out", out, "--repeats", "2", "--seq-len", "8", *BACKENDS)
    report = json.loads((out / "report.json").read_text())
    (ptb,) = report["tasks"]
    assert ptb["task"] == "ptb" and ptb["metric"] == "ppl" and not ptb["higher_is_better"]
    rows = {row["method"]: row for row in ptb["rows"]}
    assert set(rows) == set(runs) and ptb["rows"][0]["method"] == "baseline"      # the baseline first
    here = machine_info()["cpu"]          # all timed now, here, in one interleaved run: one section, this CPU's
    (section,) = ptb["latency"]
    assert section["machine"] == here and report["latency"]["settings"]["machine"]["cpu"] == here
    timed = {row["method"]: row for row in section["rows"]}
    base = timed["baseline"]
    for method, run_dir in runs.items():
        row, metrics = rows[method], _metrics(run_dir)
        assert row["run"] == str(run_dir) and row["metric"] == metrics["test_ppl"] and row["machines"] == [here]
        assert (row["lstm_params"], row["total_params"]) == (metrics["lstm_params"], metrics["total_params"])
        assert row["bytes"] == 4 * metrics["total_params"]
        assert row["change"] == pytest.approx(metrics["test_ppl"] - _metrics(runs["baseline"])["test_ppl"])
        assert row["command"] == metrics["command"]
        row = timed[method]
        assert set(row["latency_us"]) == {"leanlstm", "torch", "onnxruntime"} and row["latency_part"] == "lstm"
        assert row["machine"] == here and row["session"] == "measured: ptb"
        ours = row["latency_us"]["leanlstm"]      # measured in the same run as the baseline: ratios of the two
        assert row["speedup_vs_dense"] == pytest.approx(min(base["latency_us"].values()) / ours)
        assert row["speedup_vs_peer"] == pytest.approx(min(row["latency_us"]["torch"],
                                                           row["latency_us"]["onnxruntime"]) / ours)
    assert rows["lmf"]["lstm_params"] < rows["baseline"]["lstm_params"]
    assert rows["prune"]["lstm_params"] < rows["baseline"]["lstm_params"]
    assert report["latency"]["settings"]["repeats"] == 2
    assert [f["file"] for f in ptb["figures"]] == [f"ptb-pareto-latency-{_slug(here)}.png", "ptb-pareto-bytes.png",
                                                   "ptb-curves.png"]
    markdown = (out / "report.md").read_text()
    assert f"### ptb: latency on {here}" in markdown
    for method, run_dir in runs.items():
        assert f"| {run_dir} | {method} | tiny |" in markdown and f"`{_metrics(run_dir)['command']}`" in markdown
    _check_in_browser(out / "index.html", runs, tmp_path)


def _check_in_browser(page: Path, runs: dict, tmp_path: Path) -> None:
    """Render the page in headless Chromium: every plot decodes (naturalWidth > 0) and the table shows the runs.

    A copy of the page gets a script that writes what the browser rendered into the DOM, which --dump-dom prints;
    the copy's policy lets that one inline script run (the report's own page runs none)."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    if browser is None:
        pytest.fail("no Chromium to render the report with: install it (apt-get install -y chromium; .ci/run does)")
    probe = """<script>window.addEventListener("load", () => {
      const images = [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}));
      const rows = [...document.querySelectorAll("table.runs tbody tr")].map(
        tr => [...tr.cells].map(td => td.textContent));
      const out = document.createElement("pre"); out.id = "probe";
      out.textContent = JSON.stringify({images, rows}); document.body.appendChild(out);
    });</script>"""
    text = page.read_text()
    assert "script-src" not in text
    copy = tmp_path / "probe.html"
    copy.write_text(text.replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
                    .replace("</body>", probe + "</body>"))
    dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          copy.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not render: {dom.stderr[-2000:]}"
    rendered = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert len(rendered["images"]) == text.count('src="data:image/png;base64,') == 3
    assert all(image["complete"] and image["width"] > 0 for image in rendered["images"]), rendered["images"]
    shown = {row[1]: row for row in rendered["rows"]}
    assert set(shown) == set(runs)
    for method, run_dir in runs.items():
        assert shown[method][0] == str(run_dir) and shown[method][6] == f"{_metrics(run_dir)['test_ppl']:.4g}"


def test_report_without_latency_shows_what_the_runs_recorded_and_adds_their_baseline(runs, tmp_path):
    out = tmp_path / "report"
    _invoke("report", runs["prune"], "--no-latency", "--out", out)      # its --from run comes along
    (ptb,) = json.loads((out / "report.json").read_text())["tasks"]
    rows = {row["method"]: row for row in ptb["rows"]}
    assert set(rows) == {"baseline", "prune"} and rows["baseline"]["run"] == str(runs["baseline"])
    metrics = _metrics(runs["prune"])
    recorded, machine = metrics["latency_us_per_step"], metrics["latency_settings"]["machine"]["cpu"]
    (section,) = ptb["latency"]                       # where compress timed it, as it recorded
    assert section["machine"] == machine and rows["prune"]["machines"] == [machine]
    (prune,) = section["rows"]                        # a training run records no latency: not in it
    assert prune["latency_us"] == recorded["compressed"]["lstm"] and prune["machine"] == machine
    assert prune["speedup_vs_dense"] == pytest.approx(min(recorded["baseline"]["lstm"].values())
                                                      / recorded["compressed"]["lstm"]["leanlstm"])
    assert rows["baseline"]["machines"] == []
    assert [f["file"] for f in ptb["figures"]] == [f"ptb-pareto-latency-{_slug(machine)}.png",
                                                   "ptb-pareto-bytes.png", "ptb-curves.png"]


def test_report_of_the_published_results_files():
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"leanlstm-report-{os.getpid()}"
    try:
        result = _invoke("report", *sorted((REPO / "results").glob("*.json")), "--no-latency", "--out", out)
        # two machine kinds timed the PTB runs: a latency plot each, besides bytes and curves
        assert re.search(r"ptb: \d+ run\(s\), 4 plot\(s\) \(\d+ timed on AMD EPYC; \d+ timed on Intel", result.output)
        assert "skipped" in result.output and "artifact-sizes.json" in (out / "report.md").read_text()
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_report_errors_name_the_problem(runs, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    result = runner.invoke(main, ["report", str(not_a_run), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "is not a leanlstm run directory" in result.output
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "report.md").write_text("my notes")
    result = runner.invoke(main, ["report", str(runs["baseline"]), "--no-latency", "--out", str(taken)])
    assert result.exit_code != 0 and "report.md, not written by leanlstm report" in result.output
    assert (taken / "report.md").read_text() == "my notes"
    assert "Traceback" not in result.output
