"""The stack latency model: per-layer rows summed with one run overhead, sparse savings added per matrix,
interpolation without extrapolation, and its error against direct measurement."""
import math

import pytest
from torch import nn

import leanlstm
from leanlstm.runtime.latency_model import ONE, TWO, LatencyModel, LayerSpec, prediction_error, stack_specs
from leanlstm.runtime.profile import LayerKey, LayerProfile, LayerSettings, LayerTable


def synthetic_table():
    rows = {ONE: 0.5, TWO: 0.8,                                  # a run's overhead: 2 x 0.5 - 0.8 = 0.2
            LayerKey("lstm", 8, 16): 1.2, LayerKey("lstm", 16, 16): 1.4, LayerKey("lstm", 16, 12): 1.0,
            LayerKey("lstm", 8, 16, "hh", 0.25): 1.0, LayerKey("lstm", 8, 16, "ih", 0.25): 1.1}
    return LayerTable({key: {"median": value} for key, value in rows.items()}, {"backend": "leanlstm"})


def test_a_stack_is_one_overhead_plus_each_layer_less_its_own():
    model = LatencyModel(synthetic_table())
    assert model.overhead_us() == pytest.approx(0.2)
    assert model.predict(leanlstm.LSTM(8, [16, 16])) == pytest.approx(0.2 + 1.0 + 1.2)
    assert model.predict(leanlstm.LSTM(8, [16, 12])) == pytest.approx(0.2 + 1.0 + 0.8)
    both = leanlstm.LSTM(8, 16, bidirectional=True)                      # each direction one layer's latency
    assert model.predict(both) == pytest.approx(0.2 + 2 * 1.0)
    assert model.predict(nn.LSTM(8, 16)) == pytest.approx(1.2)          # a torch.nn.LSTM reads the same


def test_sparse_matrices_save_what_each_saves_alone():
    model = LatencyModel(synthetic_table())
    spec = LayerSpec("lstm", 8, 16, (("hh", 0.25), ("ih", 0.25)))
    assert model.layer_us(spec) == pytest.approx(1.2 - 0.2 - 0.1)
    lstm = leanlstm.LSTM(8, 16).replace_forms("sparse", density=0.25, matrices=["hh"], speed_check=False)
    assert stack_specs(lstm) == [LayerSpec("lstm", 8, 16, (("hh", 0.25),))]
    assert model.predict(lstm) == pytest.approx(1.0)
    halfway = leanlstm.LSTM(8, 16).replace_forms("sparse", density=0.625, matrices=["hh"], speed_check=False)
    assert model.predict(halfway) == pytest.approx(1.1)                # 0.25 -> dense, interpolated


def test_rows_profiled_under_different_load_never_predict_below_a_layer():
    """A sparse row timed while the machine was twice as busy saves its share, not its (doubled) difference; an
    overhead read from busy rows is capped by what a layer costs alone."""
    rows = {ONE: {"median": 3.0}, TWO: {"median": 1.0},                 # busy overhead: 2 x 3 - 1 = 5
            LayerKey("lstm", 8, 16): {"median": 1.2}, LayerKey("lstm", 16, 16): {"median": 1.2},
            LayerKey("lstm", 8, 16, "ih", 0.25): {"median": 1.6, "dense_median": 2.4}}   # a run twice as busy
    model = LatencyModel(LayerTable(rows, {"backend": "leanlstm"}))
    spec = LayerSpec("lstm", 8, 16, (("ih", 0.25),))
    assert model.layer_us(spec) == pytest.approx(1.2 * 1.6 / 2.4)       # a third saved, of the quiet 1.2
    assert model.predict(leanlstm.LSTM(8, [16, 16])) == pytest.approx(1.2 + 1.2 - 1.2)   # overhead capped at 1.2
    assert model.predict(leanlstm.LSTM(8, [16, 16])) >= 1.2


def test_forms_and_sizes_the_model_cannot_price_are_refused():
    model = LatencyModel(synthetic_table())
    with pytest.raises(KeyError, match="hidden size outside the profiled ones"):
        model.predict(leanlstm.LSTM(8, 64))
    with pytest.raises(ValueError, match="dense and pruned matrices; layers.0.weight_hh is a lowrank form"):
        stack_specs(leanlstm.LSTM(8, 16).replace_forms("lowrank", matrices=["hh"], rank=2, speed_check=False))
    with pytest.raises(TypeError, match="predicts LSTM stacks"):
        stack_specs(nn.Linear(3, 4))


def test_prediction_error_against_direct_measurement_on_two_tiny_models(tmp_path):
    profile = LayerProfile(tmp_path, LayerSettings(seq_len=8, repeats=3))
    models = [leanlstm.LSTM(6, [12, 12]),
              leanlstm.LSTM(6, [16, 8]).replace_forms("sparse", density=0.3, matrices=["hh"], speed_check=False)]
    result = prediction_error(models, LatencyModel(profile), repeats=5)
    assert result["backend"] == "leanlstm" and len(result["models"]) == 2
    for row in result["models"]:
        assert row["predicted"] > 0 and row["measured"] > 0
        assert row["error"] == pytest.approx(abs(row["predicted"] - row["measured"]) / row["measured"])
    errors = sorted(row["error"] for row in result["models"])
    assert result["worst"] == errors[-1] and result["median"] == pytest.approx(sum(errors) / 2)
    assert math.isfinite(result["median"]) and result["worst"] < 1.0     # a busy machine: within 2x, not exact
    assert {key.hidden_size for key in profile.table.rows} >= {12, 16, 8}  # the profile measured what it lacked
    with pytest.raises(ValueError, match="at least one model"):
        prediction_error([], LatencyModel(profile))
