"""Gradual magnitude pruning to an honest compression factor (CSR index overhead counted)."""
import json

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from leanlstm import LSTM
from leanlstm.compress import compress_
from leanlstm.methods import Prune
from leanlstm.methods.pruning import GradualPruning, csr_entries_within, final_entries, weight_compression
from leanlstm.nn.forms import MaskedSparse
from leanlstm.nn.forms.sparse import csr_nbytes
from leanlstm.runs import RunConfig, compress_run


def test_entries_within_a_byte_budget_count_csr_exactly():
    budget = 2600 * 650 * 4 / 20                                        # 338 000 bytes
    nnz = csr_entries_within(2600, 650, budget)
    assert nnz == (338_000 - 2601 * 4) // 6 == 54_599                  # 3.23% density, not 5%
    assert csr_nbytes(2600, 650, nnz) <= budget < csr_nbytes(2600, 650, nnz + 1)
    assert csr_entries_within(4, 70_000, 1e9) == 4 * 70_000             # capped at dense
    assert csr_nbytes(4, 70_000, 1) - csr_nbytes(4, 70_000, 0) == 8     # int32 column indices past 65536
    assert csr_entries_within(100, 10, 100) == -1                       # the row pointers alone do not fit


def test_gradual_pruning_follows_the_schedule_to_the_exact_final_entries():
    lstm = LSTM(30, 40, 2).replace_forms("sparse")
    pruner = GradualPruning(compression=20.0, start=0.1, end=0.8, every=5)
    counts = []
    for step in range(0, 101):
        pruner.prune(lstm, step, 100)
        counts.append(sum(form.nnz() for _, form in lstm.forms()))
    assert counts[10] == sum(f.out_features * f.in_features for _, f in lstm.forms())   # untouched before start
    assert all(b <= a for a, b in zip(counts, counts[1:]))
    finals = {name: final_entries(name, form, 20.0) for name, form in lstm.forms()}
    assert {name: form.nnz() for name, form in lstm.forms()} == finals
    assert counts[80] == counts[100] == sum(finals.values())
    assert 20.0 <= weight_compression(lstm) < 20.0 * 1.002
    before = {name: form.mask.clone() for name, form in lstm.forms()}
    pruner.prune_to_final(lstm)                                         # idempotent
    assert all(torch.equal(before[name], form.mask) for name, form in lstm.forms())


def test_prune_keeps_the_largest_weights_of_every_matrix():
    model = torch.nn.Sequential(torch.nn.LSTM(8, 16))
    dense = model[0].weight_hh_l0.detach().clone()
    handle = compress_(model, Prune(compression=4.0))
    assert isinstance(model[0].layers[0].weight_hh, MaskedSparse) and model[0].layers[0].weight_hh.density() == 1.0
    handle.finalize()
    form = model[0].layers[0].weight_hh
    kept = form.mask
    assert dense[kept].abs().min() >= dense[~kept].abs().max()
    torch.testing.assert_close(form.materialize()[kept], dense[kept])
    assert handle.summary()["lstm_weight_compression"] >= 4.0
    assert set(handle.summary()["sparse_density"]) == {"0.layers.0.weight_ih", "0.layers.0.weight_hh"}


def test_a_budget_that_cannot_be_met_is_refused_before_any_change():
    model = torch.nn.Sequential(torch.nn.LSTM(8, 16))
    with pytest.raises(ValueError, match="cannot reach 100.0x"):
        compress_(model, Prune(compression=100.0))
    assert isinstance(model[0], torch.nn.LSTM)


def test_the_schedule_runs_from_the_handle_and_needs_its_length():
    model = torch.nn.Sequential(torch.nn.LSTM(8, 16))
    handle = compress_(model, Prune(compression=4.0, prune_every=1, anneal_end=1.0, total_steps=4))
    nnz = []
    for _ in range(4):
        handle.after_step()
        nnz.append(sum(form.nnz() for _, form in handle.forms()))
    assert nnz[0] < 4 * 16 * (8 + 16) and all(b < a for a, b in zip(nnz, nnz[1:]))
    assert 4.0 <= handle.summary()["lstm_weight_compression"] < 4.0 * 1.01     # at its target on the last step
    unknown = compress_(torch.nn.Sequential(torch.nn.LSTM(8, 16)), Prune(compression=4.0))
    with pytest.raises(ValueError, match="total_steps=N"):
        unknown.after_step()


def test_prune_run_on_a_ptb_slice_ends_at_the_target_density(tmp_path, ptb_slice_dir):
    run = RunConfig(preset="tiny", method="prune", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 2, "max_batches": 8}, finetune_overrides={"epochs": 1},
                    method_config={"compression": 10.0, "prune_every": 3})
    metrics = compress_run(run, tmp_path / "prune", progress=False)
    final = csr_entries_within(128, 32, 128 * 32 * 4 / 10)              # 187 entries of 4096 per matrix
    assert metrics["sparse_density"] == {f"lstm.layers.{i}.weight_{m}": final / 4096 for i in (0, 1)
                                         for m in ("ih", "hh")}
    assert 10.0 <= metrics["lstm_weight_compression"] < 10.0 * 1.005
    assert json.loads((tmp_path / "prune" / "metrics.json").read_text())["method"] == "prune"


def test_block_pruning_keeps_whole_vnni_blocks_and_meets_the_int8_budget():
    from leanlstm.methods import Int8
    from leanlstm.nn.forms import BlockSparse

    model = nn.Sequential(nn.LSTM(64, 128))
    handle = compress_(model, Prune(compression=12, block="16x4", value_bits=8, total_steps=20, prune_every=5,
                                    speed_check=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        out = model(torch.randn(5, 2, 64))[0].sum()
        optimizer.zero_grad()
        out.backward()
        optimizer.step()
        handle.after_step()
    handle.finalize()
    for _, form in handle.forms():
        assert isinstance(form, BlockSparse)
        blocks = form.mask.view(form.out_features // 16, 16, form.in_features // 4, 4)
        assert bool((blocks.all(3).all(1) | ~blocks.any(3).any(1)).all())      # every block all in or all out
    compress_(model, Int8())
    assert 12 <= weight_compression(model) < 12.5
    with pytest.raises(ValueError, match="block must be ROWSxCOLS"):
        Prune(block="16")


def _train_spotter(model, handle, steps: int) -> None:
    """A user's loop on a KeywordSpotter of 32 features: SGD on random batches, the handle's hooks, finalize."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = model(torch.randn(3, 5, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        handle.after_step()
    handle.finalize()


def test_heads_are_pruned_to_their_own_budget_and_restored_from_the_structure():
    from leanlstm.compress import compressed_config, restore_
    from leanlstm.nn import FormLinear
    from tests.user_models import KeywordSpotter

    torch.manual_seed(0)
    model = KeywordSpotter(features=32, hidden=32, keywords=48)
    handle = compress_(model, Prune(compression=5, heads=3, total_steps=12, prune_every=4, speed_check=False))
    assert isinstance(model.fc, FormLinear) and isinstance(model.fc.form, MaskedSparse)
    _train_spotter(model, handle, steps=12)
    summary = handle.summary()
    assert 3 <= summary["head_compression"] < 3.1 and 5 <= summary["lstm_weight_compression"] < 5.2
    assert summary["head_density"]["fc.weight"] == model.fc.form.density()
    fresh = restore_(KeywordSpotter(features=32, hidden=32, keywords=48), compressed_config(model))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_heads_that_cannot_be_pruned_alone_are_refused_before_any_change():
    from tests.user_models import KeywordSpotter

    with pytest.raises(ValueError, match="heads must be 0"):
        Prune(heads=0.5)
    model = nn.Sequential(nn.Embedding(20, 8), nn.LSTM(8, 8), nn.Linear(8, 20))
    model[2].weight = model[0].weight                                       # a decoder tied to the embedding
    with pytest.raises(ValueError, match=r"2.weight is shared with 0.weight \(tied weights\)"):
        compress_(model, Prune(compression=4, heads=2, total_steps=10))
    assert isinstance(model[1], nn.LSTM) and isinstance(model[2], nn.Linear)   # nothing changed
    with pytest.raises(ValueError, match="has no nn.Linear outside its LSTMs"):
        compress_(nn.Sequential(nn.LSTM(8, 8)), Prune(compression=4, heads=2, total_steps=10))
    spotter = KeywordSpotter(features=6, hidden=16, keywords=4)
    with pytest.raises(ValueError, match="fc.weight .* cannot reach 400x"):
        compress_(spotter, Prune(compression=4, heads=400, total_steps=10))


def test_lowrank_heads_are_factorised_within_their_budget_trained_and_restored():
    from leanlstm.compress import compressed_config, restore_
    from leanlstm.methods.pruning import lowrank_rank
    from leanlstm.nn import FormLinear
    from leanlstm.nn.forms import LowRank
    from tests.user_models import KeywordSpotter

    torch.manual_seed(0)
    model = KeywordSpotter(features=32, hidden=32, keywords=48)
    dense = model.fc.weight.detach().clone()
    handle = compress_(model, Prune(compression=5, heads=3, head_form="lowrank", value_bits=8, total_steps=8,
                                    prune_every=4, speed_check=False))
    form = model.fc.form
    rank = lowrank_rank("fc.weight", 48, 32, 3, value_bits=8)
    assert isinstance(model.fc, FormLinear) and isinstance(form, LowRank) and form.rank == rank
    u, s, vh = torch.linalg.svd(dense.double())                          # the truncated SVD of the trained head
    torch.testing.assert_close(form.materialize().double(), (u[:, :rank] * s[:rank]) @ vh[:rank], atol=1e-5, rtol=0)
    budget = 48 * 32 * 4 / 3
    form.set_value_bits(8)
    assert form.nbytes() <= budget
    bigger = LowRank(48, 32, rank + 1)
    bigger.set_value_bits(8)
    assert bigger.nbytes() > budget                                      # the largest rank that fits
    form.set_value_bits(32)
    before = form.left.detach().clone()
    _train_spotter(model, handle, steps=8)
    assert not torch.equal(form.left, before) and model.fc.form is form   # trained, never pruned or replaced
    summary = handle.summary()
    assert summary["head_rank"] == {"fc.weight": rank} and summary["head_density"] == {}
    fresh = restore_(KeywordSpotter(features=32, hidden=32, keywords=48), compressed_config(model))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="head_form must be used with heads=N"):
        Prune(head_form="lowrank")
    with pytest.raises(ValueError, match=r"fc.weight \(48x32\) cannot reach 400x as a low-rank product"):
        compress_(KeywordSpotter(features=32, hidden=32, keywords=48),
                  Prune(compression=4, heads=400, head_form="lowrank", total_steps=10))


def test_a_run_with_a_lowrank_decoder_runs_in_int8_close_to_pytorch(tmp_path, ptb_slice_dir):
    from leanlstm.methods.pruning import lowrank_rank
    from leanlstm.nn.forms import LowRank
    from leanlstm.runs import load_run
    from leanlstm.runtime import compile as compile_model
    from leanlstm.runtime.onnx import to_onnx

    run = RunConfig(preset="tiny", method="prune", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 1, "max_batches": 4}, finetune_overrides={"epochs": 1},
                    method_config={"compression": 4.0, "heads": 5.0, "head_form": "lowrank", "prune_every": 2,
                                   "speed_check": False})
    metrics = compress_run(run, tmp_path / "lowrank", progress=False)
    model = load_run(tmp_path / "lowrank")[1].eval()
    vocab, width = model.decoder.out_features, model.decoder.in_features
    assert isinstance(model.decoder.form, LowRank) and (vocab, width) == (10000, 32)     # the tiny preset's
    assert metrics["head_rank"] == {"decoder.weight": lowrank_rank("decoder.weight", vocab, width, 5.0)}
    assert 5.0 <= metrics["head_compression"] < 5.5
    tokens = torch.randint(0, 10000, (12, 1))
    with torch.no_grad():
        expected = model(tokens)[0][:, 0].numpy()                           # (T, V) logits
    scale = np.abs(expected).max()
    for precision, tolerance in (("float32", 1e-5), ("int8", 0.05)):
        got, _ = compile_model(model, precision=precision).run(tokens[:, 0].numpy())
        assert np.abs(got - expected).max() <= tolerance * scale, precision
    session = onnxruntime.InferenceSession(to_onnx(model, state_inputs=False).SerializeToString())
    logits = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
    assert np.abs(logits.reshape(expected.shape) - expected).max() <= 1e-5 * scale


def test_a_run_with_pruned_heads_counts_what_they_store(tmp_path, ptb_slice_dir):
    run = RunConfig(preset="tiny", method="prune", data_dir=str(ptb_slice_dir), verify_data=False,
                    overrides={"epochs": 1, "max_batches": 6}, finetune_overrides={"epochs": 1},
                    method_config={"compression": 4.0, "heads": 5.0, "prune_every": 2, "speed_check": False})
    metrics = compress_run(run, tmp_path / "heads", progress=False)
    assert 5.0 <= metrics["head_compression"] < 5.05
    decoder = next(iter(metrics["head_density"]))
    vocab, width = 10000, 32                                    # the tiny preset's decoder
    embedding_and_bias = vocab * width + vocab
    stored_decoder = metrics["total_params"] - metrics["lstm_params"] - embedding_and_bias
    assert decoder == "decoder.weight" and stored_decoder * 5.0 == pytest.approx(vocab * width, rel=0.01)


def test_a_head_slower_pruned_than_dense_is_kept_dense_when_asked(monkeypatch):
    from leanlstm.nn import FormLinear
    from leanlstm.nn.forms import Dense
    from leanlstm.runtime import speed_check
    from tests.user_models import KeywordSpotter

    def slow_heads(forms, warn=True, **_):           # the timing itself is speed_check's own test
        return [speed_check.SlowDown(name, type(form).__name__, 2.0, 5.0, 1.0, "leanlstm") for name, form in forms
                if name == "fc.weight"]

    monkeypatch.setattr(speed_check, "check_forms", slow_heads)
    model = KeywordSpotter(features=32, hidden=32, keywords=48)
    handle = compress_(model, Prune(compression=4, heads=3, total_steps=4, keep_slow_dense=True))
    assert isinstance(model.fc, nn.Linear) and handle.method.kept_dense == {"fc.weight"}     # never converted
    fresh = KeywordSpotter(features=32, hidden=32, keywords=48)
    handle = compress_(fresh, Prune(compression=4, heads=3, total_steps=4))               # planned: only warned
    assert isinstance(fresh.fc, FormLinear)
    handle.config.keep_slow_dense = True
    handle.finalize()                                  # the final guard makes it dense, the same matrix
    assert isinstance(fresh.fc.form, Dense) and "fc.weight" in handle.method.kept_dense


def test_a_checkpoint_whose_model_config_lacks_the_decoder_loads_from_the_handles_structure(tmp_path):
    from leanlstm.runs import _model_from
    from leanlstm.tasks.lm import LMConfig, WordLM
    from leanlstm.tasks.ptb import LanguageModelTask

    torch.manual_seed(2)
    model = WordLM(LMConfig(vocab_size=50, embed_size=8, hidden_sizes=[8]))
    handle = compress_(model, Prune(compression=2, heads=2, total_steps=4, speed_check=False))
    config = model.model_config()
    del config["decoder"]                           # a model config that records only the LSTM (an older format)
    payload = {"model_config": config, "model_state": model.state_dict(), "callbacks": [handle.state_dict()]}
    loaded = _model_from(LanguageModelTask, payload, tmp_path / "checkpoint.pt")
    tokens = torch.randint(0, 50, (4, 1))
    assert torch.equal(loaded.eval()(tokens)[0], model.eval()(tokens)[0])


def test_pruning_converts_blocks_of_another_shape_and_keeps_its_own():
    from leanlstm.nn.forms import BlockSparse

    model = nn.Sequential(nn.LSTM(64, 128))
    first = compress_(model, Prune(compression=4, block="8x4", total_steps=4, speed_check=False))
    first.finalize()
    assert {(f.block_rows, f.block_cols) for _, f in first.forms()} == {(8, 4)}
    again = compress_(model, Prune(compression=8, block="16x4", total_steps=4, speed_check=False))
    assert {(f.block_rows, f.block_cols) for _, f in again.forms()} == {(16, 4)}   # rebuilt: the budget counts 16x4
    kept = {name: form for name, form in again.forms()}
    again.finalize()
    same = compress_(model, Prune(compression=8, block="16x4", total_steps=4, speed_check=False))
    assert all(form is kept[name] and isinstance(form, BlockSparse) for name, form in same.forms())
