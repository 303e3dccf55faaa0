"""TensorBoard logging of training and compression runs (``--tensorboard``): the scalars written equal the run's."""
import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from leanlstm.cli import main
from leanlstm.runs import RunConfig, train_run
from leanlstm.tensorboard import TensorBoard

COMMON = ["--preset", "tiny", "--no-verify-data", "--max-items", "2000", "--no-progress"]


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_run_logs_its_epochs_and_every_nth_step(tmp_path, ptb_slice_dir):
    run = RunConfig(preset="tiny", data_dir=str(ptb_slice_dir), verify_data=False, max_tokens=4000,
                    overrides={"epochs": 2, "max_batches": 6})
    board = TensorBoard(every=2)
    metrics = train_run(run, tmp_path / "run", progress=False, callbacks=[board])
    board.close()
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    history = metrics["history"]
    assert [v for _, v in scalars["val/ppl"]] == pytest.approx([h["val_ppl"] for h in history])
    assert [v for _, v in scalars["train/ppl"]] == pytest.approx([h["train_ppl"] for h in history])
    assert [v for _, v in scalars["lr"]] == [h["lr"] for h in history] == [1.0, 0.5]
    assert scalars["epoch"] == [(6, 1.0), (12, 2.0)]                  # at the step count each epoch ended on
    assert [s for s, _ in scalars["step/train_loss"]] == [2, 4, 6, 8, 10, 12]
    # each epoch's training loss is the mean of its batches' losses; the logged ones are among them
    assert all(3 < v < 12 for _, v in scalars["step/train_loss"])
    assert scalars["model/lstm_params"][-1][1] == metrics["lstm_params"]
    assert scalars["model/lstm_compression"][-1][1] == 1.0
    assert [v for _, v in scalars["model/hidden_size/layer0"]] == [32.0, 32.0]


def test_compress_logs_both_phases_on_one_step_axis(tmp_path, ptb_slice_dir):
    runner, base, out = CliRunner(), tmp_path / "base", tmp_path / "prune"
    trained = runner.invoke(main, ["train", *COMMON, "--data-dir", str(ptb_slice_dir), "--epochs", "1",
                                   "--max-batches", "3", "--out", str(base)])
    assert trained.exit_code == 0, trained.output
    assert not (base / "tensorboard").exists()                       # only when asked for
    result = runner.invoke(main, ["compress", "--method", "prune", "--from", str(base), "--set", "compression=4",
                                  "--epochs", "2", "--finetune-epochs", "1", "--max-batches", "4",
                                  "--latency-repeats", "0", "--tensorboard", "--out", str(out), *COMMON])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    scalars = _scalars(out / "tensorboard")
    assert scalars["epoch"] == [(4, 1.0), (8, 2.0), (12, 3.0)]       # fine-tuning's steps follow compression's
    assert [v for _, v in scalars["val/ppl"]] == pytest.approx([h["val_ppl"] for h in metrics["history"]])
    compression = [v for _, v in scalars["model/lstm_compression"]]
    assert compression[0] < compression[-1] == pytest.approx(metrics["lstm_compression"], rel=1e-6)


def test_steps_continue_across_phases_and_resumes():
    class Fake(SimpleNamespace):
        pass

    board = TensorBoard("/nonexistent", every=1)
    board.writer = SimpleNamespace(add_scalar=lambda *a: None, flush=lambda: None)   # nothing written here
    trainer = Fake(phase="compress", step=0, task=SimpleNamespace(), history=[], last_loss=None,
                   model=torch.nn.Linear(2, 2), optimizer=SimpleNamespace(param_groups=[{"lr": 1.0}]))
    board.on_train_begin(trainer)
    trainer.step = 7
    board.after_step(trainer)
    saved = board.state_dict()               # the checkpoint written as fine-tuning opens
    resumed = TensorBoard("/nonexistent")
    resumed.load_state_dict(saved)
    resumed.writer = board.writer
    finetune = Fake(phase="finetune", step=0, task=SimpleNamespace(), history=[], last_loss=None,
                    model=trainer.model, optimizer=trainer.optimizer)
    resumed.on_train_begin(finetune)
    finetune.step = 3
    resumed.after_step(finetune)
    assert resumed.global_step == 10
    with pytest.raises(ValueError, match="every must be at least 1"):
        TensorBoard(every=0)


def test_docstring_examples():
    import doctest

    import leanlstm.tensorboard

    result = doctest.testmod(leanlstm.tensorboard, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
