"""Post-training int8 quantisation and quantisation-aware fine-tuning (``leanlstm.Int8``): every form and head on
the engine's grid, honest bytes, the engine computing with exactly the trained weights, QAT in a user loop with
exact resume, and the command line (PTQ with no training, then QAT epochs)."""
import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import leanlstm
from leanlstm.cli import main
from leanlstm.compress import compress_
from leanlstm.graph import lstm_forms
from leanlstm.methods import Int8, Prune
from leanlstm.methods.pruning import weight_compression
from leanlstm.nn.quant import quantised_parameters, row_scales
from leanlstm.runtime import compile
from leanlstm.runtime.int8 import quantise_rows
from tests.user_models import Tagger


def on_grid(model) -> bool:
    for name, parameter, mask in quantised_parameters(model):
        values = parameter.detach() if mask is None else parameter.detach() * mask
        steps = values / row_scales(values, mask)
        if not torch.allclose(steps, steps.round(), atol=1e-3):
            return False
    return True


def data(step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(3, 7, 10, generator=generator)
    return x, x[..., :5].argmax(-1)                      # learnable tags


def loss_of(model, step):
    x, y = data(step)
    return F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1))


def test_ptq_puts_every_matrix_and_head_of_a_user_model_on_the_engine_grid():
    model = Tagger()
    handle = compress_(model, Int8())
    assert on_grid(model) and len(quantised_parameters(model)) == 2 * 2 * 3 + 1   # ih, hh, hr per layer+dir, head
    assert all(form.value_bits == 8 for _, form in lstm_forms(model))
    assert 2.5 < weight_compression(model) < 4.0            # rows of 8-24 entries: the scales weigh
    summary = handle.summary()
    assert summary["value_bits"] == 8 and summary["quantised_tensors"] == 13


def test_quantised_sparse_model_counts_int8_csr_bytes_and_keeps_its_masks():
    model = torch.nn.Sequential(torch.nn.LSTM(64, 128))
    pruned = compress_(model, Prune(compression=4, total_steps=1, speed_check=False))
    pruned.finalize()
    masks = {name: form.mask.clone() for name, form in lstm_forms(model)}
    before = weight_compression(model)
    compress_(model, Int8())
    for name, form in lstm_forms(model):
        assert torch.equal(form.mask, masks[name])
        assert form.weight.detach()[~form.mask].abs().max() == 0
    # 1-byte values beside 2-byte indices, row pointers and a scale per row (about 20 entries a row here); with
    # about one entry a row the scales would make int8 larger than float32, and the bytes would say so
    assert 1.7 * before < weight_compression(model) < 2 * before


def test_the_int8_engine_computes_with_the_quantised_weights():
    torch.manual_seed(3)
    lstm = leanlstm.LSTM(24, 48, 2)
    compress_(torch.nn.Sequential(lstm), Int8())
    engine = compile(lstm, precision="int8", choose="always")
    for layer in lstm.layers:
        for _, form in layer.forms():
            q, scales = quantise_rows(form.weight.detach().numpy())
            np.testing.assert_allclose(q * scales[:, None], form.weight.detach().numpy(), rtol=1e-6)
    x = torch.randn(9, 24)
    expected = lstm(x[:, None])[0][:, 0].detach().numpy()
    got = engine.run(x.numpy())[0]
    # the remaining difference is the per-step 8-bit quantisation of the vectors, not of the weights
    assert np.abs(got - expected).max() < 0.02


def train(model, handle, optimizer, steps, start=0):
    for step in range(start, start + steps):
        torch.manual_seed(step)                          # the dropout of step ``step``, interrupted or not
        loss = loss_of(model, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()


def test_quantisation_aware_fine_tuning_learns_on_the_grid_and_resumes_exactly():
    torch.manual_seed(0)
    model = Tagger()
    handle = compress_(model, Int8())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(sum(loss_of(model, s) for s in range(40)))
    start = copy.deepcopy((model.state_dict(), handle.state_dict(), optimizer.state_dict()))
    train(model, handle, optimizer, 40)
    assert on_grid(model)
    assert float(sum(loss_of(model, s) for s in range(40))) < 0.8 * first   # as float32 training does here

    resumed = Tagger()
    resumed_handle = compress_(resumed, Int8())
    resumed.load_state_dict(start[0])
    resumed_handle.load_state_dict(start[1])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(start[2])
    train(resumed, resumed_handle, resumed_optimizer, 25)
    middle = copy.deepcopy((resumed.state_dict(), resumed_handle.state_dict(), resumed_optimizer.state_dict()))
    again = Tagger()
    again_handle = compress_(again, Int8())
    again_handle.load_state_dict(middle[1])
    again.load_state_dict(middle[0])
    again_optimizer = torch.optim.Adam(again.parameters(), lr=1e-2)
    again_optimizer.load_state_dict(middle[2])
    train(again, again_handle, again_optimizer, 15, start=25)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="clip must be one of max, mse"):
        Int8(clip="minmax")


def test_cli_ptq_without_training_then_qat(tmp_path, ptb_slice_dir):
    runner = CliRunner()
    common = ["--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    base = tmp_path / "base"
    result = runner.invoke(main, ["train", "--preset", "tiny", "--epochs", "1", "--max-batches", "30", "--out",
                                  str(base)] + common)
    assert result.exit_code == 0, result.output
    baseline = json.loads((base / "metrics.json").read_text())
    result = runner.invoke(main, ["compress", "--method", "int8", "--from", str(base), "--out", str(tmp_path / "ptq"),
                                  "--latency-repeats", "2"] + common)
    assert result.exit_code == 0, result.output
    ptq = json.loads((tmp_path / "ptq" / "metrics.json").read_text())
    assert ptq["train_minutes"] == 0 and ptq["value_bits"] == 8 and ptq["lstm_compression"] > 3
    assert abs(ptq["test_ppl"] - baseline["test_ppl"]) < 0.02 * baseline["test_ppl"]
    latency = ptq["latency_us_per_step"]["compressed"]["lstm"]
    assert {"leanlstm-int8", "torch-int8"} <= set(latency)
    assert "leanlstm-int8_vs_baseline_torch-int8" in ptq["lstm_speedup"]
    result = runner.invoke(main, ["compress", "--method", "int8", "--from", str(base), "--out", str(tmp_path / "qat"),
                                  "--finetune-epochs", "1", "--max-batches", "10", "--latency-repeats", "0"] + common)
    assert result.exit_code == 0, result.output
    qat = json.loads((tmp_path / "qat" / "metrics.json").read_text())
    assert qat["value_bits"] == 8 and [e["phase"] for e in qat["history"]] == ["finetune"]
    assert np.isfinite(qat["test_ppl"])


def test_pruning_sized_for_int8_meets_its_budget_once_quantised():
    model = torch.nn.Sequential(torch.nn.LSTM(64, 128))
    handle = compress_(model, Prune(compression=20, value_bits=8, total_steps=1, speed_check=False))
    handle.finalize()
    assert weight_compression(model) < 20                 # float32 values: not yet
    compress_(model, Int8())
    assert 20 <= weight_compression(model) < 20.5
    with pytest.raises(ValueError, match="value_bits must be one of 4, 8, 32"):
        Prune(value_bits=16)
    with pytest.raises(ValueError, match="block=16x4"):
        Prune(value_bits=4)                                 # 4-bit values: block-sparse forms only


def test_blocks_sized_for_4_bits_meet_their_budget_once_quantised_to_4_bits_in_the_engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LSTM(64, 128))
    handle = compress_(model, Prune(compression=20, value_bits=4, block="16x4", total_steps=1, speed_check=False))
    handle.finalize()
    kept = {name: form.mask.clone() for name, form in lstm_forms(model)}
    compress_(model, Int8(bits=4, heads=False))
    assert 20 <= weight_compression(model) < 20.5
    for name, form in lstm_forms(model):
        assert form.value_bits == 4 and torch.equal(form.mask, kept[name])
        w = form.weight.detach()
        steps = w / w.abs().amax(1, keepdim=True).clamp_min(1e-30) * 7
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() == 7    # q in [-7, 7]
    engine = compile(model[0], precision="int8", choose="always")
    x = torch.randn(9, 1, 64)
    with torch.no_grad():
        want = model[0](x)[0][:, 0].numpy()
    got = engine.run(x[:, 0].numpy())[0]
    assert np.abs(got - want).max() < 0.02                             # the engine's per-step input rounding
    dense = torch.nn.Sequential(torch.nn.LSTM(8, 8))
    with pytest.raises(ValueError, match="4-bit values need a block-sparse form"):
        compress_(dense, Int8(bits=4))
    assert type(dense[0]) is torch.nn.LSTM                             # refused before any change


def test_ptq_snaps_the_embedding_table_the_int8_engine_stores():
    from leanlstm.runtime.int8 import Int8Table
    from tests.user_models import RNNModel

    torch.manual_seed(4)
    model = RNNModel(ntoken=30, ninp=8, nhid=12).eval()
    compress_(model, Int8())
    table = model.encoder.weight.detach().numpy()
    stored = Int8Table(table)
    np.testing.assert_allclose(stored(np.arange(30)), table, rtol=1e-6)    # already on its grid: stored exactly
    assert stored.nbytes == 30 * 8 + 30 * 4                                # int8 rows, a float32 scale each
    tokens = torch.randint(0, 30, (7, 1))
    with torch.no_grad():
        want = model(tokens, model.init_hidden(1))[0].numpy()
    got = compile(model, precision="int8", choose="always").run(tokens[:, 0].numpy())[0]
    assert np.abs(got - want).max() < 0.05           # the vectors' per-step 8-bit quantisation, not the weights
    kept = RNNModel(ntoken=30, ninp=8, nhid=12)
    before = kept.encoder.weight.detach().clone()
    compress_(kept, Int8(embeddings=False))
    assert torch.equal(kept.encoder.weight, before)
