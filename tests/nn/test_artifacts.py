"""Saved models weigh what their forms store: state dicts hold the inference arrays (CSR, factors), loading gives
exactly the same outputs, and state dicts of the dense-weight-and-mask layout still load."""
import io
import math

import pytest
import torch

import leanlstm
from leanlstm.checkpoint import load_checkpoint, save_checkpoint
from leanlstm.nn import LSTM
from leanlstm.nn.forms import (BlockCirculant, Dense, Doped, GroupDense, GroupLowRank, Hybrid, Kronecker, LowRank,
                               MaskedSparse, build_form)


def _forms(shape=(256, 64)):
    weight = torch.randn(shape)
    yield Dense.from_dense(weight)
    yield MaskedSparse.from_dense(weight, density=0.05)
    yield Kronecker.from_dense(weight)
    yield LowRank.from_dense(weight, rank=8)
    yield Hybrid.from_dense(weight, full_rows=16, rank=4)
    yield BlockCirculant.from_dense(weight, block_size=8)
    yield Doped.from_dense(weight, "kronecker", density=0.02)
    yield Doped.from_dense(weight, "lowrank", {"rank": 4}, density=0.01)
    yield GroupDense.from_dense(weight, groups=4)
    yield GroupLowRank.from_dense(weight, groups=2, rank=8)


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("form", list(_forms()), ids=lambda form: form.name + str(form.options().get("structure", "")))
def test_every_form_round_trips_exactly_and_saves_its_stored_bytes(form):
    state = form.state_dict()
    assert sum(t.numel() * t.element_size() for t in state.values()) == form.nbytes()
    fresh = build_form(form.config())
    fresh.load_state_dict(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    assert torch.equal(fresh.materialize(), form.materialize())
    x = torch.randn(3, form.in_features)
    assert torch.equal(fresh.matvec(x), form.matvec(x))


def test_sparse_state_is_csr_and_keeps_entries_that_are_zero_inside_the_mask():
    form = MaskedSparse.from_dense(torch.randn(40, 30), density=0.1)
    with torch.no_grad():
        form.weight[form.mask.nonzero()[0].tolist()] = 0.0          # a connection kept at zero (free to grow)
    state = form.state_dict()
    assert set(state) == {"csr_values", "csr_columns", "csr_rows"} and state["csr_columns"].dtype == torch.uint16
    fresh = MaskedSparse(40, 30)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mask, form.mask) and torch.equal(fresh.weight, form.weight)
    dense_mask = MaskedSparse.from_dense(torch.randn(40, 30), density=1.0)   # CSR would be larger: kept dense
    assert set(dense_mask.state_dict()) == {"weight", "mask"}
    assert set(form.state_dict(keep_vars=True)) == {"weight", "mask"}          # the live parameters when asked


def test_the_dense_and_mask_layout_still_loads():
    form = MaskedSparse.from_dense(torch.randn(40, 30), density=0.1)
    fresh = MaskedSparse(40, 30)
    fresh.load_state_dict({"weight": form.weight.detach().clone(), "mask": form.mask.clone()})
    assert torch.equal(fresh.materialize(), form.materialize())


def test_csr_arrays_of_another_shape_are_refused():
    state = MaskedSparse.from_dense(torch.randn(40, 30), density=0.1).state_dict()
    with pytest.raises(RuntimeError, match="do not describe a 41x30 matrix"):
        MaskedSparse(41, 30).load_state_dict(state)
    del state["csr_rows"]
    with pytest.raises(RuntimeError, match="Missing key.*csr_rows"):
        MaskedSparse(40, 30).load_state_dict(state)


@pytest.mark.parametrize("config", [leanlstm.Prune(compression=20, total_steps=1),
                                    leanlstm.Doped(compression=20, total_steps=1)], ids=["pruned", "doped-kp"])
def test_a_compressed_stack_checkpoint_weighs_its_stored_bytes(tmp_path, config):
    lstm = LSTM(128, 256, 2)
    dense_bytes = len(_saved(lstm.state_dict()))
    leanlstm.compress_(lstm, config).finalize()
    lstm.eval()
    save_checkpoint(tmp_path / "checkpoint.pt", {"model_config": lstm.config(), "model_state": lstm.state_dict()})
    size = (tmp_path / "checkpoint.pt").stat().st_size
    assert size < 1.2 * lstm.stored_params() * 4 and size < dense_bytes / 10
    rebuilt = LSTM.from_config(load_checkpoint(tmp_path / "checkpoint.pt")["model_config"]).eval()
    rebuilt.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt")["model_state"])
    x = torch.randn(7, 2, 128)
    assert torch.equal(rebuilt(x)[0], lstm(x)[0])
    assert math.isclose(rebuilt.stored_params(), lstm.stored_params())
