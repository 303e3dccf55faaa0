"""ADMM joint pruning and int8 quantisation (``leanlstm.ADMM``): the projection, the penalty and the Z/U updates
checked by hand, the budget met in honest int8 CSR bytes, masked retraining on the grid, exact resume, bad input,
and the command line."""
import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from leanlstm.cli import main
from leanlstm.compress import compress_
from leanlstm.methods import ADMM
from leanlstm.methods.admm import project, top_mask
from leanlstm.methods.pruning import final_entries, weight_compression
from leanlstm.nn.forms import BlockSparse, MaskedSparse
from leanlstm.nn.forms.blocksparse import block_norms, expand_blocks
from leanlstm.nn.quant import quantise_tensor, row_scales
from tests.user_models import train_steps


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(64, 64, 2, batch_first=True)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def batch(step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 6, 64, generator=generator)
    return x, (x[:, :, :3].sum(1)).argmax(-1)


def train(model, handle, optimizer, steps, start=0):
    train_steps(model, handle, optimizer, steps, start, batch=batch)


def test_projection_keeps_the_largest_magnitudes_on_their_rows_int8_grid():
    values = torch.randn(20, 30)
    z = project(values, 50)
    mask = z != 0
    assert int(mask.sum()) == 50
    assert values.abs()[mask].min() >= values.abs()[~mask].max()
    torch.testing.assert_close(z, quantise_tensor(values, mask))
    assert row_scales(z, mask).flatten()[mask.any(1)].mul(127).sub(z.abs().amax(1)[mask.any(1)]).abs().max() < 1e-5


def test_penalty_and_z_u_updates_follow_the_admm_equations():
    torch.manual_seed(0)
    model = Classifier()
    handle = compress_(model, ADMM(compression=8, rho=0.01, rho_growth=2.0, update_every=3, total_steps=30,
                                   speed_check=False))
    method = handle.method
    forms = dict(handle.forms())
    assert all(isinstance(form, MaskedSparse) and form.density() == 1.0 for form in forms.values())
    expected = 0.01 / 2 * sum((f.weight - method.z[n] + method.u[n]).square().sum() for n, f in forms.items())
    torch.testing.assert_close(handle.penalty(), expected)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, handle, optimizer, 2)
    u_before = {n: u.clone() for n, u in method.u.items()}
    train(model, handle, optimizer, 1, start=2)                       # step 3: the first Z/U update
    for name, form in forms.items():
        w = form.weight.detach()
        entries = final_entries(name, _int8_shape(form), 8)
        z = project(w + u_before[name], entries)
        torch.testing.assert_close(method.z[name], z)
        torch.testing.assert_close(method.u[name], u_before[name] + w - z)
    assert method.rho == pytest.approx(0.02)


def progressive(**options):
    """ADMM to 8x with the target tightening until step 20 of 40, a Z/U update every 5 steps, float values (no entry
    rounds to zero): ``(model, handle, name, form, optimizer)`` with the first matrix's name and form."""
    torch.manual_seed(0)
    model = Classifier()
    handle = compress_(model, ADMM(compression=8, anneal_end=0.5, update_every=5, total_steps=40, quantise=False,
                                   speed_check=False, **options))
    name, form = next(iter(handle.forms()))
    return model, handle, name, form, torch.optim.SGD(model.parameters(), lr=0.05)


def test_progressive_target_tightens_z_on_the_gradual_pruning_schedule():
    model, handle, name, form, optimizer = progressive()
    method = handle.method
    final = final_entries(name, form, 8)
    counts = [int((method.z[name] != 0).sum())]                       # Z at step 0: the whole matrix
    for start in range(0, 40, 5):
        train(model, handle, optimizer, 5, start=start)
        counts.append(int((method.z[name] != 0).sum()))
    assert counts[0] == form.weight.numel()
    assert counts == sorted(counts, reverse=True) and len(set(counts[:5])) == 5   # falls at every update ...
    assert counts[4:] == [final] * 5                                   # ... and holds the final count from step 20


@pytest.mark.parametrize("accumulate", [True, False])
def test_dual_accumulates_while_tightening_only_when_asked(accumulate):
    model, handle, name, form, optimizer = progressive(dual_while_tightening=accumulate)
    method = handle.method
    final = final_entries(name, form, 8)
    for start in range(0, 15, 5):                                    # updates at steps 5-15: the target tightens
        train(model, handle, optimizer, 5, start=start)
        assert int((method.z[name] != 0).sum()) > final
        assert bool(method.u[name].any()) == accumulate
    u_before = method.u[name].clone()
    train(model, handle, optimizer, 5, start=15)                     # step 20: the final target, the ADMM update
    w = form.weight.detach()
    z = project(w + u_before, final, quantise=False)
    torch.testing.assert_close(method.z[name], z)
    torch.testing.assert_close(method.u[name], u_before + w - z)
    assert method.u[name].any()


def test_masked_steps_hard_prune_to_the_previous_projections_support():
    model, handle, name, form, optimizer = progressive(masked_steps=True)
    method = handle.method
    nnz = [int(form.mask.sum())]
    for start in range(0, 40, 5):
        support = method.support[name].clone()                        # what the coming update prunes to
        before = form.mask.clone()
        train(model, handle, optimizer, 5, start=start)
        torch.testing.assert_close(form.mask, before & support)
        assert not form.weight[~form.mask].any() and not method.u[name][~form.mask].any()
        assert not method.z[name][~form.mask].any()                   # Z is chosen within the mask
        nnz.append(int(form.mask.sum()))
    assert nnz == sorted(nnz, reverse=True) and nnz[-1] < nnz[0]
    handle.finalize()
    assert weight_compression(handle.forms()) >= 8.0

def _int8_shape(form):
    shape = MaskedSparse(form.out_features, form.in_features)
    shape.set_value_bits(8)
    return shape


def test_the_block_projection_keeps_the_whole_blocks_of_largest_norm():
    values = torch.randn(32, 16)
    mask = top_mask(values, 4 * 64 + 10, (16, 4))               # the entries of 4 blocks (and a remainder)
    blocks = block_norms(values, 16, 4)
    chosen = mask.reshape(2, 16, 4, 4).any(3).any(1)             # (block rows, block cols)
    assert int(chosen.sum()) == 4 and int(mask.sum()) == 4 * 64
    assert torch.equal(mask, expand_blocks(chosen, 32, 16, 16, 4))                    # whole blocks only
    assert blocks[chosen].min() >= blocks[~chosen].max()


def test_the_4_bit_projection_snaps_kept_blocks_to_seven_levels_a_side():
    values = torch.randn(32, 16)
    z = project(values, 2 * 64, block=(16, 4), bits=4)
    mask = top_mask(values, 2 * 64, (16, 4))
    assert int(mask.sum()) == 2 * 64 and z[~mask].abs().max() == 0
    torch.testing.assert_close(z, quantise_tensor(values, mask, bits=4))
    kept_rows = mask.any(1)
    steps = z[kept_rows] / z[kept_rows].abs().amax(1, keepdim=True) * 7      # integers in [-7, 7]
    torch.testing.assert_close(steps, steps.round())
    assert steps.abs().max() == 7


@pytest.mark.parametrize("block,bits", [("", 8), ("16x4", 8), ("16x4", 4)])
def test_training_meets_the_int8_byte_budget_and_retrains_on_the_grid_with_frozen_masks(block, bits):
    torch.manual_seed(0)
    model = Classifier()
    handle = compress_(model, ADMM(compression=12, rho=0.05, total_steps=60, speed_check=False, block=block,
                                   bits=bits))
    assert all(type(form) is (BlockSparse if block else MaskedSparse) for _, form in handle.forms())
    train(model, handle, torch.optim.SGD(model.parameters(), lr=0.5), 60)
    gaps = [float((f.weight - handle.method.z[n]).norm() / f.weight.norm()) for n, f in handle.forms()]
    assert max(gaps) < 0.1                                           # W was pulled onto its projection
    handle.finalize()
    assert weight_compression(handle.forms()) >= 12.0
    masks = {name: form.mask.clone() for name, form in handle.forms()}
    train(model, handle, torch.optim.Adam(model.parameters(), lr=3e-3), 20, start=60)
    for name, form in handle.forms():
        assert form.value_bits == bits and torch.equal(form.mask, masks[name])
        w = form.weight.detach()
        assert w[~form.mask].abs().max() == 0
        torch.testing.assert_close(w, quantise_tensor(w, form.mask, bits=bits))   # still on the grid
        if block:
            assert torch.equal(form.mask, form.covering_mask(form.mask))   # whole 16x4 blocks
    summary = handle.summary()
    assert summary["value_bits"] == bits and summary["lstm_weight_compression"] >= 12.0
    if bits == 4:        # at the same bytes 4-bit values keep about twice the blocks of int8 ones
        int8_blocks = sum(final_entries(n, BlockSparse(f.out_features, f.in_features), 12, 8)
                          for n, f in handle.forms())
        assert sum(int(f.mask.sum()) for _, f in handle.forms()) > 1.8 * int8_blocks


CONFIGS = {"fixed": {}, "progressive": {"anneal_end": 0.5, "masked_steps": True, "dual_while_tightening": False},
           "blocks": {"block": "16x4", "anneal_end": 0.5, "masked_steps": True}}


@pytest.mark.parametrize("variant", CONFIGS)
@pytest.mark.parametrize("stop", [7, 25], ids=["mid-admm", "mid-retraining"])
def test_resume_equals_no_interruption(stop, variant):
    def config():
        return ADMM(compression=6, update_every=4, total_steps=16, speed_check=False, **CONFIGS[variant])

    def start():
        torch.manual_seed(0)
        model = Classifier()
        handle = compress_(model, config())
        return model, handle, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def run(model, handle, optimizer, begin, end):
        for step in range(begin, end):
            if step == 16:
                handle.finalize()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            train(model, handle, optimizer, 1, start=step)
        return optimizer

    model, handle, optimizer = start()
    run(model, handle, optimizer, 0, 30)
    first, first_handle, first_optimizer = start()
    first_optimizer = run(first, first_handle, first_optimizer, 0, stop)
    saved = copy.deepcopy({"handle": first_handle.state_dict(), "model": first.state_dict(),
                           "optimizer": first_optimizer.state_dict()})
    torch.manual_seed(9)
    resumed = Classifier()
    resumed_handle = compress_(resumed, config())
    resumed_handle.load_state_dict(saved["handle"])
    resumed.load_state_dict(saved["model"])
    lr = 0.1 if stop < 16 else 0.05
    optimizer = torch.optim.SGD(resumed.parameters(), lr=lr, **({"momentum": 0.9} if stop < 16 else {}))
    optimizer.load_state_dict(saved["optimizer"])
    run(resumed, resumed_handle, optimizer, stop, 30)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bad_input_is_refused_before_any_change():
    model = nn.Sequential(nn.LSTM(4, 8))
    with pytest.raises(ValueError, match="cannot reach 500x"):
        compress_(model, ADMM(compression=500))
    assert isinstance(model[0], nn.LSTM)
    with pytest.raises(ValueError, match="rho must lie in"):
        ADMM(rho=0)
    with pytest.raises(ValueError, match="clip must be one of"):
        ADMM(clip="l1")
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        ADMM(block="16by4")
    with pytest.raises(ValueError, match="block=16x4"):
        ADMM(bits=4)                                   # 4-bit values: block-sparse forms only
    with pytest.raises(ValueError, match="bits must be one of"):
        ADMM(bits=2, block="16x4")
    handle = compress_(nn.Sequential(nn.LSTM(32, 32)), ADMM(compression=4))
    with pytest.raises(ValueError, match="total_steps=N"):
        handle.after_step()


def test_cli_admm_on_a_ptb_slice(tmp_path, ptb_slice_dir):
    runner = CliRunner()
    common = ["--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress"]
    args = ["compress", "--method", "admm", "--preset", "tiny", "--set", "compression=10", "--epochs", "1",
            "--max-batches", "20", "--finetune-epochs", "1", "--latency-repeats", "0", "--out", str(tmp_path / "a")]
    result = runner.invoke(main, args + common)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["lstm_weight_compression"] >= 10 and metrics["value_bits"] == 8
    assert metrics["final_rho"] > ADMM().rho
