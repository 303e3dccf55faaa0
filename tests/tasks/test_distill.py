import copy
import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from leanlstm.checkpoint import load_checkpoint, save_checkpoint
from leanlstm.cli import main
from leanlstm.runs import RunConfig, RunDirError, load_run, train_run
from leanlstm.tasks import build_ptb
from leanlstm.tasks.distill import DistillConfig, Distillation, soft_target_loss
from leanlstm.tasks.lm import LMConfig, WordLM
from leanlstm.train import Trainer, TrainConfig
from tests.test_train import StopAtStep

TINY = {"epochs": 2, "max_batches": 12}


def _lm(seed: int, vocab: int = 10000, hidden: int = 16, dropout: float = 0.0) -> WordLM:
    torch.manual_seed(seed)
    return WordLM(LMConfig(vocab, 16, [hidden, hidden], dropout, 0.1))


def _windows(data_dir, count=2):
    task = build_ptb(data_dir, 4, 5, verify=False, max_tokens=2000)
    batches = task.train_batches()
    return task, [next(batches) for _ in range(count)]


def test_soft_target_gradient_is_the_softened_probability_difference():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 7, requires_grad=True)
    teacher = torch.randn(3, 2, 7)
    for temperature in (1.0, 2.5):
        logits.grad = None
        soft_target_loss(logits, teacher, temperature).backward()
        tokens = 6
        expected = temperature * (torch.softmax(logits / temperature, -1) - torch.softmax(teacher / temperature, -1))
        torch.testing.assert_close(logits.grad, expected.detach() / tokens)
    assert float(soft_target_loss(teacher, teacher, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_target_loss(logits.detach(), teacher)) > 0.0


def test_the_soft_target_loss_stays_float32_under_bfloat16_autocast():
    """bf16 training (``--precision bfloat16``) hands it bf16 logits; autocast alone would take the log-softmax
    in bf16, and the gradient (a difference of two close distributions) 2% off. It must stay near float64's."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(35, 4, 1000)).bfloat16().float()
    teacher = (logits + 0.3 * torch.randn_like(logits)).bfloat16()

    def gradient(dtype):
        leaf = logits.to(dtype).requires_grad_()
        bf16 = dtype == torch.float32           # the autocast case: student and teacher logits arrive in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            student = leaf.bfloat16() if bf16 else leaf
            soft_target_loss(student, teacher.to(student.dtype)).backward()
        return leaf.grad.double()

    exact, autocast = gradient(torch.float64), gradient(torch.float32)
    assert float((autocast - exact).norm() / exact.norm()) < 5e-3    # reads 0.0017 (bf16 rounding of the grad)


def test_weight_zero_is_the_task_loss_and_the_teacher_state_follows_the_stream(ptb_slice_dir):
    task, (first, second) = _windows(ptb_slice_dir)
    student, teacher = _lm(1), _lm(2, hidden=24)          # the teacher may have other sizes
    distilled = Distillation(task, teacher, DistillConfig(weight=0.0))
    loss, state, reported = distilled.training_loss(student, first, None)
    expected, student_state, mean = task.training_loss(student, first, None)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(reported, mean)                     # the task's own mean loss, per token
    torch.testing.assert_close(expected, mean * first[0].shape[0])  # optimised: summed over the unrolled steps
    loss, state, _ = distilled.training_loss(student, second, state)
    torch.testing.assert_close(loss, task.training_loss(student, second, student_state)[0])
    # the teacher read both windows as one stream, from its own carried state
    both = torch.cat([first[0], second[0]])
    _, _, (h, c) = teacher(both)
    for carried, straight in zip(state[1][0] + state[1][1], h + c):
        torch.testing.assert_close(carried, straight)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_a_student_equal_to_its_teacher_has_nothing_to_learn_from_it(ptb_slice_dir):
    task, (window, _) = _windows(ptb_slice_dir)
    student = _lm(1)
    distilled = Distillation(task, copy.deepcopy(student), DistillConfig(weight=1.0, temperature=2.0))
    loss, _, reported = distilled.training_loss(student, window, None)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-4)
    assert float(reported) > 5                           # the task's own loss is still about ln(10,000) per token
    loss.backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5


def test_the_trainer_reports_the_tasks_metric_not_the_mixed_objective(ptb_slice_dir):
    task = build_ptb(ptb_slice_dir, 4, 5, verify=False, max_tokens=2000)
    student = _lm(1)
    config = TrainConfig(epochs=1, lr=1e-9, max_batches=5, checkpoint_minutes=0)
    plain = Trainer(copy.deepcopy(student), task, config).fit()[0]["train_ppl"]
    distilled = Distillation(task, copy.deepcopy(student), DistillConfig(weight=1.0))
    reported = Trainer(student, distilled, config).fit()[0]["train_ppl"]
    assert reported == pytest.approx(plain, rel=1e-5) and reported > 1000  # the objective itself is ~0


def test_bad_settings_are_refused():
    for bad in ({"weight": 1.5}, {"weight": -0.1}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            DistillConfig(**bad)
    with pytest.raises(RunDirError, match="distillation weight"):
        RunConfig(distill_weight=2.0)


def _run(data_dir, **overrides):
    return RunConfig(preset="tiny", data_dir=str(data_dir), verify_data=False, overrides={**TINY, **overrides})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, ptb_slice_dir):
    out = tmp_path_factory.mktemp("teacher") / "run"
    train_run(_run(ptb_slice_dir, epochs=1, max_batches=30), out, progress=False)
    return out


def test_a_distilled_run_resumes_inside_an_epoch_exactly(tmp_path, ptb_slice_dir, teacher_dir):
    settings = {"distill_from": str(teacher_dir), "distill_weight": 0.7, "distill_temperature": 2.0}
    every_window = {"checkpoint_minutes": 1e-9}
    run = replace(_run(ptb_slice_dir, **every_window), **settings)
    straight = train_run(run, tmp_path / "straight", progress=False)
    plain = train_run(_run(ptb_slice_dir, **every_window), tmp_path / "plain", progress=False)
    assert straight["val_ppl"] != plain["val_ppl"]      # the teacher changed training
    assert straight["distilled_from"] == str(teacher_dir) and straight["distill"]["weight"] == 0.7
    with pytest.raises(KeyboardInterrupt):
        train_run(run, tmp_path / "resumed", progress=False, callbacks=[StopAtStep(17)])   # epoch 2, window 5
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["within_epoch"]["epoch"] == 2 and saved["within_epoch"]["batches"] == 4
    student_state, teacher_state = saved["within_epoch"]["state"]   # the teacher's carried state is saved too
    assert teacher_state[0][0].shape == (1, 20, 32)
    resumed = train_run(run, tmp_path / "resumed", resume=True, progress=False)
    assert [h["val_ppl"] for h in resumed["history"]] == [h["val_ppl"] for h in straight["history"]]
    assert resumed["test_ppl"] == straight["test_ppl"]


def test_cli_distils_a_compression_and_refuses_a_teacher_of_another_vocabulary(tmp_path, ptb_slice_dir,
                                                                             teacher_dir):
    common = ["--max-batches", "6", "--no-verify-data", "--data-dir", str(ptb_slice_dir), "--no-progress"]
    result = CliRunner().invoke(main, ["compress", "--method", "lmf", "--from", str(teacher_dir), "--set",
                                       "compression=4", "--epochs", "1", "--finetune-epochs", "0",
                                       "--latency-repeats", "0", "--distill-from", str(teacher_dir),
                                       "--distill-weight", "0.3", "--out", str(tmp_path / "lmf"), *common])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "lmf" / "metrics.json").read_text())
    assert metrics["distill"] == {"weight": 0.3, "temperature": 1.0}
    assert metrics["distilled_from"] == str(teacher_dir)

    # a teacher over 50 words cannot teach a model over PTB's 10,000
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text((teacher_dir / "config.json").read_text())
    payload = load_checkpoint(teacher_dir / "checkpoint.pt")
    small = _lm(3, vocab=50, hidden=32)
    save_checkpoint(foreign / "checkpoint.pt", payload | {"model_config": small.model_config(),
                                                          "model_state": small.state_dict()})
    assert load_run(foreign)[1].config.vocab_size == 50
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--epochs", "1", "--distill-from", str(foreign),
                                       "--out", str(tmp_path / "refused"), *common])
    assert result.exit_code != 0 and "same task" in result.output
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--distill-weight", "2", "--out",
                                       str(tmp_path / "bad"), *common])
    assert result.exit_code != 0 and "--distill-weight" in result.output
