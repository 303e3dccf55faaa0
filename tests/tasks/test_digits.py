"""The digits task: model shapes and config round trip, batches, a tiny training run that lowers the loss, a run
directory with test and held-out WER, streaming = whole utterance, and ``leanlstm transcribe``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from leanlstm.cli import transcribe as transcribe_command
from leanlstm.runs import RunConfig, load_run, train_run
from leanlstm.tasks import TaskError, get_task
from leanlstm.tasks import digits as D
from leanlstm.tasks import fsdd
from leanlstm.tasks.features import FeatureCache, log_mel
from tests.tasks.test_fsdd import fsdd_cache, recordings_folder, shared_archive  # noqa: F401  (fixtures)

SMALL = D.DigitsTrainConfig(batch_size=8, train_utterances=16, chunk_batches=2, norm_utterances=20,
                            eval_batch_size=16, optimizer="adam", lr=3e-3)


@pytest.fixture(scope="module")
def task(recordings_folder, tmp_path_factory) -> D.DigitsTask:
    cache = FeatureCache(tmp_path_factory.mktemp("features"))
    return D.DigitsTask(fsdd.load_recordings(recordings_folder), SMALL, cache, limit=24)


def test_registered_with_presets():
    task = get_task("digits")
    assert task is D.DigitsTask and task.metric == "wer" and not task.higher_is_better
    assert set(task.presets) == {"tiny", "digits-small", "digits-medium", "digits-hlstm"}
    assert all(p.train.optimizer == "adam" for p in task.presets.values())
    assert task.test_splits == ("test", "heldout")


def test_model_shapes_and_frame_stacking():
    model = D.DigitsCTC(D.DigitsConfig(hidden_sizes=[16, 12], stack=3))
    inputs = model.inputs(torch.zeros(50, 2, 40))
    logits, _ = model(inputs)
    assert inputs.shape == (16, 2, 120) and logits.shape == (16, 2, 11)   # 50 frames: 16 steps of 3
    assert model.lstm.input_size == 120 and not model.lstm.bidirectional
    assert model.steps(torch.tensor([50, 9, 2])).tolist() == [16, 3, 0]
    x = torch.arange(12.0).view(6, 1, 2)
    assert D.stack_frames(x, 2)[1, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    np.testing.assert_array_equal(D.stack_frames(x[:, 0].numpy(), 2), D.stack_frames(x, 2)[:, 0].numpy())
    with pytest.raises(ValueError, match="3 values for 40 mel bands"):
        D.DigitsConfig(mean=[0.0] * 3, std=[1.0] * 3)


def test_the_cell_is_part_of_the_config_and_streams():
    """The H-LSTM preset builds H-LSTM layers; the cell survives a JSON round trip, and the runtime streams it."""
    config = D.DigitsConfig(hidden_sizes=[8, 6], cell="hlstm", cell_options={"gate_hidden": 4})
    again = D.DigitsConfig(**json.loads(json.dumps(vars(config), default=vars)))
    model = D.DigitsCTC(again).eval()
    assert [layer.cell for layer in model.lstm.layers] == ["hlstm", "hlstm"] and model.lstm.layers[0].widths == (4,) * 4
    assert get_task("digits").preset("digits-hlstm").model.cell == "hlstm"
    frames = np.random.default_rng(0).standard_normal((30, 40)).astype(np.float32)
    logits = {}
    for backend in ("leanlstm", "torch"):
        stream = D.DigitsStream(model, backend, pad=0.0)
        logits[backend] = np.stack([y for y in map(stream.frame_logits, frames) if y is not None])
    assert logits["torch"].shape == (10, 11)                               # one step every 3 frames
    np.testing.assert_allclose(logits["leanlstm"], logits["torch"], atol=1e-5)


def test_batches_are_seeded_per_epoch_and_split_across_processes(task, recordings_folder):
    first, again = next(task.train_batches(1)), next(task.train_batches(1))
    assert torch.equal(first.features, again.features) and torch.equal(first.targets, again.targets)
    assert not torch.equal(next(task.train_batches(2)).targets, first.targets)
    assert first.features.shape[1:] == (8, 40) and int(first.lengths.max()) == first.features.shape[0]
    assert int(first.target_lengths.sum()) == len(first.targets) and first.targets.min() >= 1
    halves = [D.DigitsTask(fsdd.load_recordings(recordings_folder), SMALL, task.cache, 24, rank, 2)
              for rank in (0, 1)]
    parts = [next(half.train_batches(1)) for half in halves]
    assert torch.equal(torch.cat([p.targets for p in parts]), first.targets)
    assert task.num_train_batches() == 2


def test_normalisation_is_fitted_once_and_saved_in_the_config(task, recordings_folder):
    model = D.DigitsTask.build_model(D.DigitsConfig(hidden_sizes=[8]))
    assert not model.normalised
    task.forward(model, next(task.train_batches(1)), None)
    assert model.config.mean == pytest.approx(task.norm.mean)
    assert model.mean.tolist() == pytest.approx(task.norm.mean * model.config.stack)   # one copy per stacked frame
    config = json.loads(json.dumps(D.DigitsTask.model_config(model)))   # as a checkpoint stores it
    rebuilt = D.DigitsTask.model_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(10, 1, 120)
    torch.testing.assert_close(rebuilt(x)[0], model(x)[0])
    assert rebuilt.config.features == model.config.features and rebuilt.config.mean == model.config.mean
    mean = list(model.config.mean)
    other = D.DigitsTask(fsdd.load_recordings(recordings_folder), D.DigitsTrainConfig(norm_utterances=5, seed=9),
                         task.cache, limit=4)
    other.fit_normalisation(model)
    assert model.config.mean == mean                                    # a fitted model keeps its own


def test_tiny_training_lowers_the_loss(task):
    torch.manual_seed(0)
    model = D.DigitsTask.build_model(D.DigitsConfig(hidden_sizes=[32]))
    batch = next(task.train_batches(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _, reported = task.training_loss(model, batch, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(reported))
    assert losses[-1] < 0.3 * losses[0]


def test_evaluate_reports_error_rates(task):
    model = D.DigitsTask.build_model(D.DigitsConfig(hidden_sizes=[8]))
    result = task.evaluate(model, "heldout")
    assert set(result) == {"loss", "wer", "ser", "word_errors", "words"} and result["ser"] == 1.0   # all wrong
    assert result["wer"] == result["word_errors"] / result["words"]
    features, digits = task.eval_set("test")
    assert len(features) == len(digits) == 24 and all(1 <= len(d) <= 7 for d in digits)
    with pytest.raises(TaskError, match="no split 'dev'"):
        task.evaluate(model, "dev")


class _SaysSixFirst(D.DigitsCTC):
    """Blank everywhere except a confident "6" at the first step of an utterance: what a trained model may emit
    at the steps the loss leaves out (``skip_steps``), where nothing trains it."""

    def forward(self, inputs, state=None):
        logits = torch.zeros(*inputs.shape[:2], self.config.num_classes)
        logits[..., 0] = 5.0                                      # blank
        if state is None:
            logits[0, :, 7] = 10.0                                # label 7: the digit 6, at the first step only
        return logits, "started"


def test_decoders_leave_out_the_untrained_first_steps(task):
    """Evaluation, transcribe and the stream read the same steps the loss trains: no digit from the first ones."""
    model = _SaysSixFirst(D.DigitsConfig(hidden_sizes=[8], mean=[0.0] * 40, std=[1.0] * 40)).eval()
    assert model.config.skip_steps == 3 and task.evaluate(model, "valid")["wer"] == 1.0   # deletions only
    audio = np.zeros(8000, np.float32)
    assert D.transcribe(model, audio) == []
    stream = D.DigitsStream(model, "torch")
    assert stream.push(audio) + stream.finish() == [] and stream.steps > 3
    unskipped = _SaysSixFirst(D.DigitsConfig(hidden_sizes=[8], skip_steps=0, mean=[0.0] * 40, std=[1.0] * 40))
    assert D.transcribe(unskipped.eval(), audio) == [6]           # the check above can fail
    assert task.evaluate(unskipped, "valid")["wer"] < 1.0         # every transcript "6": right where a 6 is said


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fsdd_cache):
    """A finished run of the tiny preset on 24 utterances per set, through the run machinery."""
    out = tmp_path_factory.mktemp("runs") / "digits-tiny"
    patch = pytest.MonkeyPatch()
    patch.setenv("LEANLSTM_CACHE", str(fsdd_cache))
    try:
        run = RunConfig(task="digits", preset="tiny", data_dir=str(shared_archive().parents[1]), max_tokens=24)
        metrics = train_run(run, out, progress=False)
    finally:
        patch.undo()
    return out, metrics


def test_a_run_reports_test_and_held_out_wer(tiny_run):
    out, metrics = tiny_run
    assert metrics["task"] == "digits" and metrics["metric"] == "wer" and metrics["higher_is_better"] is False
    for key in ("val_wer", "test_wer", "test_ser", "heldout_wer", "heldout_ser"):
        assert 0.0 <= metrics[key] <= 10.0
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    _, model, _ = load_run(out)
    assert isinstance(model, D.DigitsCTC) and model.normalised


def test_stream_equals_whole_utterance(recordings_folder):
    torch.manual_seed(0)
    model = D.DigitsCTC(D.DigitsConfig(hidden_sizes=[24, 16], mean=[-8.0] * 40, std=[4.0] * 40)).eval()
    audio = np.concatenate([fsdd.read_wav(recordings_folder / name) for name in ("3_theo_7.wav", "8_theo_20.wav")])
    whole = model(model.inputs(torch.from_numpy(log_mel(audio))[:, None]))[0][:, 0].detach().numpy()   # (S, 11)
    for backend in ("torch", "leanlstm"):
        stream = D.DigitsStream(model, backend, pad=0.0)
        rows, rng, start = [], np.random.default_rng(0), 0
        while start < len(audio):
            size = int(rng.integers(1, 300))
            for frame in stream.features.push(audio[start:start + size]):
                logits = stream.frame_logits(frame)
                if logits is not None:
                    rows.append(logits)
            start += size
        np.testing.assert_allclose(np.array(rows), whole, atol=1e-5)
        padded = D.DigitsStream(model, backend)                         # with silence around, as transcribe
        emitted = [d for start in range(0, len(audio), 80) for d in padded.push(audio[start:start + 80])]
        emitted += padded.finish()
        assert emitted == padded.digits == D.transcribe(model, audio)


def test_transcribe_command(tiny_run, recordings_folder, tmp_path):
    out, _ = tiny_run
    wav = str(recordings_folder / "5_george_1.wav")
    (tmp_path / "notes.wav").write_text("not audio")
    runner = CliRunner()
    result = runner.invoke(transcribe_command.command, [str(out), wav])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{wav}:") and all(w.isdigit() for w in result.output.split(":", 1)[1].split())
    result = runner.invoke(transcribe_command.command, [str(out), wav, "--stream", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert "real-time factor" in result.output
    result = runner.invoke(transcribe_command.command, [str(out), str(tmp_path / "notes.wav"), wav])
    assert result.exit_code == 1
    assert "not a PCM WAV file" in result.output and f"{wav}:" in result.output
    assert "1 of 2 files could not be read" in result.output


@pytest.mark.parametrize("mode", ["structured", "structured-window"])
def test_structured_dropout_masks_between_layers_and_before_the_head_only(mode, monkeypatch):
    import leanlstm.nn.structured_dropout as sd
    config = D.DigitsConfig(hidden_sizes=[12, 12], dropout=0.5, features=D.FeatureConfig(n_mels=8))
    torch.manual_seed(0)
    standard = D.DigitsCTC(config)
    torch.manual_seed(0)
    model = D.DigitsCTC(D.DigitsConfig(**{**config.__dict__, "dropout_mode": mode}))
    inputs = torch.randn(9, 3, 24)
    drawn, draw = [], sd.draw_masks
    monkeypatch.setattr(sd, "draw_masks", lambda *args: drawn.append(args) or draw(*args))
    logits, (h, c) = model(inputs)
    assert [args[1] for args in drawn] == [12, 12]                 # layer 1's input and the head's: not the features
    assert [args[3] for args in drawn] == ([9, 9] if mode == "structured-window" else [1, 1])
    assert logits.shape == (9, 3, 11) and h.shape == c.shape == (2, 3, 12)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lstm.parameters())
    model.eval(), standard.eval()
    torch.testing.assert_close(model(inputs)[0], standard(inputs)[0])   # evaluation: no dropout, same function
    with pytest.raises(ValueError, match="dropout_mode must be one of"):
        D.DigitsConfig(dropout_mode="blocky")


def test_a_digits_run_trains_with_structured_window_dropout(tmp_path, fsdd_cache, monkeypatch):
    monkeypatch.setenv("LEANLSTM_CACHE", str(fsdd_cache))
    run = RunConfig(task="digits", preset="tiny", data_dir=str(shared_archive().parents[1]), max_tokens=24,
                    dropout=0.3, dropout_mode="structured-window")
    metrics = train_run(run, tmp_path / "run", progress=False)
    assert 0 <= metrics["test_wer"] and np.isfinite(metrics["history"][-1]["train_loss"])
    assert load_run(tmp_path / "run")[1].config.dropout_mode == "structured-window"


def test_eval_prints_counts_as_integers_and_small_rates_to_four_digits():
    from leanlstm.cli.eval import _number
    assert [_number("word_errors", 22), _number("wer", 0.0053372), _number("ppl", 86.6046), _number("loss", 0.126)] \
        == ["word_errors 22", "wer 0.005337", "ppl 86.60", "loss 0.1260"]
