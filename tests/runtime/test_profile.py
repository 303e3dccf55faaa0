"""Hardware profiles: sweeps and per-layer tables write rows as they go, resume, refuse numbers from another machine,
and answer a training method's queries (valleys, snapping, where sparse beats dense)."""
import csv
import importlib
import json

import pytest
from click.testing import CliRunner

from leanlstm.cli import main
from leanlstm.cli.profile import parse_sizes
from leanlstm.runtime import LatencyTable, ProfileSettings, profile
from leanlstm.runtime.profile import LayerKey, LayerProfile, LayerSettings, LayerTable, fingerprint, profile_layers

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


# --- valleys and snapping ------------------------------------------------------------------------------------
def test_valleys_and_snapping_on_a_synthetic_table():
    t = table()                                      # 8: 3.0, 16: 4.0, 24: 3.5, 32: 5.0, 40: 4.5, 48: 6.0
    assert t.valleys() == [8, 24, 40]                # local minima (the first size counts: nothing before it)
    assert t.snapped_sizes() == [8, 24, 40, 48]      # 16 and 32 are beaten by the larger 24 and 40
    assert t.fastest_at_or_above(9, tolerance=0.2) == 16    # 16 is within 20% of 24's 3.5: not worth rounding up
    assert t.fastest_at_or_above(9, tolerance=0.1) == 24
    flat = LatencyTable.from_rows({"size": s, "median": m} for s, m in ((8, 1.0), (16, 2.0), (24, 3.0)))
    assert flat.valleys() == [8] and flat.snapped_sizes() == [8, 16, 24] and flat.hysteresis() == []
    assert LatencyTable.from_rows({"size": s, "median": m} for s, m in ((8, 2.0), (16, 1.9))).valleys(0.1) == [8]


# --- per-layer tables ----------------------------------------------------------------------------------------
def layer_rows():
    """One LSTM shape (input 8, hidden 16): hh sparse beats dense at 0.1 only; ih sparse never does."""
    rows = [("all", 1.0, 2.0), ("hh", 0.1, 1.5), ("hh", 0.3, 2.4), ("ih", 0.1, 2.1), ("ih", 0.3, 2.6)]
    rows = [{"cell": "lstm", "input_size": 8, "hidden_size": 16, "matrices": m, "density": d, "median": v}
            for m, d, v in rows]
    return rows + [{"cell": "lstm", "input_size": i, "hidden_size": h, "median": v}
                   for i, h, v in ((8, 8, 1.0), (8, 24, 2.5), (16, 16, 3.0))]


def test_layer_table_density_choice_refuses_sparsity_where_dense_is_faster():
    t = LayerTable.from_rows(layer_rows())
    assert t.faster_densities("lstm", 8, 16, "hh") == [0.1]
    assert t.faster_densities("lstm", 8, 16, "ih") == []                 # dense is faster: sparsity refused
    assert t.faster_densities("lstm", 8, 16, "hh", tolerance=0.3) == []  # 25% faster is not 30%
    noisy = LayerTable.from_rows(layer_rows()[:2])
    noisy.rows[LayerKey("lstm", 8, 16)]["min"] = 1.0                     # the dense layer's fastest sample
    noisy.rows[LayerKey("lstm", 8, 16, "hh", 0.1)]["min"] = 1.4          # beats sparse's: no decision on a median
    assert noisy.faster_densities("lstm", 8, 16, "hh") == []
    with pytest.raises(KeyError, match="not profiled"):
        t.faster_densities("lstm", 8, 32, "hh")


def test_layer_table_interpolates_between_profiled_keys_and_never_extrapolates():
    t = LayerTable.from_rows(layer_rows())
    assert t.estimate(LayerKey("lstm", 8, 12)) == pytest.approx(1.5)          # between hidden 8 and 16
    assert t.estimate(LayerKey("lstm", 12, 16)) == pytest.approx(2.5)         # between inputs 8 and 16
    assert t.estimate(LayerKey("lstm", 8, 16, "hh", 0.2)) == pytest.approx(1.95)   # between densities 0.1 and 0.3
    assert t.estimate(LayerKey("lstm", 8, 16, "hh", 0.65)) == pytest.approx(2.2)   # 0.3 .. dense (1.0)
    assert t.sweep("lstm", 8).sizes == [8, 16, 24] and t.sweep("lstm", 8).valleys() == [8]
    for outside in (LayerKey("lstm", 8, 32), LayerKey("lstm", 4, 16), LayerKey("lstm", 8, 16, "hh", 0.05)):
        with pytest.raises(KeyError):
            t.estimate(outside)
    saved = t.to_dict()
    assert saved["key"] == ["cell", "input_size", "hidden_size", "matrices", "density"] and len(saved["rows"]) == 8


def test_layer_profile_measures_on_demand_and_an_interrupted_one_resumes(tmp_path):
    settings = LayerSettings(seq_len=4, repeats=2)
    keys = [LayerKey("lstm", 4, 8), LayerKey("lstm", 4, 8, "hh", 0.5), LayerKey("hlstm {\"gate_hidden\": 4}", 4, 8)]
    measured = []

    def interrupt(key, row):
        measured.append(key)
        if len(measured) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LayerProfile(tmp_path, settings, on_row=interrupt).ensure(keys)
    assert set(LayerTable.load(tmp_path).rows) == set(sorted(keys)[:2])          # rows written as measured
    again = []
    table = profile_layers(keys, tmp_path, settings, on_row=lambda key, row: again.append(key))
    assert again == sorted(keys)[2:] and set(table.rows) == set(keys)           # only the missing one measured
    assert all(row["median"] > 0 for row in table.rows.values())
    assert (tmp_path / "latency.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="other settings.*repeats=2 there, 3 now"):
        LayerProfile(tmp_path, LayerSettings(seq_len=4, repeats=3))


def test_profiling_on_a_busy_machine_warns(tmp_path, caplog, monkeypatch):
    profile = importlib.import_module("leanlstm.runtime.profile")   # the package's `profile` is a function
    monkeypatch.setattr(profile, "load_now", lambda: {"load_average": [3.0, 3.0, 3.0], "runnable": 4})
    with caplog.at_level("WARNING"):
        busy = LayerProfile(tmp_path, LayerSettings(seq_len=4, repeats=2))
        busy.ensure([LayerKey("lstm", 4, 8)])
        busy.ensure([LayerKey("lstm", 4, 10)])                     # once per profile, not once per batch of rows
    assert caplog.text.count("other processes are runnable") == 1
    assert "while 3 other processes are runnable" in caplog.text
    caplog.clear()
    monkeypatch.setattr(profile, "load_now", lambda: {"load_average": [3.0, 3.0, 3.0], "runnable": 1})
    with caplog.at_level("WARNING"):
        LayerProfile(tmp_path, LayerSettings(seq_len=4, repeats=2)).ensure([LayerKey("lstm", 4, 12)])
    assert "runnable" not in caplog.text


def fake_another_machine(folder):
    settings = json.loads((folder / "settings.json").read_text())
    settings["fingerprint"]["machine"]["cpu"] = "Another CPU 9000"
    (folder / "settings.json").write_text(json.dumps(settings))


def test_a_profile_from_another_machine_warns_and_is_measured_again(tmp_path, caplog):
    settings = ProfileSettings(seq_len=4, repeats=2)
    profile([4, 8], tmp_path, settings)
    fake_another_machine(tmp_path)
    with caplog.at_level("WARNING"):
        assert LatencyTable.load(tmp_path).sizes == [4, 8]             # a plain load warns, and measures nothing
    assert "another machine" in caplog.text and "Another CPU 9000" in caplog.text
    caplog.clear()
    measured = []
    with caplog.at_level("WARNING"):
        again = profile([4, 8], tmp_path, settings, on_row=lambda size, row: measured.append(size))
    assert measured == [4, 8] and again.sizes == [4, 8]                 # never reused: measured again here
    assert "not reused" in caplog.text and "stale-1" in caplog.text
    assert "Another CPU 9000" in (tmp_path / "stale-1" / "settings.json").read_text()
    assert json.loads((tmp_path / "settings.json").read_text())["fingerprint"] == fingerprint("leanlstm")


def test_a_layer_profile_from_another_backend_version_is_measured_again(tmp_path, caplog):
    settings = LayerSettings(seq_len=4, repeats=2)
    LayerProfile(tmp_path, settings).ensure([LayerKey("lstm", 4, 8)])
    stored = json.loads((tmp_path / "settings.json").read_text())
    stored["fingerprint"]["versions"]["numba"] = "0.1"
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    measured = []
    with caplog.at_level("WARNING"):
        LayerProfile(tmp_path, settings, on_row=lambda key, row: measured.append(key)).ensure([LayerKey("lstm", 4, 8)])
    assert measured == [LayerKey("lstm", 4, 8)] and "versions.numba: '0.1' there" in caplog.text


def test_unknown_backends_are_refused_naming_the_known_ones():
    for make in (lambda: ProfileSettings(backend="tpu"), lambda: LayerSettings(backend="tpu")):
        with pytest.raises(ValueError, match="unknown backend 'tpu'; known backends: leanlstm, .*onnxruntime"):
            make()


def test_cli_profile_per_layer(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--per-layer", "--sizes", "4:8:4", "--input-sizes", "4",
                                       "--densities", "0.5", "--matrices", "hh", "--seq-len", "4", "--repeats", "2",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "4 layers in" in result.stdout and "valleys (local minima) at hidden sizes" in result.stdout
    assert set(LayerTable.load(tmp_path).rows) == {LayerKey("lstm", 4, h, *form) for h in (4, 8)
                                                   for form in (("all", 1.0), ("hh", 0.5))}
    bad = CliRunner().invoke(main, ["profile", "--per-layer", "--sizes", "4", "--layers", "2", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "--per-layer times one layer" in bad.output
    bad = CliRunner().invoke(main, ["profile", "--per-layer", "--sizes", "4", "--densities", "1.5", "--out",
                                    str(tmp_path)])
    assert bad.exit_code != 0 and "a density lies in (0, 1)" in bad.output
