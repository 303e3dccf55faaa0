"""TensorBoard logging of a run (``--tensorboard`` on ``train`` and ``compress``): a ``leanlstm.train.Callback``.

Every scalar goes to ``RUN_DIR/tensorboard`` (or any ``log_dir``) at the run's optimiser step counted across its
phases (compression, then fine-tuning), so that one run reads as one curve:

- every ``every`` steps: ``step/train_loss`` (the task's training loss of that batch) and ``step/lr``;
- every epoch: ``train/*`` and ``val/*`` (the epoch's losses and metrics), ``lr``, ``epoch``, ``time/epoch_seconds``,
  ``method/*`` (what the method added to the epoch's record: ISS's surviving components per layer, say),
  ``model/lstm_params``, ``model/lstm_compression`` (dense over stored LSTM parameters, against the sizes the
  model has now) and ``model/hidden_size/layerN`` (alive units, as structured methods shrink them).

Only the first process of a distributed run writes. A resumed run continues the same curves: TensorBoard hides
what the interrupted process wrote after the step the run resumes from (``purge_step``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .train import Callback

log = logging.getLogger(__name__)
LOG_DIR = "tensorboard"           # under the run directory
GROUPS = {"train_": "train/", "val_": "val/"}


class TensorBoard(Callback):
    """Scalars of a training or compression run for TensorBoard; add it *last* to a phase's callbacks, so that
    the methods' epoch numbers are in the record when it is written.

    >>> import tempfile, torch
    >>> from leanlstm.train import Trainer, TrainConfig
    >>> class Tiny:                              # the members of a task the Trainer needs
    ...     metric, train_metric_name = "loss", "loss"
    ...     def num_train_batches(self): return 2
    ...     def train_batches(self, epoch): return [torch.ones(4, 3)] * 2
    ...     def training_loss(self, model, batch, state): return model(batch).pow(2).mean(), None
    ...     def train_metric(self, loss): return loss
    ...     def evaluate(self, model, split): return {"loss": 0.5}
    ...     def model_config(self, model): return {}
    >>> board = TensorBoard(tempfile.mkdtemp(), every=1)
    >>> _ = Trainer(torch.nn.Linear(3, 1), Tiny(), TrainConfig(epochs=1, lr=0.1), callbacks=[board]).fit()
    >>> board.close(); board.global_step
    2
    """

    def __init__(self, log_dir: str | Path | None = None, every: int = 20) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1 (log the training loss every N steps), got {every}")
        self.log_dir = Path(log_dir) if log_dir is not None else None   # None: RUN_DIR/tensorboard
        self.every = every
        self.writer = None
        # the step count goes on across phases; each phase's Trainer counts from 0 (state saved in checkpoints)
        self.phase: str | None = None
        self.offset = 0            # steps of the earlier phases
        self.phase_steps = 0       # steps of the current phase so far

    @property
    def global_step(self) -> int:
        return self.offset + self.phase_steps

    def on_train_begin(self, trainer) -> None:
        if trainer.phase != self.phase:
            if self.phase is not None:          # a new phase: its steps come after the last one's
                self.offset += self.phase_steps
            self.phase = trainer.phase
        self.phase_steps = trainer.step          # 0, or where a resumed phase stopped
        if distributed.rank() == 0 and self.writer is None:
            self.writer = self._open(trainer)

    def _open(self, trainer):
        from torch.utils.tensorboard import SummaryWriter   # imports tensorboard: only when asked for

        directory = self.log_dir
        if directory is None:
            if trainer.run_dir is None:
                raise ValueError("TensorBoard() needs a log_dir when the Trainer has no run directory")
            directory = trainer.run_dir / LOG_DIR
        step = self.global_step
        log.info("TensorBoard: writing to %s (tensorboard --logdir %s)", directory, directory)
        # a resumed run: hide what the interrupted process logged after this step (it is trained again)
        return SummaryWriter(str(directory), purge_step=step if step > 0 else None)

    def after_step(self, trainer) -> None:
        self.phase_steps = trainer.step
        if self.writer is None or self.global_step % self.every:
            return
        if trainer.last_loss is not None:      # a tensor: read (a device sync) only every ``every`` steps
            self.writer.add_scalar("step/train_loss", float(trainer.last_loss), self.global_step)
        self.writer.add_scalar("step/lr", trainer.optimizer.param_groups[0]["lr"], self.global_step)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self.phase_steps = trainer.step
        if self.writer is None:
            return
        scalars = epoch_scalars(metrics) | model_scalars(trainer.model)
        scalars["epoch"] = len(trainer.history) + 1      # epochs of all phases, this one included
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.global_step)
        self.writer.flush()          # an epoch's numbers are visible while the next one trains

    def close(self) -> None:
        """Flush and close the event file (the process may also just end: every epoch is flushed)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "offset": self.offset, "phase_steps": self.phase_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = state.get("phase")
        self.offset = state.get("offset", 0)
        self.phase_steps = state.get("phase_steps", 0)


def epoch_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tags and values of an epoch's record: losses and metrics under ``train/`` and ``val/``, the
    method's numbers under ``method/`` (a list: one tag per entry, e.g. a layer's surviving units).

    >>> epoch_scalars({"phase": "compress", "epoch": 1, "lr": 1.0, "train_loss": 5.0, "val_ppl": 150.0,
    ...                "seconds": 3.0, "iss_components": [30, 28]})  # doctest: +NORMALIZE_WHITESPACE
    {'lr': 1.0, 'train/loss': 5.0, 'val/ppl': 150.0, 'time/epoch_seconds': 3.0, 'method/iss_components/0': 30.0,
     'method/iss_components/1': 28.0}
    """
    scalars: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("epoch", "phase"):          # the epoch is logged across phases; the phase is not a number
            continue
        tag = _tag(key)
        if _is_number(value):
            scalars[tag] = float(value)
        elif isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            scalars |= {f"{tag}/{index}": float(v) for index, v in enumerate(value)}
    return scalars


def _tag(key: str) -> str:
    if key == "lr":
        return "lr"
    if key == "seconds":
        return "time/epoch_seconds"
    for prefix, group in GROUPS.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return f"method/{key}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_scalars(model: torch.nn.Module) -> dict[str, float]:
    """The model's LSTM numbers now: stored parameters, compression (dense over stored) and per-layer sizes."""
    from .runs import lstm_numbers     # runs imports the trainer; this module must stay importable from it

    numbers = lstm_numbers(model)
    if not numbers["lstm_params"]:
        return {}
    scalars = {"model/lstm_params": float(numbers["lstm_params"]),
               "model/lstm_compression": numbers["dense_lstm_params"] / numbers["lstm_params"]}
    sizes = numbers["hidden_sizes"]
    if isinstance(sizes, list):          # one stack; several stacks: their sizes are a dict, left out
        scalars |= {f"model/hidden_size/layer{index}": float(size) for index, size in enumerate(sizes)}
    return scalars
