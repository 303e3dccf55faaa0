"""Hardware profiles: the sweep writes rows as it goes, resumes, and answers a training method's queries."""
import csv
import json

import pytest
from click.testing import CliRunner

from leanlstm.cli import main
from leanlstm.cli.profile import parse_sizes
from leanlstm.runtime import LatencyTable, ProfileSettings, profile

SYNTHETIC = [(8, 3.0), (16, 4.0), (24, 3.5), (32, 5.0), (40, 4.5), (48, 6.0)]


def table():
    return LatencyTable.from_rows({"size": s, "median": m} for s, m in SYNTHETIC)


def test_queries_on_a_synthetic_table():
    t = table()
    assert t.fastest_at_or_above(9) == 24           # 16 is slower than 24
    assert t.fastest_at_or_above(8) == 8
    assert t.fastest_at_or_above(25) == 40
    assert t.fastest_at_or_above(48) == 48
    assert t.largest_under(4.6) == 40 and t.largest_under(4.0) == 24 and t.largest_under(2.0) is None
    assert t.latency(24) == 3.5
    assert [(p["size"], p["slower_size"]) for p in t.hysteresis()] == [(24, 16), (40, 32)]
    assert [p["size"] for p in t.hysteresis(tolerance=0.11)] == [24]   # 24 beats 16 by 12.5%, 40 beats 32 by 10%
    with pytest.raises(ValueError, match="no profiled size is >= 49"):
        t.fastest_at_or_above(49)
    with pytest.raises(KeyError, match="not profiled"):
        t.latency(12)


def test_profile_writes_rows_resumes_and_plots(tmp_path):
    settings = ProfileSettings(seq_len=4, repeats=3)
    measured = []
    first = profile([4, 8], tmp_path, settings, on_row=lambda size, row: measured.append(size))
    assert first.sizes == [4, 8] and measured == [4, 8]
    second = profile([4, 8, 12], tmp_path, settings, on_row=lambda size, row: measured.append(size))
    assert second.sizes == [4, 8, 12] and measured == [4, 8, 12]          # 4 and 8 were not measured again
    with open(tmp_path / "latency.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["size"]) for r in rows] == [4, 8, 12] and all(float(r["median"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "latency.json").read_text())
    assert saved["settings"]["backend"] == "leanlstm" and len(saved["rows"]) == 3
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert LatencyTable.load(tmp_path).sizes == [4, 8, 12]
    with pytest.raises(ValueError, match="other settings.*seq_len=4 there, 5 now"):
        profile([16], tmp_path, ProfileSettings(seq_len=5, repeats=3))


def test_an_interrupted_profile_keeps_its_rows(tmp_path):
    settings = ProfileSettings(seq_len=4, repeats=2)

    def interrupt(size, row):
        if size == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile([4, 8, 12], tmp_path, settings, on_row=interrupt)
    assert LatencyTable.load(tmp_path).sizes == [4, 8]


def test_cli_profile(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--sizes", "4:12:4", "--out", str(tmp_path), "--seq-len", "4",
                                       "--repeats", "2", "--form", "lowrank", "--form-option", "rank=2"])
    assert result.exit_code == 0, result.output
    assert "size     12:" in result.stdout and "3 sizes in" in result.stdout
    assert json.loads((tmp_path / "settings.json").read_text())["form_options"] == {"rank": 2}
    bad = CliRunner().invoke(main, ["profile", "--sizes", "4:x", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "not a size or a range" in bad.output


def test_cli_profile_bad_settings_give_clear_errors_and_leave_the_folder_usable(tmp_path):
    out = str(tmp_path / "p")
    base = ["profile", "--sizes", "4:8:4", "--out", out, "--seq-len", "4", "--repeats", "2"]
    for extra, message in ((["--form", "lowrank"], "form 'lowrank' with options {}"),
                           (["--repeats", "0"], "repeats must be at least 1"),
                           (["--form", "bogus"], "unknown weight form 'bogus'")):
        bad = CliRunner().invoke(main, base + extra)
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output
    fixed = CliRunner().invoke(main, base + ["--form", "lowrank", "--form-option", "rank=2"])
    assert fixed.exit_code == 0, fixed.output       # the failed attempts measured nothing, so nothing to keep


def test_parse_sizes():
    assert parse_sizes("8:24:8,100, 3") == [3, 8, 16, 24, 100]
    assert parse_sizes("5:7") == [5, 6, 7]
