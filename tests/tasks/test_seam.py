"""The task seam: a second task written here, registered, and run through Trainer, run directories, distillation
and the CLI exactly as PTB is. It shares nothing with PTB: batch-first feature sequences, one label per sequence
from the last step, independent batches (no carried state), a metric where higher is better."""
import json
from dataclasses import dataclass, field

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from leanlstm.checkpoint import load_checkpoint
from leanlstm.cli import main
from leanlstm.cli.eval import _number as eval_number
from leanlstm.runs import RunConfig, RunDirError, evaluate_run, load_run, train_run
from leanlstm.tasks import TASKS, DataConfig, Preset, Task, TaskError, get_task, register_task
from leanlstm.tasks.distill import Distillation
from leanlstm.train import Trainer, TrainConfig
from tests.test_train import StopAtStep

SIZES = {"train": 384, "valid": 128, "test": 128}


@dataclass
class ToyConfig:
    features: int = 4                                       # inputs per step
    hidden_sizes: list[int] = field(default_factory=lambda: [16])
    classes: int = 3
    dropout: float = 0.0


class Classifier(nn.Module):
    """As users write them: ``self.rnn`` + ``self.fc`` on the last step; keeps its config as ``self.config``."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.rnn = nn.LSTM(config.features, config.hidden_sizes[0], len(config.hidden_sizes), batch_first=True)
        self.fc = nn.Linear(config.hidden_sizes[-1], config.classes)

    def forward(self, x):                                   # (B, T, F) -> (B, classes)
        return self.fc(self.rnn(x)[0][:, -1])


def _split(name: str, count: int, config: ToyConfig):
    """The class is the feature whose sum over time is largest (among the first ``classes``)."""
    generator = torch.Generator().manual_seed(list(SIZES).index(name))
    x = torch.randn(count, 8, config.features, generator=generator)
    return x, x[:, :, :config.classes].sum(1).argmax(1)


@dataclass
class ToyTrainConfig(TrainConfig):
    shuffle: bool = True             # a task-owned field, as PTB's bptt is


class Toy(Task):
    name = "toy-seam"
    metric = "accuracy"
    higher_is_better = True
    splits = ("train", "valid", "test")
    presets = {"toy": Preset(ToyConfig(), ToyTrainConfig(epochs=3, batch_size=16, lr=0.02, decay_after=10, clip=1.0,
                                                         optimizer="adam"), "3 classes, 3 epochs")}
    default_preset = "toy"
    train_config_type = ToyTrainConfig
    model_config_type = ToyConfig

    def __init__(self, train: ToyTrainConfig, limit: int | None = None) -> None:
        self.train = train
        self.data = {name: _split(name, min(count, limit or count), ToyConfig()) for name, count in SIZES.items()}

    @classmethod
    def build_model(cls, config):
        return Classifier(config)

    @classmethod
    def load(cls, data, train, rank=0, world_size=1):
        return cls(train, data.limit)

    def num_train_batches(self):
        return len(self.data["train"][0]) // self.train.batch_size

    def train_batches(self, epoch=1):
        x, y = self.data["train"]
        order = (torch.randperm(len(x), generator=torch.Generator().manual_seed(self.train.seed + epoch))
                 if self.train.shuffle else torch.arange(len(x)))
        for batch in order[: self.num_train_batches() * self.train.batch_size].split(self.train.batch_size):
            yield x[batch], y[batch]

    def forward(self, model, batch, state, with_loss=True):
        x, y = batch
        logits = model(x)
        return logits, F.cross_entropy(logits, y) if with_loss else None, None

    @torch.no_grad()
    def evaluate(self, model, split):
        was_training = model.training
        model.eval()
        x, y = self.data[split]
        logits = model(x)
        model.train(was_training)
        return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}


@pytest.fixture(autouse=True)
def toy_task():
    register_task(Toy)
    yield Toy
    TASKS.pop(Toy.name, None)


def _train(out, *extra):
    result = CliRunner().invoke(main, ["train", "--task", "toy-seam", "--out", str(out), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def test_a_second_task_trains_evaluates_and_shows_through_the_cli(tmp_path):
    metrics = _train(tmp_path / "run")
    assert metrics["task"] == "toy-seam" and metrics["preset"] == "toy" and metrics["metric"] == "accuracy"
    assert metrics["higher_is_better"] is True
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["val_accuracy"] > 0.7   # chance: 1/3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["test_accuracy"] > 0.7 and "test_loss" in metrics
    assert not any("ppl" in key for key in list(metrics) + list(history[0]))
    # LSTM numbers come from the module tree (a torch.nn.LSTM called rnn here)
    assert metrics["hidden_sizes"] == [16] and metrics["lstm_params"] == 4 * 16 * (4 + 16) + 8 * 16
    assert metrics["total_params"] == metrics["lstm_params"] + 16 * 3 + 3

    evaluated = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    text = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--split", "valid"]).output
    assert text.startswith("valid  loss ") and eval_number("accuracy", history[-1]["val_accuracy"]) in text

    shown = CliRunner().invoke(main, ["show", "--task", "toy-seam", str(tmp_path / "run")])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].endswith(f"finished: test accuracy {metrics['test_accuracy']:.2f}, sizes [16]")
    assert f"train loss {history[0]['train_loss']:8.2f}  valid accuracy {history[0]['val_accuracy']:8.2f}" in lines[1]


def test_a_checkpoint_rebuilds_the_model_from_its_config_alone(tmp_path):
    train_run(RunConfig(task="toy-seam", overrides={"epochs": 1}), tmp_path / "run", progress=False)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["model_config"]["config"]["hidden_sizes"] == [16]         # JSON: the task's config dataclass
    _, model, _ = load_run(tmp_path / "run")
    assert isinstance(model, Classifier)
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["model_state"][key]), key


def test_direct_design_sizes_and_presets_of_another_task(tmp_path):
    metrics = _train(tmp_path / "run", "--hidden-sizes", "7", "--epochs", "1")
    assert metrics["hidden_sizes"] == [7]
    bad = CliRunner().invoke(main, ["train", "--task", "toy-seam", "--hidden-sizes", "7,7", "--out",
                                    str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--hidden-sizes" in bad.output and "1 positive sizes" in bad.output
    assert not (tmp_path / "bad").exists()
    for args, message in ((["--task", "toy-seam", "--preset", "small"], "task 'toy-seam' has no preset 'small' "
                                                                         "('small' is a preset of task 'ptb'"),
                          (["--preset", "toy"], "pass --task toy-seam"),
                          (["--task", "nope"], "unknown task 'nope'; known tasks: ")):
        result = CliRunner().invoke(main, ["train", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "x").exists()
    with pytest.raises(RunDirError, match="has no training setting bptt"):
        RunConfig(task="toy-seam", overrides={"bptt": 35}).train_config()
    with pytest.raises(TaskError, match="unknown task"):
        get_task("nope")


def test_run_dir_commands_check_their_task(tmp_path):
    _train(tmp_path / "run", "--epochs", "1")
    for command in (["show"], ["eval"], ["export"], ["bench"]):
        result = CliRunner().invoke(main, [*command, "--task", "ptb", str(tmp_path / "run")])
        assert result.exit_code != 0 and "is a toy-seam run, not ptb" in result.output, result.output
    bad_split = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--split", "heldout"])
    assert bad_split.exit_code != 0 and "has no split 'heldout'" in bad_split.output


def test_resume_inside_an_epoch_continues_exactly(tmp_path):
    """Shuffled batches, Adam's moments, no carried state: resuming mid-epoch still gives the same run."""
    run = RunConfig(task="toy-seam", overrides={"checkpoint_minutes": 1e-9})
    straight = train_run(run, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, tmp_path / "resumed", progress=False, callbacks=[StopAtStep(30)])   # epoch 2, batch 6 of 24
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["within_epoch"]["batches"] == 5
    resumed = train_run(run, tmp_path / "resumed", resume=True, progress=False)
    assert [h["val_accuracy"] for h in resumed["history"]] == [h["val_accuracy"] for h in straight["history"]]
    assert resumed["test_loss"] == straight["test_loss"]


def test_compression_runs_on_the_second_task_and_its_checkpoint_keeps_the_compressed_structure(tmp_path):
    _train(tmp_path / "base", "--epochs", "2")
    common = ["--from", str(tmp_path / "base"), "--epochs", "1", "--finetune-epochs", "1", "--latency-repeats", "0",
              "--no-progress"]
    result = CliRunner().invoke(main, ["compress", "--method", "prune", "--set", "compression=2", "--set",
                                       "prune_every=2", "--out", str(tmp_path / "pruned"), *common])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "pruned" / "metrics.json").read_text())
    assert metrics["task"] == "toy-seam" and "baseline_test_accuracy" in metrics
    assert metrics["lstm_compression"] > 1.5
    _, model, _ = load_run(tmp_path / "pruned")      # rebuilt: nn.LSTM -> leanlstm.LSTM with sparse forms
    assert type(model.rnn).__name__ == "LSTM" and type(model.rnn.layers[0].weight_hh).__name__ == "MaskedSparse"
    assert evaluate_run(tmp_path / "pruned", ["test"])["test"]["accuracy"] == pytest.approx(metrics["test_accuracy"])

    # ISS removes hidden units from the LSTM and the head that reads it, found from the graph; the checkpoint
    # records the smaller shapes, so the run rebuilds
    result = CliRunner().invoke(main, ["compress", "--method", "iss", "--strength", "0.5", "--set", "threshold=0.05",
                                       "--out", str(tmp_path / "iss"), *common])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "iss" / "metrics.json").read_text())
    _, model, _ = load_run(tmp_path / "iss")
    assert metrics["hidden_sizes"][0] < 16 and model.fc.in_features == metrics["hidden_sizes"][0]
    assert evaluate_run(tmp_path / "iss", ["test"])["test"]["loss"] == pytest.approx(metrics["test_loss"])


def test_distillation_goes_through_the_task(tmp_path):
    teacher_dir = tmp_path / "teacher"
    _train(teacher_dir, "--epochs", "2")
    teacher = load_run(teacher_dir)[1]
    task = Toy.load(DataConfig(), Toy.preset().train)
    student = Classifier(ToyConfig(hidden_sizes=[8]))
    batch = next(iter(task.train_batches(1)))
    loss, state, mean = Distillation(task, teacher).training_loss(student, batch, None)
    with torch.no_grad():
        plain = float(F.cross_entropy(student(batch[0]), batch[1]))
    assert state == (None, None) and float(mean) == pytest.approx(plain)
    assert float(loss.detach()) != pytest.approx(plain)      # the teacher's soft targets count
    metrics = _train(tmp_path / "student", "--hidden-sizes", "8", "--epochs", "1", "--distill-from", str(teacher_dir))
    assert metrics["distilled_from"] == str(teacher_dir) and metrics["hidden_sizes"] == [8]


def test_the_trainer_runs_the_task_in_a_users_own_loop():
    task = Toy.load(DataConfig(limit=64), Toy.preset().train)
    model = Toy.build_model(ToyConfig())
    history = Trainer(model, task, TrainConfig(epochs=2, lr=0.01, optimizer="adam")).fit()
    assert isinstance(Trainer(model, task, TrainConfig(optimizer="adam")).optimizer, torch.optim.Adam)
    assert [sorted(h) for h in history][0] == ["epoch", "lr", "phase", "seconds", "train_loss", "val_accuracy",
                                               "val_loss"]
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam"):
        TrainConfig(optimizer="rmsprop")
