"""Structured dropout (issue 26): compacted products equal the dense masked ones, masks shared by the batch and
new at every step, edge rates, autocast, compressed forms, and masks that a resumed run draws again."""
import doctest
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import leanlstm.nn.structured_dropout as sd
from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.nn import LSTM
from leanlstm.nn.structured_dropout import draw_masks, lstm_with_input_gates, structured_linear, structured_lstm
from leanlstm.runs import RunConfig, RunDirError, load_run, train_run
from leanlstm.tasks.lm import LMConfig, WordLM
from tests.test_train import StopAfter


def dense_masked(x, weight, masks, p, steps_per_mask=1):
    full = masks.repeat_interleave(steps_per_mask, 0)[:x.shape[0]].to(x.dtype)   # (T, in)
    return (x * full.unsqueeze(1) / (1 - p)) @ weight.t()


@pytest.mark.parametrize("dense_weight_grad_rows", [0, 10**6])    # dW compacted per mask / one dense GEMM
@pytest.mark.parametrize("steps_per_mask", [1, 3])
def test_compacted_products_and_gradients_equal_the_dense_masked_ones(steps_per_mask, dense_weight_grad_rows,
                                                                      monkeypatch):
    monkeypatch.setattr(sd, "DENSE_WEIGHT_GRAD_ROWS", dense_weight_grad_rows)
    x = torch.randn(7, 4, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    masks = draw_masks(7, 9, 0.4, steps_per_mask)
    assert masks.shape == (-(-7 // steps_per_mask), 9)
    dy = torch.randn(7, 4, 5, dtype=torch.float64)
    grads = []
    for product in (structured_linear, dense_masked):
        y = product(x, weight, masks, 0.4, steps_per_mask)
        grads.append((y, *torch.autograd.grad(y, (x, weight), dy)))
    for compact, dense in zip(*grads):
        torch.testing.assert_close(compact, dense, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, w: structured_linear(a, w, masks, 0.4, steps_per_mask), (x, weight))


def test_masks_are_shared_by_the_batch_and_new_at_every_step():
    x = torch.randn(12, 6, 50, requires_grad=True)
    y = structured_linear(x, torch.eye(50), draw_masks(12, 50, 0.5), 0.5)    # y_t = x_t * m_t / (1 - p)
    dropped = y == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))            # same units for every sequence
    assert len({tuple(row) for row in dropped[:, 0].tolist()}) == 12           # a new pattern at every step
    assert 0.3 < dropped.float().mean() < 0.7
    torch.testing.assert_close(y[~dropped], 2 * x[~dropped])                   # kept units scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)                                   # no gradient through dropped units


def test_p_zero_is_no_mask_and_an_all_dropped_step_gives_zeros():
    x, weight = torch.randn(5, 3, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    every = draw_masks(5, 8, 0.0)
    assert every.all()
    torch.testing.assert_close(structured_linear(x, weight, every, 0.0), x @ weight.t())
    masks = every.clone()
    masks[2] = False                                                           # step 2 drops every unit
    y = structured_linear(x, weight, masks, 0.999)
    assert torch.equal(y[2], torch.zeros(3, 4))
    y.sum().backward()
    assert torch.equal(x.grad[2], torch.zeros(3, 8))
    torch.manual_seed(0)
    assert (~draw_masks(200, 8, 0.999)).all(1).sum() > 150                     # p near 1: most steps drop all
    with pytest.raises(ValueError, match=r"p in \[0, 1\)"):
        draw_masks(5, 8, 1.0)


def test_the_recurrence_from_precomputed_input_gates_is_the_lstm():
    lstm = LSTM(6, [5, 7]).double()
    x = torch.randn(9, 3, 6, dtype=torch.float64, requires_grad=True)
    h0 = [torch.randn(1, 3, size, dtype=torch.float64) for size in (5, 7)]
    c0 = [torch.randn(1, 3, size, dtype=torch.float64) for size in (5, 7)]
    out, (h, c) = lstm(x, (h0, c0))
    mine, h2, c2 = structured_lstm(lstm, x, h0, c0, 0.0)                        # p = 0: only the path differs
    for a, b in zip([out, *h, *c], [mine, *h2, *c2]):
        torch.testing.assert_close(a, b)
    xg = torch.randn(4, 2, 12, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w_hh = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lstm_with_input_gates, (xg, *state, w_hh))


def _models(mode="structured"):
    config = LMConfig(vocab_size=50, embed_size=16, hidden_sizes=[12, 12], dropout=0.5)
    torch.manual_seed(0)
    standard = WordLM(config)
    torch.manual_seed(0)
    return standard, WordLM(replace(config, dropout_mode=mode))


@pytest.mark.parametrize("mode", ["structured", "structured-window", "structured-hybrid"])
def test_word_lm_trains_with_structured_dropout_and_evaluates_as_standard(mode):
    standard, structured = _models(mode)
    tokens = torch.randint(0, 50, (10, 4))
    _, loss, state = structured(tokens, None, tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.abs().sum() > 0
                                        for p in structured.parameters())
    assert [tuple(t.shape) for t in state[0]] == [(1, 4, 12), (1, 4, 12)]
    standard.eval(), structured.eval()
    torch.testing.assert_close(standard(tokens)[0], structured(tokens)[0])     # eval: no dropout, same function
    structured.train()
    structured.set_dropout(0.0)                                                # no dropout: the standard path
    standard.train()
    standard.set_dropout(0.0)
    torch.testing.assert_close(standard(tokens)[0], structured(tokens)[0])
    with pytest.raises(ValueError, match="dropout_mode"):
        LMConfig(dropout_mode="blocky")
    assert WordLM.from_model_config(structured.model_config()).config.dropout_mode == mode
    with pytest.raises(ValueError, match="unidirectional stacks of LSTM cells"):
        WordLM(LMConfig(vocab_size=50, embed_size=16, hidden_sizes=[12, 12], dropout=0.5, cell="hlstm",
                        cell_options={"gate_hidden": 4}, dropout_mode="structured"))


def test_compressed_forms_and_bfloat16_autocast_train_through_the_structured_path():
    _, model = _models()
    model.lstm.replace_forms("lowrank", rank=3, speed_check=False)
    tokens = torch.randint(0, 50, (8, 4))
    torch.manual_seed(1)
    _, full, _ = model(tokens, None, tokens)
    full.backward()
    form = model.lstm.layers[0].weight_ih
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in form.parameters())
    model.zero_grad()
    torch.manual_seed(1)                                                        # the same masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, half, _ = model(tokens, None, tokens)
    assert logits.dtype == torch.bfloat16
    half.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(half.item() - full.item()) < 0.05 * full.item()


def test_a_resumed_run_draws_the_same_masks(tmp_path, ptb_slice_dir):
    def run():
        return RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False, dropout=0.5,
                         dropout_mode="structured", overrides={"epochs": 3, "max_batches": 6})
    straight = train_run(run(), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(run(), tmp_path / "resumed", progress=False, callbacks=[StopAfter(2)])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    resumed = train_run(run(), tmp_path / "resumed", resume=True, progress=False)
    assert [h["train_ppl"] for h in resumed["history"]] == [h["train_ppl"] for h in straight["history"]]
    assert resumed["test_ppl"] == straight["test_ppl"]
    model = load_run(tmp_path / "resumed")[1]
    assert model.config.dropout_mode == "structured"
    other = train_run(replace(run(), dropout_mode="standard"), tmp_path / "standard", progress=False)
    assert other["history"][0]["train_ppl"] != straight["history"][0]["train_ppl"]   # the mode really changed


def test_the_window_mode_drops_the_same_units_at_every_step_of_a_window(monkeypatch):
    seen = []
    monkeypatch.setattr(sd, "draw_masks", lambda *args, **kwargs: seen.append(args) or draw_masks(*args, **kwargs))
    _, model = _models("structured-window")
    model(torch.randint(0, 50, (9, 4)), None)
    assert [(steps, group) for steps, _, _, group in seen] == [(9, 9)] * 3       # one mask per site, whole window


@pytest.mark.parametrize("steps_per_mask", [1, 3])
def test_the_hybrid_mode_keeps_the_window_at_the_stack_and_redraws_the_head(steps_per_mask, monkeypatch):
    seen = []
    monkeypatch.setattr(sd, "draw_masks", lambda *args, **kwargs: seen.append(args) or draw_masks(*args, **kwargs))
    _, model = _models("structured-hybrid")
    model.config = replace(model.config, dropout_steps_per_mask=steps_per_mask)
    model(torch.randint(0, 50, (9, 4)), None)
    assert [(steps, group) for steps, _, _, group in seen] == [(9, 9), (9, 9), (9, steps_per_mask)]


@pytest.mark.parametrize("way", ["compact", "masked"])
@pytest.mark.parametrize("steps_per_mask", [1, 4])
def test_the_grouped_head_product_equals_the_dense_masked_one_either_way(way, steps_per_mask, monkeypatch):
    monkeypatch.setattr(sd, "WINDOW_PRODUCT", way)
    x = torch.randn(7, 3, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    masks = draw_masks(7, 9, 0.4, steps_per_mask)
    dy = torch.randn(7, 3, 5, dtype=torch.float64)
    grads = []
    for product in (sd.grouped_linear, dense_masked):
        y = product(x, weight, masks, 0.4, steps_per_mask)
        grads.append((y, *torch.autograd.grad(y, (x, weight), dy)))
    for mine, dense in zip(*grads):
        torch.testing.assert_close(mine, dense, rtol=1e-12, atol=1e-12)


def test_a_run_names_the_modes_when_given_an_unknown_one():
    with pytest.raises(RunDirError, match="standard, structured, structured-window, structured-hybrid, got 'blocky'"):
        RunConfig(preset="tiny", dropout_mode="blocky").model_config()
    config = RunConfig(preset="tiny", dropout_mode="structured/4").model_config()
    assert (config.dropout_mode, config.dropout_steps_per_mask) == ("structured", 4)


def test_both_commands_take_the_mode_and_the_run_records_it(tmp_path, ptb_slice_dir):
    common = ["--preset", "tiny", "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--max-items", "2000",
              "--epochs", "1", "--max-batches", "2", "--no-progress"]
    runner, base, out = CliRunner(), tmp_path / "base", tmp_path / "prune"
    trained = runner.invoke(main, ["train", *common, "--dropout-mode", "structured-window", "--out", str(base)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(main, ["compress", "--method", "prune", "--from", str(base), "--set", "compression=2",
                                  "--dropout-mode", "structured-hybrid/3", "--finetune-epochs", "0",
                                  "--latency-repeats", "0", "--out", str(out), *common])
    assert result.exit_code == 0, result.output
    assert load_run(base)[1].config.dropout_mode == "structured-window"
    config = load_run(out)[1].config
    assert (config.dropout_mode, config.dropout_steps_per_mask) == ("structured-hybrid", 3)
    for wrong, says in (("blocky", "structured-window"), ("structured-window/3", "only structured and"),
                        ("structured/0", "whole number >= 1")):
        refused = runner.invoke(main, ["train", *common, "--dropout-mode", wrong, "--out", str(tmp_path / "no")])
        assert refused.exit_code != 0 and says in refused.output, refused.output
        assert not (tmp_path / "no").exists()


def test_docstring_examples():
    result = doctest.testmod(sd, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _masked_stack(lstm, x, h0, c0, masks, p):
    """The reference: every layer's input multiplied by its window mask, then the plain layer."""
    for layer, h, c, mask in zip(lstm.layers, h0, c0, masks):
        x, _, _ = layer(x * mask.to(x.dtype) / (1 - p), h, c)
    return x


@pytest.mark.parametrize("way", ["compact", "masked", None])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_one_mask_per_window_runs_the_fused_kernel_on_the_kept_inputs(p, way, monkeypatch):
    monkeypatch.setattr(sd, "WINDOW_PRODUCT", way)          # None: the timed choice
    lstm = LSTM(6, [5, 5]).double().train()
    x = torch.randn(7, 3, 6, dtype=torch.float64, requires_grad=True)
    h0 = [torch.randn(1, 3, 5, dtype=torch.float64) for _ in range(2)]
    c0 = [torch.randn(1, 3, 5, dtype=torch.float64) for _ in range(2)]
    torch.manual_seed(1)
    out, h, c = structured_lstm(lstm, x, h0, c0, p, steps_per_mask=7)
    assert [tuple(t.shape) for t in h + c] == [(1, 3, 5)] * 4
    torch.manual_seed(1)                                                       # the masks it drew, in its order
    masks = [draw_masks(7, 6, p, 7)[0], draw_masks(7, 5, p, 7)[0]]
    assert p == 0 or all(0 < int(mask.sum()) < len(mask) for mask in masks)  # some units kept, some dropped
    reference = _masked_stack(lstm, x, h0, c0, masks, p)
    torch.testing.assert_close(out, reference)
    weights = [lstm.layers[0].weight_ih.weight, *lstm.parameters()]
    mine = torch.autograd.grad(out.sum(), [x, *weights])
    theirs = torch.autograd.grad(reference.sum(), [x, *weights])
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)
    dropped = ~masks[0]
    assert torch.equal(mine[0][:, :, dropped], torch.zeros_like(mine[0][:, :, dropped]))
    assert torch.equal(mine[1][:, dropped], torch.zeros_like(mine[1][:, dropped]))   # W_ih columns of dropped units


def test_one_mask_per_window_that_drops_every_input_leaves_the_biases():
    lstm = LSTM(4, [3]).train()
    x = torch.randn(5, 2, 4, requires_grad=True)
    zeros = [torch.zeros(1, 2, 3)]
    out, _, _ = sd._window_layer(lstm.layers[0], x, zeros[0], zeros[0], torch.zeros(4, dtype=torch.bool), 0.5)
    torch.testing.assert_close(out, _masked_stack(lstm, x, zeros, zeros, [torch.zeros(4, dtype=torch.bool)], 0.5))
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.zeros_like(x))


@pytest.mark.parametrize("way", ["compact", "masked"])
@pytest.mark.parametrize("kept", [0, 3, 4, 6])       # an odd count is padded to an even width
def test_the_window_head_product_equals_the_masked_one_both_ways(way, kept, monkeypatch):
    monkeypatch.setattr(sd, "WINDOW_PRODUCT", way)
    x = torch.randn(5, 2, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[torch.randperm(6)[:kept]] = True
    mine = sd.window_linear(x, weight, mask, 0.4)
    reference = (x * mask.double() / 0.6) @ weight.t()
    torch.testing.assert_close(mine, reference)
    for a, b in zip(torch.autograd.grad(mine.sum(), [x, weight]), torch.autograd.grad(reference.sum(), [x, weight])):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a, w: sd.window_linear(a, w, mask, 0.4), (x, weight))


def test_the_window_way_is_the_faster_one_timed_once_per_shape(monkeypatch):
    monkeypatch.setattr(sd, "_WINDOW_WAYS", {})
    calls = []

    def run(way, x, weights):        # "compact" made slow on purpose: the timing must pick "masked"
        calls.append(way)
        if way == "compact":
            time.sleep(0.01)
        return x @ weights[0].t()

    x, weight = torch.randn(3, 2, 4), torch.randn(5, 4)
    assert sd._window_way("linear", run, x, [weight], 0.5) == "masked"
    assert sorted(set(calls)) == ["compact", "masked"] and len(calls) == 8        # one untimed + three each
    assert sd._window_way("linear", run, x, [weight], 0.5) == "masked" and len(calls) == 8    # cached
    sd._window_way("linear", run, torch.randn(2, 3, 4), [weight], 0.5)
    assert len(calls) == 8                                     # 6 rows: the same power of two as 3 x 2, not timed
    sd._window_way("linear", run, torch.randn(4, 2, 4), [weight], 0.5)
    assert len(calls) == 16                                                       # 8 rows: timed
    monkeypatch.setattr(sd, "WINDOW_PRODUCT", "compact")
    assert sd._window_way("linear", run, x, [weight], 0.5) == "compact"


def test_timing_the_window_ways_draws_no_random_numbers():
    x, weight = torch.randn(3, 2, 4), torch.randn(5, 4)
    state = torch.get_rng_state()
    sd._seconds(lambda way, x, weights: x @ weights[0].t(), "masked", x, [weight])
    assert torch.equal(state, torch.get_rng_state())
