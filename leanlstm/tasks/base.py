"""The task seam: what a task tells the trainer, the run directories, distillation and the CLI.

A task is one class (one file in ``leanlstm/tasks/``) registered by name. Its class side needs no data: the
metric and its direction, its presets, and how its model is built, saved and rebuilt. ``Task.load(data, train)``
gives an instance that holds the data: training batches, the training loss and evaluation.

    @register_task
    class Digits(Task):
        name, metric, higher_is_better = "digits", "wer", False
        presets = {"digits-small": Preset(SpeechConfig(...), TrainConfig(...), "2x128, 20 epochs")}
        default_preset = "digits-small"
        model_config_type = SpeechConfig

        @classmethod
        def build_model(cls, config): return SpeechModel(config)
        @classmethod
        def load(cls, data, train, rank=0, world_size=1): return cls(...)
        def num_train_batches(self): ...
        def train_batches(self, epoch=1): ...           # any batch type: the task alone reads it
        def forward(self, model, batch, state, with_loss=True): return logits, loss, state
        def evaluate(self, model, split): return {"loss": ..., "wer": ...}

Built-in tasks are listed in ``BUILTIN_TASKS`` (imported on first use, so a task's heavy dependencies load
only when it is asked for); a task defined elsewhere registers itself with ``@register_task``.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn.structured_dropout import parse_dropout_mode
from ..train import ConfigError, Range, TrainConfig, check_memory

MAX_HIDDEN = 10**6          # per-layer LSTM size; memory refuses far smaller ones first (``check_lstm_memory``)


class TaskError(ValueError):
    """An unknown task, a preset of another task, a model a task cannot build; the message says what to do."""


@dataclass
class DataConfig:
    directory: str | None = None   # data folder; None: $LEANLSTM_DATA, else the per-user cache (tasks.data.data_dir)
    limit: int | None = None       # only the first items (tokens, utterances) of every split: smoke runs
    verify: bool = True            # check the data files' checksums (off for slices of them)

    def __post_init__(self) -> None:
        if self.limit is not None:
            Range(1, 10**12, integer=True, note="or None: all").check("limit", self.limit)


def check_lstm_memory(name: str, hidden_sizes: list[int]) -> None:
    """Refuse per-layer sizes whose LSTM weights and gradients alone would not fit in memory (a lower bound:
    the first layer's input width is not counted), before anything is allocated.

    >>> check_lstm_memory("hidden_sizes", [500000, 8])
    Traceback (most recent call last):
    ...
    leanlstm.train.ConfigError: hidden_sizes must fit in memory: ...
    """
    sizes = Range(1, MAX_HIDDEN, integer=True)
    for size in hidden_sizes:
        if not sizes.contains(size):
            raise ConfigError(name, list(hidden_sizes), f"be whole numbers in [1, {MAX_HIDDEN}]")
    weights = sum(4 * h * (h + below) for below, h in zip([0, *hidden_sizes], hidden_sizes))  # [i|f|g|o] rows
    check_memory(name, list(hidden_sizes), 2 * 4 * weights, "the LSTM weights and their gradients (float32)")


@dataclass(frozen=True)
class Preset:
    """A task's named set-up: its model config, its training schedule, and a line saying what it is."""

    model: Any                     # the task's model config (a dataclass of ``model_config_type``)
    train: TrainConfig             # the schedule; a TrainConfig subclass when the task has fields of its own
    description: str = ""


class Task:
    """Base class of every task; subclasses set the class attributes and implement the marked methods.

    Class side (no data): ``name``, ``metric`` (the key of ``evaluate``'s result that runs report as
    ``val_<metric>`` / ``test_<metric>``), ``higher_is_better``, ``presets``, ``build_model``,
    ``model_config`` / ``model_from_config`` (checkpoints: structure as JSON, weights as a state dict),
    ``train_metric`` (what the mean training loss means, per epoch ``train_<train_metric_name>``).

    Instance side (``load``): ``train_batches``, ``num_train_batches``, ``forward``, ``training_loss``,
    ``evaluate``. A batch and the carried ``state`` are whatever the task makes them; only the task reads them.
    """

    name: ClassVar[str]
    metric: ClassVar[str]                          # evaluate()'s key that runs report and compare
    higher_is_better: ClassVar[bool] = False       # direction of ``metric`` (accuracy: True; error rates: False)
    metric_label: ClassVar[str] = ""               # words for plots and tables ("" : the metric's name)
    train_metric_name: ClassVar[str] = "loss"      # what ``train_metric`` turns the mean training loss into
    splits: ClassVar[tuple[str, ...]] = ("train", "valid", "test")   # what ``evaluate`` accepts
    test_splits: ClassVar[tuple[str, ...]] = ("test",)               # evaluated when a run finishes
    presets: ClassVar[dict[str, Preset]] = {}
    default_preset: ClassVar[str] = ""
    train_config_type: ClassVar[type[TrainConfig]] = TrainConfig   # the task's schedule (a subclass adds fields)
    model_config_type: ClassVar[type | None] = None                # the task's model config dataclass

    # --- presets and models (no data needed) ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str | None = None) -> Preset:
        """The preset ``name`` (default: ``default_preset``); a clear error names the task that has it."""
        name = name or cls.default_preset
        if name in cls.presets:
            return cls.presets[name]
        owners = [task.name for task in TASKS.values() if name in task.presets]
        hint = f" ({name!r} is a preset of task {owners[0]!r}: pass --task {owners[0]})" if owners else ""
        raise TaskError(f"task {cls.name!r} has no preset {name!r}{hint}; its presets: "
                        f"{', '.join(cls.presets) or 'none'}")

    @classmethod
    def configure_model(cls, config: Any, *, hidden_sizes: list[int] | None = None,
                        dropout: float | None = None, vocab_size: int | None = None,
                        dropout_mode: str | None = None) -> Any:
        """``config`` with per-layer LSTM sizes, a dropout rate and/or a dropout mode changed (fields
        ``hidden_sizes``, ``dropout``, ``dropout_mode`` of the model config; a task whose config has other names
        overrides this). ``vocab_size`` belongs to tasks with a vocabulary to cap (the text task), which override
        this."""
        if vocab_size is not None:
            raise TaskError(f"task {cls.name!r} has no vocabulary size to set")
        if dropout_mode is not None:        # MODE or MODE/N (N steps per mask; nn.structured_dropout)
            _require_field(cls, config, "dropout_mode")
            try:
                mode, steps = parse_dropout_mode(dropout_mode)
            except ValueError as error:
                raise TaskError(str(error)) from None
            config = dataclasses.replace(config, dropout_mode=mode)
            if steps is not None:
                _require_field(cls, config, "dropout_steps_per_mask")
                config = dataclasses.replace(config, dropout_steps_per_mask=steps)
        if dropout is not None:
            _require_field(cls, config, "dropout")
            if not 0.0 <= dropout < 1.0:
                raise TaskError(f"dropout must lie in [0, 1), got {dropout}")
            config = dataclasses.replace(config, dropout=dropout)
        if hidden_sizes is not None:
            current = _require_field(cls, config, "hidden_sizes")
            if len(hidden_sizes) != len(current) or min(hidden_sizes, default=0) < 1:
                raise TaskError(f"needs {len(current)} positive sizes (one per layer), got {list(hidden_sizes)}")
            check_lstm_memory("hidden_sizes", hidden_sizes)
            config = dataclasses.replace(config, hidden_sizes=list(hidden_sizes))
        return config

    @classmethod
    def fit_model_config(cls, config: Any, data: DataConfig) -> Any:
        """``config`` fitted to the run's data before the model is built (the text task lowers its vocabulary cap
        to the corpus's); unchanged by default."""
        return config

    @classmethod
    def build_model(cls, config: Any) -> nn.Module:
        """A freshly initialised model of ``config`` (a preset's ``model``). Implement."""
        raise NotImplementedError(f"task {cls.name!r} does not implement build_model")

    @classmethod
    def model_config(cls, model: nn.Module) -> dict[str, Any]:
        """JSON-ready structure of ``model`` that ``model_from_config`` rebuilds (checkpoints; weights go in the
        state dict). The default needs the model's config dataclass as ``model.config`` and records what
        compression changed (``leanlstm.compressed_config``)."""
        from ..compress import compressed_config   # compress imports methods, which import the trainer

        config = getattr(model, "config", None)
        if not dataclasses.is_dataclass(config):
            raise TaskError(f"task {cls.name!r} cannot save a {type(model).__name__}: keep the model's config "
                            f"dataclass as model.config, or override {cls.__name__}.model_config/model_from_config")
        return {"task": cls.name, "config": dataclasses.asdict(config), "structure": compressed_config(model)}

    @classmethod
    def model_from_config(cls, config: dict[str, Any]) -> nn.Module:
        """The model ``model_config`` describes, with fresh weights (load the state dict next)."""
        from ..compress import restore_

        if cls.model_config_type is None:
            raise TaskError(f"task {cls.name!r} sets no model_config_type: cannot rebuild its models")
        model = cls.build_model(cls.model_config_type(**config["config"]))
        return restore_(model, config["structure"])

    @classmethod
    def set_dropout(cls, model: nn.Module, dropout: float) -> None:
        """Change ``model``'s dropout rate everywhere, recorded so that checkpoints keep it."""
        if not hasattr(model, "set_dropout"):
            raise TaskError(f"task {cls.name!r}: a {type(model).__name__} cannot change its dropout rate")
        model.set_dropout(dropout)

    @classmethod
    def set_dropout_mode(cls, model: nn.Module, mode: str) -> None:
        """Train ``model`` with a dropout mode (``DROPOUT_MODES``) from now on, recorded in checkpoints."""
        if not hasattr(model, "set_dropout_mode"):
            raise TaskError(f"task {cls.name!r}: a {type(model).__name__} has no structured dropout")
        model.set_dropout_mode(mode)

    @classmethod
    def output_size(cls, model: nn.Module) -> int | None:
        """Width of the model's logits' last axis (a distillation teacher must match it); None: unknown."""
        return None

    @classmethod
    def train_metric(cls, mean_loss: float) -> float:
        """The training metric of a mean training loss (``train_<train_metric_name>`` per epoch)."""
        return mean_loss

    # --- data (an instance) -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, data: DataConfig, train: TrainConfig, rank: int = 0, world_size: int = 1) -> "Task":
        """The task with its data, batched for ``train`` (this process's share under torchrun). Implement."""
        raise NotImplementedError(f"task {cls.name!r} does not implement load")

    def num_train_batches(self) -> int:
        raise NotImplementedError

    def train_batches(self, epoch: int = 1) -> Iterable[Any]:
        """The training batches of 1-based ``epoch``, in order. A task that shuffles or augments draws from its own
        generator seeded by the schedule's seed and ``epoch`` (never the global RNG), so that a run resumed
        inside an epoch sees the same batches again. Implement."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any, state: Any, with_loss: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """``(logits, loss, state)``: logits over the task's classes on the last axis (every position counts in
        distillation), the task's mean loss on ``batch`` (None unless ``with_loss``) and the state to carry to
        the next batch (None when batches are independent). Implement."""
        raise NotImplementedError

    def objective(self, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        """The loss the optimiser minimises, from the mean loss (a task may scale it to suit its learning rates)."""
        return loss

    def training_loss(self, model: nn.Module, batch: Any, state: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """``(objective, state, mean loss)``: what to minimise, the carried state, and the task's own mean loss
        (what ``train_metric`` reads)."""
        _, loss, state = self.forward(model, batch, state)
        return self.objective(loss, batch), state, loss.detach()

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """``{"loss": ..., <metric>: ..., ...}`` of ``model`` on ``split``, in eval mode. Implement."""
        raise NotImplementedError


def _require_field(task: type[Task], config: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(config) or name not in {f.name for f in dataclasses.fields(config)}:
        raise TaskError(f"the {task.name!r} task's model config has no {name!r} to change")
    return getattr(config, name)


# --- the registry -------------------------------------------------------------------------------------------------
TASKS: dict[str, type[Task]] = {}                      # registered tasks by name
BUILTIN_TASKS: dict[str, str] = {"ptb": "leanlstm.tasks.ptb", "digits": "leanlstm.tasks.digits",
                                  "text": "leanlstm.tasks.text"}  # imported when asked for


def register_task(task: type[Task]) -> type[Task]:
    """Class decorator: make ``task`` available by its ``name`` (``--task`` on the command line).

    >>> @register_task
    ... class Echo(Task):
    ...     name, metric = "echo-doc", "loss"
    >>> get_task("echo-doc") is Echo
    True
    >>> _ = TASKS.pop("echo-doc")
    """
    for attribute in ("name", "metric"):
        if not isinstance(getattr(task, attribute, None), str) or not getattr(task, attribute):
            raise TaskError(f"{task.__name__} needs a class attribute {attribute!r} (a non-empty string)")
    known = TASKS.get(task.name)
    if known is not None and (known.__module__, known.__qualname__) != (task.__module__, task.__qualname__):
        raise TaskError(f"task name {task.name!r} is already registered by {known.__module__}.{known.__qualname__}")
    if task.presets and task.default_preset not in task.presets:
        raise TaskError(f"{task.__name__}.default_preset {task.default_preset!r} is not one of its presets")
    for name, preset in task.presets.items():    # a run's schedule and model are its preset's, with overrides
        if not isinstance(preset.train, task.train_config_type):
            raise TaskError(f"preset {name!r} of {task.__name__} has a {type(preset.train).__name__}, not the "
                            f"task's {task.train_config_type.__name__}")
        if task.model_config_type is not None and not isinstance(preset.model, task.model_config_type):
            raise TaskError(f"preset {name!r} of {task.__name__} has a {type(preset.model).__name__} model config, "
                            f"not the task's {task.model_config_type.__name__}")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> type[Task]:
    """The task registered as ``name``.

    >>> get_task("ptb").metric_label
    'perplexity'
    """
    if name not in TASKS and name in BUILTIN_TASKS:
        importlib.import_module(BUILTIN_TASKS[name])
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    return sorted(set(TASKS) | set(BUILTIN_TASKS))
