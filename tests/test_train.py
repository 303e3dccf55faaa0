import json
import math
import os
import signal
import subprocess

import pytest
import torch
from click.testing import CliRunner

from leanlstm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from leanlstm.cli import main
from leanlstm.tasks.ptb import load_ptb
from leanlstm.runs import RunConfig, RunDirError, evaluate_run, exclusive, load_run, train_run
from leanlstm.train import Callback, ConfigError, Trainer, TrainConfig, TrainingDiverged, to_device

TINY = {"epochs": 3, "max_batches": 15}


def _run(data_dir, **overrides):
    return RunConfig(preset="tiny", data_dir=str(data_dir), verify_data=False, overrides={**TINY, **overrides})


class StopAfter(Callback):
    """Simulates an interruption (Ctrl-C, a killed job) at the end of an epoch, before its checkpoint."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, ptb_slice_dir):
    straight = train_run(_run(ptb_slice_dir), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), tmp_path / "resumed", progress=False, callbacks=[StopAfter(2)])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    # resumed as it was started, whatever the command line asks now
    resumed = train_run(_run(ptb_slice_dir, epochs=5, max_batches=4), tmp_path / "resumed", resume=True,
                        progress=False)
    assert resumed["test_ppl"] == straight["test_ppl"]
    assert [h["val_ppl"] for h in resumed["history"]] == [h["val_ppl"] for h in straight["history"]]
    a, b = load_run(tmp_path / "straight")[1], load_run(tmp_path / "resumed")[1]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


class StopAtStep(Callback):
    """Simulates an interruption in the middle of an epoch, right after optimiser step ``step``."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer):
        if trainer.step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_inside_an_epoch_continues_exactly(tmp_path, ptb_slice_dir, precision):
    every_window = {"checkpoint_minutes": 1e-9, "precision": precision}   # a checkpoint after every window
    straight = train_run(_run(ptb_slice_dir, precision=precision), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir, **every_window), tmp_path / "resumed", progress=False,
                  callbacks=[StopAtStep(22)])                   # epoch 2, window 7 of 15
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["within_epoch"]["epoch"] == 2 and saved["within_epoch"]["batches"] == 6
    carried = saved["within_epoch"]["state"][0] + saved["within_epoch"]["state"][1]    # h and c of each layer
    assert all(t.dtype == torch.float32 for t in carried)      # autocast's bf16 state is carried in float32
    resumed = train_run(_run(ptb_slice_dir, **every_window), tmp_path / "resumed", resume=True, progress=False)
    assert [h["val_ppl"] for h in resumed["history"]] == [h["val_ppl"] for h in straight["history"]]
    assert [h["train_ppl"] for h in resumed["history"]] == pytest.approx([h["train_ppl"] for h in straight["history"]])
    assert resumed["test_ppl"] == straight["test_ppl"]


def test_training_learns_and_writes_metrics(tmp_path, ptb_slice_dir):
    metrics = train_run(_run(ptb_slice_dir, epochs=2, max_batches=40), tmp_path / "run", progress=False)
    history = metrics["history"]
    vocabulary = load_ptb(ptb_slice_dir, verify=False).vocab_size   # the slice's: 4,988 words
    # 80 steps of a 2x32 model: at least 5x better than uniform guessing (it reads about 670; unigram ~380)
    assert history[-1]["val_ppl"] < history[0]["val_ppl"] and history[-1]["val_ppl"] < vocabulary / 5
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("task", "preset", "method", "hidden_sizes", "lstm_params", "total_params", "val_ppl",
                "test_ppl", "train_minutes", "command"):
        assert key in saved
    assert saved["hidden_sizes"] == [32, 32] and saved["lstm_params"] == 2 * (4 * 32 * 64 + 8 * 32)
    assert evaluate_run(tmp_path / "run", ["test"])["test"]["ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-6)


def test_bfloat16_training_learns_like_float32_and_keeps_float32_weights(tmp_path, ptb_slice_dir):
    runs = {precision: train_run(_run(ptb_slice_dir, epochs=2, max_batches=40, precision=precision),
                                 tmp_path / precision, progress=False) for precision in ("float32", "bfloat16")}
    full, half = ([h["val_ppl"] for h in runs[p]["history"]] for p in ("float32", "bfloat16"))
    assert half != full                                   # the forward pass really ran in bf16
    vocabulary = load_ptb(ptb_slice_dir, verify=False).vocab_size
    # and learnt as float32 does (see test_training_learns_and_writes_metrics); the two trajectories part early
    # at lr 1 (epoch 1 reads 902 against 1302 here), so only the learning is compared, not the numbers
    assert half[-1] < half[0] and half[-1] < vocabulary / 5 and full[-1] < vocabulary / 5
    assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["overrides"]["precision"] == "bfloat16"
    model = load_run(tmp_path / "bfloat16")[1]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="float16")


def test_finished_and_foreign_run_dirs_are_never_overwritten(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    train_run(_run(ptb_slice_dir, epochs=1, max_batches=3), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunDirError, match="already holds a finished run"):
        train_run(_run(ptb_slice_dir), out, progress=False)
    with pytest.raises(RunDirError, match="already holds a finished run"):
        train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not empty; pass --resume"):
        train_run(_run(ptb_slice_dir), other, progress=False)
    with pytest.raises(RunDirError, match="has no checkpoint.pt"):
        train_run(_run(ptb_slice_dir), tmp_path / "empty", resume=True, progress=False)


def test_a_run_that_stopped_before_its_first_checkpoint_starts_over(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):                        # e.g. Ctrl-C in the first epoch
        train_run(_run(ptb_slice_dir, checkpoint_minutes=0), out, progress=False, callbacks=[StopAfter(1)])
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "log.txt"]
    with pytest.raises(RunDirError, match="has no checkpoint.pt; drop --resume"):
        train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
    metrics = train_run(_run(ptb_slice_dir, epochs=1), out, progress=False)
    assert metrics["epochs"] == 1 and (out / "metrics.json").is_file()


def test_nan_loss_stops_with_a_clear_error(tmp_path, ptb_slice_dir):
    class Poison(Callback):
        def after_step(self, trainer):
            if trainer.step == 20:
                with torch.no_grad():
                    trainer.model.decoder.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"became nan at epoch 2.*checkpoint.pt.*--lr"):
        train_run(_run(ptb_slice_dir), tmp_path / "run", progress=False, callbacks=[Poison()])
    # the checkpoint of the last good epoch survives
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_a_finite_loss_with_a_nan_gradient_never_reaches_the_weights_or_a_checkpoint(tmp_path, ptb_slice_dir):
    class NanGradient(Callback):      # sqrt at 0: the loss term is 0, its gradient 0 * inf = NaN
        def extra_loss(self, trainer):
            if trainer.step == 29:    # the last window of epoch 2 (15 an epoch): right before its checkpoint
                return (0.0 * trainer.model.decoder.weight.sum()).sqrt()
            return None

    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at epoch 2, batch 14.*checkpoint.pt.*--lr"):
        train_run(_run(ptb_slice_dir), tmp_path / "run", progress=False, callbacks=[NanGradient()])
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")   # epoch 1's, not a poisoned epoch 2
    assert payload["epoch"] == 1 and all(torch.isfinite(v).all() for v in payload["model_state"].values())


def test_save_refuses_non_finite_weights_and_keeps_the_good_checkpoint(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), out, progress=False, callbacks=[StopAfter(2)])
    good = (out / "checkpoint.pt").read_bytes()

    class PoisonThenSave(Callback):
        def on_train_begin(self, trainer):
            with torch.no_grad():
                trainer.model.decoder.bias[0] = float("inf")
            trainer.save()

    with pytest.raises(TrainingDiverged, match=r"not saving .*decoder.bias"):
        train_run(_run(ptb_slice_dir), out, resume=True, progress=False, callbacks=[PoisonThenSave()])
    assert (out / "checkpoint.pt").read_bytes() == good


def test_a_write_killed_midway_leaves_a_temp_file_that_does_not_block_the_run(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), out, progress=False, callbacks=[StopAfter(2)])
    leftover = out / ".checkpoint.pt.abc123.tmp"       # what a SIGKILL inside torch.save leaves
    leftover.write_bytes(b"half a checkpoint")
    resumed = train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
    assert not leftover.exists() and resumed["epochs"] == 3
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~mask   # not mkstemp's 0600


def test_a_run_another_process_is_training_is_refused_and_logs_stay_apart(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), out, progress=False, callbacks=[StopAfter(2)])
    busy = out / ".checkpoint.pt.xyz.tmp"               # the other trainer's checkpoint, half written
    busy.write_bytes(b"being written")
    before = (out / "checkpoint.pt").read_bytes()
    with exclusive(out, resume=True):                   # stands for the other process (flock is per open file)
        with pytest.raises(RunDirError, match=f"being trained by another process \\(pid {os.getpid()}\\)"):
            train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
        busy.write_bytes(b"being written")              # ``exclusive`` cleared it for its holder: put it back
        with pytest.raises(RunDirError, match="another process"):
            train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
        assert busy.exists() and (out / "checkpoint.pt").read_bytes() == before   # nothing of it touched
    other = train_run(_run(ptb_slice_dir, epochs=1), tmp_path / "other", progress=False)
    resumed = train_run(_run(ptb_slice_dir), out, resume=True, progress=False)   # released: resumes
    assert resumed["epochs"] == 3 and other["epochs"] == 1
    # each log holds its own run's lines only (a handler left attached would copy "other"'s into "run")
    assert (out / "log.txt").read_text().count("finished:") == 1
    assert (tmp_path / "other" / "log.txt").read_text().count("finished:") == 1
    assert "resumed" not in (tmp_path / "other" / "log.txt").read_text()


def test_corrupt_and_incompatible_checkpoints(tmp_path, ptb_slice_dir):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), out, progress=False, callbacks=[StopAfter(2)])
    checkpoint = out / "checkpoint.pt"
    good = checkpoint.read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a leanlstm checkpoint"):
        train_run(_run(ptb_slice_dir), out, resume=True, progress=False)
    checkpoint.write_bytes(good)
    payload = load_checkpoint(checkpoint)
    save_checkpoint(checkpoint, {**payload, "format_version": 99})
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(checkpoint)
    payload["model_state"]["decoder.weight"] = torch.zeros(3, 3)
    save_checkpoint(checkpoint, {k: v for k, v in payload.items() if k != "format_version"})
    with pytest.raises(CheckpointError, match="does not match this model"):
        train_run(_run(ptb_slice_dir), out, resume=True, progress=False)


def test_lr_schedule_follows_zaremba():
    config = TrainConfig(lr=1.0, lr_decay=0.5, decay_after=4)
    assert [config.lr_at(e) for e in (1, 4, 5, 6)] == [1.0, 1.0, 0.5, 0.25]


def test_cli_train_and_eval(tmp_path, ptb_slice_dir):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--out", str(out), "--data-dir", str(ptb_slice_dir),
            "--no-verify-data", "--epochs", "1", "--max-batches", "5", "--no-progress"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["hidden_sizes"] == [32, 32]
    again = runner.invoke(main, args)
    assert again.exit_code != 0 and "already holds a finished run" in again.output
    assert "Traceback" not in again.output
    evaluated = runner.invoke(main, ["eval", str(out), "--split", "valid", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert math.isfinite(json.loads(evaluated.stdout)["valid"]["ppl"])
    missing = runner.invoke(main, ["train", "--preset", "tiny", "--out", str(tmp_path / "x"),
                                   "--data-dir", str(tmp_path / "nowhere"), "--no-progress"])
    # No network here: the download fails and the message says where to put the files instead.
    assert missing.exit_code != 0 and "LEANLSTM_DATA" in missing.output and "Traceback" not in missing.output


def test_cli_train_takes_the_lr_schedule(tmp_path, ptb_slice_dir):
    """``--decay-after`` and ``--lr-decay`` stretch or shorten a preset's schedule (e.g. more epochs in the same
    time); the run records them, and the lr follows them epoch by epoch."""
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--out", str(out), "--data-dir", str(ptb_slice_dir),
                                       "--no-verify-data", "--epochs", "3", "--max-batches", "2", "--lr", "0.8",
                                       "--decay-after", "1", "--lr-decay", "0.5", "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [round(epoch["lr"], 6) for epoch in metrics["history"]] == [0.8, 0.4, 0.2]
    overrides = json.loads((out / "config.json").read_text())["overrides"]
    assert (overrides["decay_after"], overrides["lr_decay"]) == (1, 0.5)


def test_trainer_works_in_a_users_own_loop(ptb_slice_dir):
    """Callbacks are plain objects; the Trainer is usable without a run directory."""
    from leanlstm.tasks import build_ptb
    from leanlstm.tasks.lm import LMConfig, WordLM

    task = build_ptb(ptb_slice_dir, 4, 10, verify=False)
    model = WordLM(LMConfig(task.corpus.vocab_size, 8, [8], 0.0, 0.1))
    seen = []

    class Record(Callback):
        def extra_loss(self, trainer):
            return 0.0 * sum(p.sum() for p in trainer.model.parameters())

        def after_step(self, trainer):
            seen.append(trainer.step)

    Trainer(model, task, TrainConfig(epochs=1, max_batches=4), callbacks=[Record()]).fit()
    assert seen == [1, 2, 3, 4]


def test_replace_model_trains_the_new_model_and_tells_the_callbacks(ptb_slice_dir):
    from leanlstm.tasks.lm import LMConfig, WordLM
    from leanlstm.tasks import build_ptb

    task = build_ptb(ptb_slice_dir, 4, 10, verify=False)
    old, new = (WordLM(LMConfig(task.corpus.vocab_size, 8, [size], 0.0, 0.1)) for size in (8, 5))
    told = []

    class Follow(Callback):
        def on_model_replaced(self, trainer):
            told.append(trainer.model)

    trainer = Trainer(old, task, TrainConfig(epochs=1, max_batches=2, lr=0.7), callbacks=[Follow()])
    trainer.replace_model(new)
    assert told == [new] and trainer.model is new and trainer.train_model is new
    assert trainer.optimizer.param_groups[0]["params"] == list(new.parameters())
    assert trainer.optimizer.param_groups[0]["lr"] == 0.7
    before = [p.detach().clone() for p in old.parameters()]
    trainer.fit()
    assert all(torch.equal(p, q) for p, q in zip(old.parameters(), before))  # the old model no longer trains


def test_hidden_sizes_train_a_direct_design_with_per_layer_sizes(tmp_path, ptb_slice_dir):
    args = ["train", "--preset", "tiny", "--hidden-sizes", "12,7", "--epochs", "1", "--max-batches", "3",
            "--data-dir", str(ptb_slice_dir), "--no-verify-data", "--no-progress", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["hidden_sizes"] == [12, 7]
    assert saved["lstm_params"] == (4 * 12 * (32 + 12) + 8 * 12) + (4 * 7 * (12 + 7) + 8 * 7)
    assert load_run(tmp_path / "run")[1].lstm.hidden_sizes == [12, 7]  # the checkpoint rebuilds the same shape
    for bad in ("12", "12,x", "12,0"):
        result = CliRunner().invoke(main, args[:4] + [bad] + args[5:-1] + [str(tmp_path / f"bad-{bad}")])
        assert result.exit_code != 0 and "hidden-sizes" in result.output, result.output
        assert not (tmp_path / f"bad-{bad}").exists()  # refused before a run directory is made


def test_hidden_sizes_from_a_finished_run_trains_its_direct_design(tmp_path, ptb_slice_dir):
    common = ["--preset", "tiny", "--epochs", "1", "--max-batches", "3", "--data-dir", str(ptb_slice_dir),
              "--no-verify-data", "--no-progress"]
    found = tmp_path / "found"                  # stands for an ISS result: a run that ended with its own sizes
    assert CliRunner().invoke(main, ["train", "--hidden-sizes", "9,5", "--out", str(found)] + common).exit_code == 0
    result = CliRunner().invoke(main, ["train", "--hidden-sizes-from", str(found), "--out", str(tmp_path / "direct")]
                                + common)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "direct" / "config.json").read_text())["hidden_sizes"] == [9, 5]
    assert json.loads((tmp_path / "direct" / "metrics.json").read_text())["hidden_sizes"] == [9, 5]

    (found / "metrics.json").unlink()           # unfinished: its sizes may still change
    unfinished = CliRunner().invoke(main, ["train", "--hidden-sizes-from", str(found), "--out", str(tmp_path / "x")]
                                    + common)
    assert unfinished.exit_code != 0 and "has not finished" in unfinished.output
    both = CliRunner().invoke(main, ["train", "--hidden-sizes", "4,4", "--hidden-sizes-from", str(tmp_path / "direct"),
                                     "--out", str(tmp_path / "y")] + common)
    assert both.exit_code != 0 and "not both" in both.output


def test_show_prints_finished_and_unfinished_runs(tmp_path, ptb_slice_dir):
    train_run(_run(ptb_slice_dir, epochs=1), tmp_path / "done", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(_run(ptb_slice_dir), tmp_path / "half", progress=False, callbacks=[StopAfter(2)])
    result = CliRunner().invoke(main, ["show", str(tmp_path / "done"), str(tmp_path / "half")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    done = json.loads((tmp_path / "done" / "metrics.json").read_text())
    assert lines[0].endswith(f"finished: test ppl {done['test_ppl']:.2f}, sizes [32, 32]")
    assert f"valid ppl {done['history'][0]['val_ppl']:8.2f}" in lines[1]
    assert lines[2].endswith("half  unfinished; stopped") and len(lines) == 4   # epoch 1 saved, epoch 2 stopped
    with exclusive(tmp_path / "half", resume=True):                      # as while a process trains it
        busy = CliRunner().invoke(main, ["show", str(tmp_path / "half")]).output.splitlines()[0]
    assert busy.endswith(f"half  unfinished; training now (pid {os.getpid()})")
    paused = subprocess.Popen(["sleep", "60"])          # a trainer paused with SIGSTOP to free a core
    try:
        paused.send_signal(signal.SIGSTOP)
        os.waitpid(paused.pid, os.WUNTRACED)            # returns once it has stopped
        with exclusive(tmp_path / "half", resume=True):
            (tmp_path / "half" / ".lock").write_text(str(paused.pid))   # as if the paused process held the lock
            line = CliRunner().invoke(main, ["show", str(tmp_path / "half")]).output.splitlines()[0]
            reported = json.loads(CliRunner().invoke(main, ["show", "--json", str(tmp_path / "half")]).output)[0]
        assert reported["training_pid"] == str(paused.pid) and reported["training_paused"] is True
        assert line.endswith(f"half  unfinished; paused (pid {paused.pid}, SIGSTOP; `kill -CONT {paused.pid}` "
                             f"resumes it)")
    finally:
        paused.kill()
        paused.wait()
    as_json = json.loads(CliRunner().invoke(main, ["show", "--json", str(tmp_path / "half")]).output)
    assert as_json[0]["finished"] is False and [h["epoch"] for h in as_json[0]["history"]] == [1]
    bad = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert bad.exit_code != 0 and "not a leanlstm run directory" in bad.output


def test_device_names_are_checked_and_a_missing_gpu_fails_before_the_run_dir_is_made(tmp_path, ptb_slice_dir):
    with pytest.raises(ConfigError, match="device must name a torch device"):
        TrainConfig(device="gpu0")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal below needs one without")
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--device", "cuda", "--data-dir",
                                       str(ptb_slice_dir), "--no-verify-data", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "PyTorch sees no CUDA device" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_batches_of_any_shape_move_to_the_device():
    from leanlstm.tasks.digits import Batch

    batch = Batch(torch.zeros(3, 2, 4), torch.tensor([3, 2]), torch.tensor([1, 2]), torch.tensor([1, 1]))
    moved = to_device({"audio": batch, "ids": [torch.ones(2)], "name": "x"}, "cpu")
    assert isinstance(moved["audio"], Batch) and moved["audio"].lengths.tolist() == [3, 2]
    assert moved["name"] == "x" and moved["ids"][0].tolist() == [1.0, 1.0]


def test_an_explicit_cpu_device_trains_exactly_as_the_default(tmp_path, ptb_slice_dir):
    default = train_run(_run(ptb_slice_dir, epochs=1), tmp_path / "default", progress=False)
    cpu = train_run(_run(ptb_slice_dir, epochs=1, device="cpu"), tmp_path / "cpu", progress=False)
    assert cpu["test_ppl"] == default["test_ppl"]
