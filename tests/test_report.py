"""Figures: the ISS component plot and the perplexity-compression trade-off."""
import pytest

from leanlstm.report import method_label, plot_components, plot_tradeoff


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
    assert method_label({"method": "doped-kp", "method_config": {"cmr": 0, "doping_share": 0.25}}) == "doped-kp (no CMR)"
    assert (method_label({"method": "doped-kp", "method_config": {"cmr": 0, "doping_share": 0.75}})
            == "doped-kp (no CMR) (doping share 0.75)")
    assert method_label({"method": "baseline", "role": "control"}) == "direct design (control)"
    assert method_label({"method": "iss", "source": None}) == "iss (from scratch)"
    assert method_label({"method": "iss", "source": "runs/ptb-small"}) == "iss"
    assert method_label({"method": "iss", "source": None, "distilled_from": "runs/base"}) == "iss (from scratch) (distilled)"


def test_plot_components_needs_iss_metrics(tmp_path):
    with pytest.raises(ValueError, match="--method iss"):
        plot_components({"history": []}, tmp_path / "c.png")
