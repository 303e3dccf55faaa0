"""One training loop for every task and compression method.

The task (``leanlstm.tasks.Task``) owns the data, the loss and the metrics; ``Trainer`` owns the loop, the
optimiser, clipping, the lr schedule and checkpoints. Methods never own the loop: they are ``Callback`` objects
that add loss terms and act around optimiser steps, and they work the same from a user's own loop (call
``extra_loss`` / ``after_step`` yourself).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
# bfloat16 runs the training forward pass under CPU autocast: matrix products and the fused LSTM kernel in bf16
# (faster only on CPUs with native bf16 arithmetic, AMX or AVX-512 BF16; BENCHMARKS.md has the measured gains), the
# loss and the weights, gradients and updates in float32. Evaluation always runs in float32, so reported
# metrics are comparable.
PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
MAX_LR = 1000.0         # beyond this no optimiser here trains: the weights leave float range within a few steps
MAX_SEED = 2**32 - 1    # numpy's generators take seeds below 2**32


# --- settings and their ranges ------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A setting outside its range; the message names the setting, its value and the range.

    ``renamed`` gives the same error under another name (the CLI's option for a config field).
    """

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} must {allowed}, got {value!r}")

    def renamed(self, name: str) -> "ConfigError":
        return ConfigError(name, self.value, self.allowed)


class Range(NamedTuple):
    """The values a numeric setting may take: ``low``..``high`` (either end open or unbounded), whole or not.

    >>> Range(0, 1, low_open=True).check("lr_decay", 0.5)
    >>> Range(0, 1, low_open=True).check("lr_decay", 0)
    Traceback (most recent call last):
    ...
    leanlstm.train.ConfigError: lr_decay must lie in (0, 1], got 0
    >>> Range(1, 100, integer=True).describe()
    'be at least 1 and at most 100 (a whole number)'
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    note: str = ""               # what special values mean, e.g. "0: no clipping"

    def describe(self) -> str:
        """What a value must do, to follow "must": counts and factors are "at least" their lower bound (the upper
        one is a sanity cap), shares and rates "lie in" their interval."""
        low, high = _number(self.low), _number(self.high)
        most = "" if self.high is None else f" and {'below' if self.high_open else 'at most'} {high}"
        if self.low is not None and not self.low_open and (self.integer or self.low >= 1):
            text = f"be at least {low}{most}"
        elif self.low is None and self.high is None:
            text = "be a finite number"
        elif self.high is None:
            text = f"be {'greater than' if self.low_open else 'at least'} {low}"
        elif self.low is None:
            text = f"be {'below' if self.high_open else 'at most'} {high}"
        else:
            text = f"lie in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        notes = [note for note in ("a whole number" if self.integer else "", self.note) if note]
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value: Any) -> None:
        if self.contains(value):
            return
        if self.integer and isinstance(value, float) and math.isfinite(value) and self.contains(int(value)):
            raise ConfigError(name, value, "be a whole number")      # the one thing wrong with it
        raise ConfigError(name, value, self.describe())


def _number(value: float | None) -> str:
    """Bounds as people write them: 1000000, 0.5, 1e+12."""
    if value is not None and float(value).is_integer() and abs(value) < 1e10:
        return str(int(value))
    return f"{value:g}" if value is not None else ""


COUNT = Range(0, 10**9, integer=True)            # a field of a subclass without a range of its own
AMOUNT = Range(0, 1e12)


def check_ranges(config: Any, ranges: dict[str, Range], optional: tuple[str, ...] = ()) -> None:
    """Check every numeric field of the dataclass ``config`` against ``ranges`` (fields without one: whole numbers
    in [0, 1e9] or finite numbers in [0, 1e12]); ``optional`` fields may also be None."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None and field.name in optional:
            continue
        if field.name in ranges:
            ranges[field.name].check(field.name, value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            (COUNT if isinstance(value, int) else AMOUNT).check(field.name, value)


def available_memory() -> int | None:
    """Bytes of memory this process may still take: Linux's MemAvailable, else all physical memory; None: unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(name: str, value: Any, needed: float, what: str) -> None:
    """Refuse a request that needs more memory than the machine has, before anything is allocated."""
    free = available_memory()
    if free is not None and needed > free:
        raise ConfigError(name, value, f"fit in memory: {what} would take {needed / 2**30:,.1f} GiB and "
                                       f"{free / 2**30:,.1f} GiB is available")


@dataclass
class TrainConfig:
    """The schedule every task shares; a task with settings of its own subclasses it (``Task.train_config_type``)
    and may extend ``ranges`` for its fields (other numeric fields must be finite and >= 0).

    Every setting is checked on construction:

    >>> TrainConfig(clip=-5)
    Traceback (most recent call last):
    ...
    leanlstm.train.ConfigError: clip must lie in [0, 1000000] (0: no clipping), got -5
    """

    ranges: ClassVar[dict[str, Range]] = {
        "epochs": Range(0, 10**6, integer=True, note="0: a phase that trains nothing"),
        "batch_size": Range(1, 10**6, integer=True),
        "lr": Range(0, MAX_LR, low_open=True), "lr_decay": Range(0, 1, low_open=True),
        "decay_after": Range(0, 10**6, integer=True), "clip": Range(0, 1e6, note="0: no clipping"),
        "seed": Range(0, MAX_SEED, integer=True), "max_batches": Range(1, 10**12, integer=True),
        "checkpoint_minutes": Range(0, 1e6, note="0: at epoch ends only")}

    epochs: int = 13                 # passes over the training split
    batch_size: int = 20             # global batch (split across processes under torchrun)
    lr: float = 1.0                  # learning rate (of the loss as the task scales it: ``Task.objective``)
    lr_decay: float = 0.5            # lr factor per epoch once decay starts
    decay_after: int = 4             # epochs at the full lr
    clip: float = 5.0                # gradient-norm clipping (0: none)
    seed: int = 1234                 # initialisation and dropout
    max_batches: int | None = None   # per epoch; None = all (smoke runs set it)
    checkpoint_minutes: float = 10.0  # also checkpoint inside an epoch this often (0: at epoch ends only)
    precision: str = "float32"       # of the training forward pass: float32, or bfloat16 (autocast; see PRECISIONS)
    optimizer: str = "sgd"           # sgd (plain, no momentum) or adam; see OPTIMIZERS
    device: str = "cpu"              # where training runs: cpu, cuda, cuda:1, ... (evaluation follows the model)

    def __post_init__(self) -> None:
        check_ranges(self, self.ranges, optional=("max_batches",))
        try:    # only the name here: a run trained on a GPU must stay readable where there is none
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError("device", self.device, "name a torch device such as cpu, cuda or cuda:1") from None
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", self.precision, f"be one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", self.optimizer, f"be one of {', '.join(OPTIMIZERS)}")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch``."""
        return self.lr * self.lr_decay ** max(epoch - self.decay_after, 0)


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a validation metric became NaN or infinite."""


class NoTrainingData(ValueError):
    """The training split gives not one batch: an epoch would train nothing."""


class Callback:
    """Hooks a compression method into training. Every hook is optional."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def extra_loss(self, trainer: "Trainer") -> torch.Tensor | None: return None  # added to the task loss
    def before_step(self, trainer: "Trainer") -> None: ...                          # gradients are ready
    def after_step(self, trainer: "Trainer") -> None: ...                           # weights were updated
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict[str, float]) -> None: ...
    def on_model_replaced(self, trainer: "Trainer") -> None: ...      # trainer.model is a new module now
    def state_dict(self) -> dict[str, Any]: return {}
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Trains ``model`` on ``task`` with the configured optimiser, clipping and a per-epoch lr schedule;
    checkpoints every epoch and, in single-process runs, every ``checkpoint_minutes`` inside an epoch (an epoch
    may take many minutes on a CPU; resuming from inside one continues exactly where it stopped: same batches,
    carried state, RNG).

    ``task`` is a loaded ``leanlstm.tasks.Task`` (or anything with its members): ``train_batches(epoch)``,
    ``num_train_batches()``, ``training_loss(model, batch, state)``, ``evaluate(model, split)``, ``metric``,
    ``train_metric(mean_loss)``, ``train_metric_name`` and ``model_config(model)`` for checkpoints.
    ``training_loss`` returns ``(loss, state)``, or ``(loss, state, mean_loss)`` when the loss it optimises is
    not the task's own mean loss (a task that scales it, ``tasks.distill.Distillation``): the training metric is
    then ``mean_loss``'s.
    """

    def __init__(self, model: nn.Module, task, config: TrainConfig, run_dir: str | Path | None = None,
                 callbacks: Sequence[Callback] = (), progress: bool = False,
                 run_info: dict[str, Any] | None = None, phase: str = "train",
                 history: Sequence[dict[str, Any]] = ()) -> None:
        self.task, self.config = task, config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks, self.progress, self.run_info = list(callbacks), progress, run_info or {}
        self.phase = phase      # name of this training phase of the run (train, compress, finetune)
        self.epoch = 0          # epochs completed in this phase
        self.step = 0           # optimiser steps taken in this phase
        self.history: list[dict[str, Any]] = list(history)  # earlier phases' epochs come first
        self.within_epoch: dict[str, Any] | None = None  # where an interrupted epoch stopped (from resume)
        self.last_loss: torch.Tensor | None = None   # the task's mean loss of the batch being trained (callbacks)
        self._last_save = time.perf_counter()
        self._bind(model, config.lr)

    def _bind(self, model: nn.Module, lr: float) -> None:
        """Train ``model`` (moved to the configured device): a fresh optimiser over its parameters, and its DDP
        wrapper under torchrun."""
        model = model.to(training_device(self.config.device))
        self.model, self.train_model = model, model
        self.optimizer = OPTIMIZERS[self.config.optimizer](model.parameters(), lr=lr)
        if distributed.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(model)

    def replace_model(self, model: nn.Module) -> None:
        """Train ``model`` from here on, e.g. a smaller one a method cut out of the current one at an epoch end.

        The optimiser starts afresh over the new parameters at the current lr: plain SGD keeps no state, so
        nothing is lost (Adam's moments start over). Checkpoints save the new model with the task's
        ``model_config``, and resuming rebuilds it.
        """
        self._bind(model, self.optimizer.param_groups[0]["lr"])
        for callback in self.callbacks:    # those holding per-parameter state (masks) take it from the new model
            callback.on_model_replaced(self)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the per-epoch history."""
        for callback in self.callbacks:
            callback.on_train_begin(self)
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            started = time.perf_counter() - (self.within_epoch or {}).get("seconds", 0.0)
            lr = self.config.lr_at(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            train_loss = self.train_epoch(epoch)
            metrics = {"phase": self.phase, "epoch": epoch, "lr": lr, "train_loss": train_loss,
                       f"train_{self.task.train_metric_name}": self.task.train_metric(train_loss)}
            metrics |= {f"val_{k}": v for k, v in self.evaluate("valid").items()}
            for key, value in metrics.items():      # e.g. a finite loss whose perplexity overflows
                if key.startswith(("train_", "val_")) and isinstance(value, (int, float)):
                    self._check_finite(value, key.replace("val_", "validation ").replace("_", " "), epoch)
            metrics["seconds"] = time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_epoch_end(self, epoch, metrics)
            self.history.append(metrics)
            self.epoch = epoch
            train, metric = self.task.train_metric_name, self.task.metric
            log.info("%s epoch %d  lr %.4g  train %s %.2f  valid %s %.2f  (%.0f s)", self.phase, epoch, lr,
                     train, metrics[f"train_{train}"], metric, metrics[f"val_{metric}"], metrics["seconds"])
            self.save()
        return self.history

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training batches; returns the mean of the task's per-batch mean losses."""
        self.train_model.train()
        total, batches, state, done = 0.0, 0, None, 0
        if self.within_epoch is not None and self.within_epoch["epoch"] == epoch:
            total, done, state = self.within_epoch["total"], self.within_epoch["batches"], self.within_epoch["state"]
        self.within_epoch = None
        epoch_started = time.perf_counter()
        limit = self.task.num_train_batches()
        if limit < 1:
            raise self._no_batches()
        if self.config.max_batches is not None:
            limit = min(limit, self.config.max_batches)
        bar = tqdm(total=limit, desc=f"epoch {epoch}/{self.config.epochs}", leave=False, unit="batch",
                   disable=not self.progress or distributed.rank() != 0)
        for batch in self.task.train_batches(epoch):
            if batches == limit:
                break
            if batches < done:                   # resumed inside this epoch: skip the batches already trained
                batches += 1
                bar.update()
                continue
            batch = to_device(batch, self.config.device)
            with self._autocast():
                loss, state, *reported = self.task.training_loss(self.train_model, batch, state)
            state = _detach(state)
            self.last_loss = (reported[0] if reported else loss).detach()
            self.optimise(loss, epoch, batches)
            total += float(self.last_loss)
            batches += 1
            bar.update()
            if batches % 50 == 0:
                bar.set_postfix({self.task.train_metric_name: f"{self.task.train_metric(total / batches):.1f}"})
            if self._checkpoint_due() and batches < limit:
                self.save({"epoch": epoch, "batches": batches, "total": total, "state": state,
                           "seconds": time.perf_counter() - epoch_started})
        bar.close()
        if batches == 0:
            raise self._no_batches()
        return total / batches

    def _no_batches(self) -> NoTrainingData:
        return NoTrainingData(f"the training split gives no batch of {self.config.batch_size}: there is nothing to "
                              f"train; use more of the data (a larger --max-items, or none)")

    def _autocast(self) -> torch.autocast:
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.config.precision == "bfloat16")

    def optimise(self, loss: torch.Tensor, epoch: int | None = None, batch: int | None = None) -> None:
        """Backward, clip, step, with the callbacks' loss terms and hooks.

        Refuses (``TrainingDiverged``) a step whose total loss or gradient is not finite, before it touches the
        weights: a finite loss can still have an infinite gradient, and a NaN weight would otherwise reach the
        next checkpoint.
        """
        what = "training loss"
        for callback in self.callbacks:
            extra = callback.extra_loss(self)
            if extra is not None:
                loss, what = loss + extra, "loss with the method's terms"
        self._check_finite(loss, what, epoch, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self._check_finite(norm, "gradient norm", epoch, batch)
        for callback in self.callbacks:
            callback.before_step(self)
        self.optimizer.step()
        self.step += 1
        for callback in self.callbacks:
            callback.after_step(self)

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on ``split``, computed on rank 0 and shared with the other processes."""
        result = self.task.evaluate(self.model, split) if distributed.rank() == 0 else None
        return distributed.broadcast_object(result)

    def _check_finite(self, value: float | torch.Tensor, what: str, epoch: int | None, batch: int | None = None
                      ) -> None:
        value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if math.isfinite(value):
            return
        at = "" if epoch is None else f" at epoch {epoch}" + ("" if batch is None else f", batch {batch}")
        path = self.checkpoint_path
        where = f"the last good checkpoint is {path}; " if path is not None and path.exists() else ""
        raise TrainingDiverged(f"{what} became {value}{at}: {where}lower the learning rate (--lr), the "
                               f"gradient clipping norm or the method's strength")

    # --- checkpoints ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"phase": self.phase, "model_config": self.task.model_config(self.model),
                "model_state": self.model.state_dict(),
                "optimizer_state": self.optimizer.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "rng_state": torch.get_rng_state(), "run_info": self.run_info,
                "callbacks": [c.state_dict() for c in self.callbacks]}

    def save(self, within_epoch: dict[str, Any] | None = None) -> None:
        """Checkpoint; ``within_epoch`` (epoch, batches done, running loss, carried state) marks a save from
        inside an epoch, which resuming continues rather than repeats."""
        if self.checkpoint_path is not None:    # every rank checks (their weights are equal), rank 0 saves
            bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
            if bad:      # never replace a good checkpoint with a broken model
                raise TrainingDiverged(f"not saving {self.checkpoint_path}: {', '.join(bad[:3])} hold NaN or "
                                       f"infinite values; lower the learning rate (--lr) and resume")
        if self.checkpoint_path is not None and distributed.rank() == 0:
            save_checkpoint(self.checkpoint_path, self.state() | {"within_epoch": within_epoch})
        self._last_save = time.perf_counter()
        distributed.barrier()

    def _checkpoint_due(self) -> bool:
        # Single process only: under torchrun every rank carries its own state, and rank 0 saves alone.
        minutes = self.config.checkpoint_minutes
        return (bool(minutes) and self.checkpoint_path is not None and not distributed.is_distributed()
                and time.perf_counter() - self._last_save >= 60 * minutes)

    def resume(self, path: str | Path | None = None, payload: dict[str, Any] | None = None) -> None:
        """Continue from a checkpoint: weights, optimiser, epoch, history, RNG and callback states."""
        path = Path(path) if path is not None else self.checkpoint_path
        payload = payload if payload is not None else load_checkpoint(path)
        if payload.get("phase", "train") != self.phase:
            raise CheckpointError(f"{path} is from the {payload.get('phase')!r} phase, not {self.phase!r}")
        load_state(self.model, payload["model_state"], path)
        self.optimizer.load_state_dict(payload["optimizer_state"])
        self.epoch, self.step, self.history = payload["epoch"], payload["step"], payload["history"]
        torch.set_rng_state(payload["rng_state"])
        for callback, state in zip(self.callbacks, payload["callbacks"]):
            callback.load_state_dict(state)
        self.within_epoch = payload.get("within_epoch")
        if self.within_epoch is not None:
            log.info("resumed from %s inside epoch %d, after %d batches", path, self.within_epoch["epoch"],
                     self.within_epoch["batches"])
        else:
            log.info("resumed from %s after epoch %d", path, self.epoch)


def training_device(name: str) -> torch.device:
    """The device ``name`` (``TrainConfig.device``), refused with what to do when this machine lacks it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "be one this machine has: PyTorch sees no CUDA device here (use cpu, or "
                                          "install a CUDA build of PyTorch on a machine with a GPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError("device", name, f"be one this machine has: it has {torch.cuda.device_count()} CUDA "
                                          f"device(s), numbered from 0")
    return device


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor in it on ``device``: tensors, and tuples (named too), lists, dicts and dataclasses
    of them; anything else is returned as it is.

    >>> to_device((torch.ones(2), [torch.zeros(1)], "label"), "cpu")[2]
    'label'
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (cpu for a model without any): tasks move evaluation batches there."""
    return next(iter(model.parameters()), torch.empty(0)).device


def _detach(state):
    """Cut the graph between batches; state that autocast left in bfloat16 is carried on in float32."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach().float() if state.dtype == torch.bfloat16 else state.detach()
    return type(state)(_detach(s) for s in state)
