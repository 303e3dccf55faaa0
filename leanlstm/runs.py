"""Run directories: what ``leanlstm train`` writes and ``leanlstm eval`` / ``bench`` read, for any task.

A run directory holds ``config.json`` (what was asked, the task included), ``checkpoint.pt`` (latest epoch,
atomic), ``log.txt`` and, once finished, ``metrics.json`` (``val_<metric>`` and ``test_<metric>`` of the task's
metric, sizes and parameter counts of the model's LSTMs, the per-epoch history). Nothing in it is ever
overwritten by a new run.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, load_state
from .files import FileProblem, leftover_temp_files, read_json, write_json
from .graph import find_heads, find_lstms
from .methods import config_for, get_method
from .nn import FormLinear
from .nn.forms.base import FLOAT_BYTES
from .tasks import DataConfig, Preset, Task, TaskError, get_task
from .tasks.distill import DistillConfig, Distillation
from .train import CHECKPOINT, ConfigError, Range, Trainer, TrainConfig, TrainingDiverged, training_device

log = logging.getLogger(__name__)
CONFIG, METRICS, LOG, LOCK = "config.json", "metrics.json", "log.txt", ".lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


# the command-line option of each RunConfig field (``--set KEY`` for the method's own options)
OPTIONS = {"max_tokens": "--max-items", "verify_data": "--no-verify-data", "source": "--from",
           "hidden_sizes": "--hidden-sizes", "dropout": "--dropout",
           "dropout_mode": "--dropout-mode", "latency_repeats": "--latency-repeats",
           "distill_from": "--distill-from", "distill_weight": "--distill-weight",
           "distill_temperature": "--distill-temperature"}
# what makes a run's model: a checkpoint written by a run that differs in these belongs to another run
MODEL_FIELDS = ("task", "preset", "method", "hidden_sizes", "dropout", "dropout_mode", "source", "method_config")


def option(name: str, prefix: str = "") -> str:
    """``lr_decay`` -> ``--lr-decay``; with ``prefix="finetune"``, ``--finetune-lr-decay``."""
    return "--" + "-".join(filter(None, (prefix, name.replace("_", "-"))))


@dataclass
class RunConfig:
    task: str = "ptb"                       # a registered task (leanlstm.tasks.get_task)
    preset: str | None = None               # one of the task's presets; None: the task's default
    method: str = "baseline"
    data_dir: str | None = None
    max_tokens: int | None = None           # only the first items (tokens, utterances) of every split (smoke runs)
    verify_data: bool = True                # checksums of the data files
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields changed on the command line
    command: str = ""
    method_config: dict[str, Any] = field(default_factory=dict)       # the method's own options
    source: str | None = None                                         # run directory compressed from
    finetune_overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of fine-tuning
    latency_repeats: int = 20          # compressed runs: batch-1 latency samples at the end (0: don't measure)
    hidden_sizes: list[int] | None = None   # per-layer LSTM sizes instead of the preset's (e.g. ISS's found sizes)
    dropout: float | None = None            # dropout instead of the preset's (or the --from run's)
    dropout_mode: str | None = None         # a mode (MODE or MODE/N) instead of the preset's (or --from run's)
    vocab_size: int | None = None           # vocabulary cap instead of the preset's (the text task)
    distill_from: str | None = None         # run directory of a teacher to distil from, in every phase
    distill_weight: float = 0.5             # share of the teacher's soft targets in the training loss
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        """Unknown tasks, presets of another task, settings out of range and models too large for memory fail
        here, before a run directory is made or data is read; a ``ConfigError`` names the command-line option."""
        if self.dropout is not None:
            Range(0, 1, high_open=True).check("--dropout", self.dropout)
        Range(0, 10**6, integer=True, note="0: skip").check("--latency-repeats", self.latency_repeats)
        try:
            self.distill_config()
            self.preset = self.preset or self.task_type().default_preset
            self.task_type().preset(self.preset)
        except ConfigError:
            raise
        except ValueError as error:
            raise RunDirError(str(error)) from None
        self.check()

    def check(self) -> None:
        """Build every config of the run once, so that each checks its ranges, under its option's name."""
        _as_option(self.data_config, {"limit": "--max-items"})
        train = _as_option(self.train_config, {name: option(name) for name in self.overrides}, "the preset's ")
        if train.epochs < 1 and self._method_default("compress_epochs") != 0:
            # only fine-tuning may train no epoch (the method's final step alone), or a method whose compression
            # needs no training (post-training quantisation)
            Range(1, 10**6, integer=True).check(option("epochs") if "epochs" in self.overrides else "the preset's "
                                                "epochs", train.epochs)
        _as_option(self.finetune_config, {name: option(name, "finetune") for name in self.finetune_overrides},
                   "fine-tuning (from the compression phase's settings) ")
        if self.method != "baseline":       # its errors name the option as the method's config calls it
            get_method(self.method)(config_for(self.method, self.method_config))
        self._configured_model()           # the options only: fitting to the data reads it (model_config)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(self.distill_weight, self.distill_temperature)

    def task_type(self) -> type[Task]:
        return get_task(self.task)

    def preset_config(self) -> Preset:
        return self.task_type().preset(self.preset)

    def data_config(self) -> DataConfig:
        return DataConfig(self.data_dir, self.max_tokens, self.verify_data)

    def model_config(self) -> Any:
        """The preset's model config with this run's ``--dropout``, ``--hidden-sizes`` and ``--vocab-size``, fitted
        to the run's data by the task (e.g. the text task's vocabulary to its corpus)."""
        return self.task_type().fit_model_config(self._configured_model(), self.data_config())

    def _configured_model(self) -> Any:
        """The preset's model config with this run's options, checked; not yet fitted to the data."""
        task, config = self.task_type(), self.preset_config().model
        for option, change in (("--dropout", {"dropout": self.dropout}),
                               ("--dropout-mode", {"dropout_mode": self.dropout_mode}),
                               ("--hidden-sizes", {"hidden_sizes": self.hidden_sizes}),
                               ("--vocab-size", {"vocab_size": self.vocab_size})):
            if None not in change.values():
                try:
                    config = task.configure_model(config, **change)
                except ConfigError as error:
                    raise error.renamed(option) from None
                except TaskError as error:
                    raise RunDirError(f"{option} for preset {self.preset!r} of task {self.task!r}: {error}") from None
        return config

    def _method_default(self, name: str) -> Any:
        """A default the run's method sets for its phases (``Method.compress_epochs`` ...), or None."""
        return getattr(get_method(self.method), name, None) if self.method != "baseline" else None

    def train_config(self) -> TrainConfig:
        train = self.preset_config().train
        epochs = self._method_default("compress_epochs")
        overrides = ({"epochs": epochs} if epochs is not None else {}) | self.overrides
        try:
            return replace(train, **overrides)
        except TypeError:
            unknown = sorted(set(self.overrides) - {f.name for f in fields(train)})
            raise RunDirError(f"task {self.task!r} has no training setting {', '.join(unknown)}") from None

    def finetune_config(self) -> TrainConfig:
        """Fine-tuning continues from the compression phase's last lr and decays every epoch by default."""
        train = self.train_config()
        if train.epochs == 0:       # no compression training: fine-tuning starts at the lr training ended with
            train = replace(self.preset_config().train, **{k: v for k, v in self.overrides.items() if k != "epochs"})
        epochs = self._method_default("finetune_epochs")
        defaults = {"epochs": 3 if epochs is None else epochs, "lr": train.lr_at(train.epochs), "decay_after": 1}
        try:
            return replace(train, **(defaults | self.finetune_overrides))
        except TypeError:
            unknown = sorted(set(self.finetune_overrides) - {f.name for f in fields(train)})
            raise RunDirError(f"task {self.task!r} has no fine-tuning setting {', '.join(unknown)}") from None


def _as_option(build: Callable[[], Any], options: dict[str, str], other: str = "") -> Any:
    """``build()``, with a ``ConfigError`` renamed to the option that set the value (``other`` + the field's name
    when no option did: a preset's own value, say)."""
    try:
        return build()
    except ConfigError as error:
        raise error.renamed(options.get(error.name, other + error.name)) from None


def prepare(out: Path, resume: bool) -> None:
    """Refuse to clobber: a finished run stays finished; an unfinished one needs ``--resume``. A run that
    stopped before its first checkpoint (only ``config.json`` and ``log.txt``) starts over in place."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a run directory; choose another --out")
    if (out / METRICS).exists():
        raise RunDirError(f"{out} already holds a finished run ({METRICS}); choose another --out, or read it "
                          f"with `leanlstm eval {out}`")
    if resume and not (out / CHECKPOINT).exists():
        raise RunDirError(f"--resume given but {out} has no {CHECKPOINT}; drop --resume to start a new run")
    if resume and not (out / CONFIG).is_file():
        raise RunDirError(f"{out} has a {CHECKPOINT} but no {CONFIG}, so it cannot be resumed: restore {CONFIG} "
                          f"from a backup, or start a new run in another --out")
    if not resume and out.exists():
        names = {path.name for path in out.iterdir()}
        if names and not names <= {CONFIG, LOG, LOCK}:
            missing = [name for name in (CONFIG, CHECKPOINT) if name not in names]
            if missing:
                raise RunDirError(f"{out} is not empty; pass --resume only to continue a leanlstm run, and it holds "
                                  f"none ({' and '.join(missing)} missing): choose another --out")
            raise RunDirError(f"{out} is not empty; pass --resume to continue the run there, or choose another "
                              f"--out")
        if names:
            log.warning("%s holds a run that stopped before its first checkpoint; starting it over", out)


@contextmanager
def exclusive(out: Path, resume: bool) -> Iterator[None]:
    """Own ``out`` while training in it: a second process resuming the same run (a sweep restarted while the
    first still runs, say) would interleave checkpoints and delete the other's half-written files, so it is
    refused. Then ``prepare`` it, and remove the temporary files of a write that a hard kill interrupted (the
    write they belonged to never happened)."""
    # lock before judging a directory that exists (another process may be writing it); a new one is made, and
    # locked, only once ``prepare`` accepts it, so a refused command leaves nothing behind
    lock = _lock(out) if out.exists() else None
    try:
        prepare(out, resume)
        out.mkdir(parents=True, exist_ok=True)
        lock = lock or _lock(out)
        for leftover in leftover_temp_files(out):
            log.warning("removing %s, left by an interrupted write", leftover)
            leftover.unlink()
        yield
    finally:
        if lock is not None:
            lock.close()        # closing the file releases the lock (so does the process's death)


def training_pid(out: str | Path) -> str | None:
    """The pid of the process training in ``out`` now (it holds the run's lock), else None."""
    path = Path(out) / LOCK
    if not path.is_file():
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)   # gets it only if nobody trains here
        except BlockingIOError:
            return _holder(handle)
        return None


def _stopped(pid: str) -> bool:
    """Whether process ``pid`` is stopped by a signal (SIGSTOP, to free a core, say). Linux's /proc; elsewhere
    not known, so False."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "T"     # the state follows the parenthesised command name


def _holder(handle) -> str:
    """The pid the lock's holder wrote ("unknown" in the instant between its lock and its write)."""
    handle.seek(0)
    return handle.read().strip() or "unknown"


def _lock(out: Path):
    handle = open(out / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise RunDirError(f"{out} is being trained by another process (pid {holder}); wait for it to finish, "
                          f"or stop it before resuming") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def saved_run(out: str | Path, run: RunConfig) -> RunConfig:
    """The configuration ``out`` was started with: a resumed run continues as it was asked, whatever the
    command line says now (except ``--data-dir``, which may move); options that ask otherwise are named in a
    warning."""
    out = Path(out)
    prepare(out, resume=True)           # finished, or nothing to resume: say so first
    saved = read_config(out)
    if (saved.task, saved.preset, saved.method) != (run.task, run.preset, run.method):
        raise RunDirError(f"{out} holds a {saved.task}/{saved.preset}/{saved.method} run; resume it with the "
                          f"same --task/--preset/--method")
    ignored = ignored_options(run, saved)
    if ignored:
        log.warning("%s continues as it was started, so these options are ignored: %s (start a new run in another "
                    "--out to use them)", out, "; ".join(ignored))
    return replace(saved, data_dir=run.data_dir or saved.data_dir)


def ignored_options(asked: RunConfig, saved: RunConfig) -> list[str]:
    """The options of ``asked`` (a resume's command line) that differ from the run ``saved`` as it was started:
    ``"--epochs 7 (the run has 2)"``. An option left at its default counts as not given."""
    ignored = []
    for name, train, prefix in (("overrides", RunConfig.train_config, ""),
                                ("finetune_overrides", RunConfig.finetune_config, "finetune")):
        for key, value in getattr(asked, name).items():
            theirs = getattr(train(saved), key, None)
            if value != theirs:
                ignored.append(f"{option(key, prefix)} {value} (the run has {theirs})")
    defaults = RunConfig.__dataclass_fields__
    for name, flag in OPTIONS.items():
        value, theirs = getattr(asked, name), getattr(saved, name)
        if value != theirs and value != defaults[name].default:
            ignored.append(f"{flag} (the run checks its data files)" if name == "verify_data" else
                           f"{flag} {value} (the run has {theirs})")
    if asked.method != "baseline":
        standard = get_method(asked.method).Config().to_dict()
        for key, value in asked.method_config.items():
            if value != saved.method_config.get(key) and value != standard.get(key):
                ignored.append(f"--set {key}={value} (the run has {saved.method_config.get(key)})")
    return ignored


@contextmanager
def logging_to(out: Path) -> Iterator[None]:
    """leanlstm's log lines go to ``out/log.txt`` while the run trains, and only then: runs made one after
    another in one process (a notebook, the tests) each keep their own log."""
    handler = logging.FileHandler(out / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("leanlstm")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def build_task(run: RunConfig, train: TrainConfig, rank: int = 0, world_size: int = 1) -> Task:
    """``run``'s task with its data, batched for ``train`` (this process's share under torchrun)."""
    return run.task_type().load(run.data_config(), train, rank, world_size)


def load_teacher(run_dir: str | Path, run: RunConfig) -> nn.Module:
    """The trained model of ``run_dir``, checked to be of ``run``'s task (``check_teacher`` compares outputs)."""
    teacher_run, teacher, _ = load_run(run_dir)
    if teacher_run.task != run.task:
        raise RunDirError(f"--distill-from {run_dir} is a {teacher_run.task} model; this run is {run.task}: distil "
                          f"from a run of the same task")
    if not (Path(run_dir) / METRICS).is_file():
        log.warning("--distill-from %s has not finished training (no %s): distilling from its latest checkpoint",
                    run_dir, METRICS)
    return teacher


def check_teacher(run: RunConfig, teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher whose logits are not over the student's classes, before training starts."""
    task = run.task_type()
    theirs, ours = task.output_size(teacher), task.output_size(student)
    if theirs is not None and ours is not None and theirs != ours:
        raise RunDirError(f"--distill-from {run.distill_from} predicts over {theirs} classes; this run's model over "
                          f"{ours}: distil from a run of the same task and data")


@dataclass
class Phase:
    """One training phase of a run: its schedule, its callbacks, and the transform that opens it."""

    name: str
    train: TrainConfig
    callbacks: list = field(default_factory=list)
    enter: Callable[[nn.Module], nn.Module] | None = None  # applied when the phase starts, not when it resumes


def train_run(run: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
              callbacks=()) -> dict[str, Any]:
    """Train (or resume) a baseline run in ``out`` and write its ``metrics.json``; returns the metrics."""
    if resume:
        run = saved_run(out, run)
    phase = Phase("train", run.train_config(), list(callbacks))
    task, config = run.task_type(), run.model_config()  # bad sizes fail here, before the run directory is made
    return run_phases(run, out, lambda: task.build_model(config), [phase], resume, progress)


def run_phases(run: RunConfig, out: str | Path, make_model: Callable[[], nn.Module], phases: list[Phase],
               resume: bool = False, progress: bool = True, summary: Callable[[nn.Module], dict] | None = None
               ) -> dict[str, Any]:
    """Run ``phases`` in order in ``out`` with per-epoch checkpoints; resume picks up at the saved phase."""
    out = Path(out)
    for phase in phases:      # a device this machine lacks fails before the run directory is made
        training_device(phase.train.device)
    rank, world_size = distributed.init_from_env()
    with ExitStack() as owned:
        if rank == 0:
            owned.enter_context(exclusive(out, resume))
            owned.enter_context(logging_to(out))
        return _run_phases(run, out, make_model, phases, resume, progress, summary, rank, world_size)


def _run_phases(run: RunConfig, out: Path, make_model: Callable[[], nn.Module], phases: list[Phase], resume: bool,
                progress: bool, summary: Callable[[nn.Module], dict] | None, rank: int, world_size: int
                ) -> dict[str, Any]:
    if rank == 0:
        if not resume:          # a resumed run arrives with its saved configuration (``saved_run``)
            write_json(out / CONFIG, asdict(run))
    distributed.barrier()
    first = phases[0].train
    torch.manual_seed(first.seed)
    task = build_task(run, first, rank, world_size)
    teacher = load_teacher(run.distill_from, run) if run.distill_from else None
    if teacher is not None:
        task = Distillation(task, teacher.to(training_device(first.device)), run.distill_config())
    start, payload, model, history = 0, None, None, []
    if resume:
        payload = load_checkpoint(out / CHECKPOINT)
        names = [p.name for p in phases]
        if payload.get("phase", "train") not in names:
            raise CheckpointError(f"{out / CHECKPOINT} is from phase {payload.get('phase')!r}; this run has "
                                  f"phases {names}")
        start = names.index(payload.get("phase", "train"))
        model = _model_from(run.task_type(), payload, out / CHECKPOINT)
        check_adoptable(run, payload, model, out)
    for index in range(start, len(phases)):
        phase = phases[index]
        resuming = payload is not None and index == start
        if model is None:
            model = make_model()
        if teacher is not None and index == start:
            check_teacher(run, teacher, model)
        if not resuming and phase.enter is not None:
            model = phase.enter(model)
        trainer = Trainer(model, task, phase.train, out, phase.callbacks, progress, asdict(run), phase.name,
                          history)
        if resuming:
            trainer.resume(out / CHECKPOINT, payload)
        elif index > 0:
            trainer.save()  # the transformed model is the new starting point should we be interrupted
        trainer.fit()
        model, history = trainer.model, trainer.history   # a method may have replaced the model while training
    metrics = None
    if rank == 0:
        # the last epoch's validation is the final model's unless the last phase trained no epoch (e.g.
        # --finetune-epochs 0 after a method's final step): then measure it
        trained_last = bool(history) and history[-1]["phase"] == phases[-1].name
        valid = history[-1][f"val_{task.metric}"] if trained_last else task.evaluate(model, "valid")[task.metric]
        tests = {split: task.evaluate(model, split) for split in task.test_splits}
        metrics = summarise(run, model, history, valid, tests)
        if summary is not None:     # counts and batch-1 latency: of the model as deployed, on the CPU
            metrics |= summary(model.cpu())
        broken = [f"{key} {value}" for key, value in metrics.items()
                  if isinstance(value, float) and not math.isfinite(value)]
        if broken:      # a run that finished must be usable: never mark one finished with a broken model
            raise TrainingDiverged(f"the trained model gives {', '.join(broken)}; {out} stays unfinished: start a "
                                   f"new run with a lower learning rate (--lr) or method strength")
        write_json(out / METRICS, metrics)
        metric = task.metric
        log.info("finished: valid %s %.2f, test %s %.2f", metric, metrics[f"val_{metric}"], metric,
                 metrics[f"test_{metric}"])
    distributed.barrier()
    return metrics


def compress_run(run: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, callbacks=()
                 ) -> dict[str, Any]:
    """Compress with ``run.method``: from ``run.source`` (a trained run) or from scratch, then fine-tune.
    ``callbacks`` (e.g. ``leanlstm.tensorboard.TensorBoard``) join every phase, after the method's."""
    if resume:
        run = saved_run(out, run)
    method = get_method(run.method)(config_for(run.method, run.method_config))
    if run.source and run.distill_from is None and getattr(method, "distill_from_source", False):
        # a method trained by distillation (AntMan) learns from the model it compresses unless told otherwise
        log.info("%s distils from its --from run %s (give --distill-weight 0 to train without)", run.method,
                 run.source)
        run = replace(run, distill_from=run.source)
    task = run.task_type()
    baseline = None         # the --from run's metrics, read now: a broken file fails before any training
    if run.source:
        source = read_config(run.source)
        if source.task != run.task:
            raise RunDirError(f"--from {run.source} is a {source.task} run; this run is {run.task}: compress a run "
                              f"of the same task")
        if (Path(run.source) / METRICS).is_file():
            baseline = read_metrics(run.source, (f"test_{task.metric}", "lstm_params"))
        else:
            log.warning("--from %s has not finished training (no %s): compressing its latest checkpoint",
                        run.source, METRICS)
    config = run.model_config()

    def make_model() -> nn.Module:
        if not run.source:
            return task.build_model(config)
        model = load_run(run.source)[1]
        if run.dropout is not None:
            task.set_dropout(model, run.dropout)
        if run.dropout_mode is not None:
            task.set_dropout_mode(model, run.dropout_mode)
        return model

    phases = [Phase("compress", run.train_config(), method.callbacks() + list(callbacks), method.prepare)]
    if method.has_finetune:
        phases.append(Phase("finetune", run.finetune_config(), method.finetune_callbacks() + list(callbacks),
                            method.finalize))

    def summary(model: nn.Module) -> dict[str, Any]:
        extra = {"method_config": run.method_config, "source": run.source, **method.summary(model)}
        if baseline is not None:
            key = f"test_{task.metric}"
            extra |= {f"baseline_{key}": baseline[key], "baseline_lstm_params": baseline["lstm_params"]}
        # against the dense LSTMs of the model compression started from (the --from run's sizes, else the
        # preset's), so that removed units count as compression
        start = load_run(run.source)[1] if run.source else task.build_model(config)
        extra["lstm_compression"] = lstm_numbers(start)["dense_lstm_params"] / lstm_numbers(model)["lstm_params"]
        if run.latency_repeats > 0:
            extra |= compare_latency(model, start, backends=method.latency_backends, repeats=run.latency_repeats)
        return extra

    metrics = run_phases(run, out, make_model, phases, resume, progress, summary)
    if metrics is not None:  # None on the other processes of a distributed run
        method.on_run_end(Path(out), metrics)
    return metrics


def compare_latency(model: nn.Module, baseline: nn.Module, backends=("leanlstm", "onnxruntime"), repeats: int = 20,
                    threads: int = 1) -> dict[str, Any]:
    """Batch-1 latency per time step of the compressed model and its dense baseline, whole and LSTM stack only,
    measured in one interleaved run, plus the speed-ups of the compressed model's stack and whole model on the first
    backend over the baseline's on each backend.

    Measured when training ends, on whatever else the machine is doing then (the load average is recorded);
    ``benchmarks/compression_results.py`` re-measures finished runs side by side on a quiet machine.
    """
    from .runtime.latency import medians, stack_and_model

    result = stack_and_model({"compressed": model, "baseline": baseline}, backends, repeats=repeats, threads=threads)
    latency = {label: {part: medians(measured[part]) for part in ("lstm", "model")}
               for label, measured in result["models"].items()}
    primary = backends[0]

    def speedup(part: str) -> dict[str, float]:
        compressed = latency["compressed"][part].get(primary)
        return {f"{primary}_vs_baseline_{name}": latency["baseline"][part][name] / compressed
                for name in backends if compressed and name in latency["baseline"][part]}

    errors = {label: measured["errors"] for label, measured in result["models"].items() if measured["errors"]}
    settings = {k: result[k] for k in ("seq_len", "repeats", "threads", "machine")}
    return {"latency_us_per_step": latency, "lstm_speedup": speedup("lstm"), "model_speedup": speedup("model"),
            "latency_settings": settings, **({"latency_errors": errors} if errors else {})}


def read_config(run_dir: str | Path) -> RunConfig:
    """The configuration a run directory was started with (its ``config.json``); a damaged file, or one that asks
    for what this leanlstm cannot do, fails naming the file."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a leanlstm run directory (no {CONFIG})")
    fix = "restore it from a backup, or start a new run"
    values = _read_json(path, fix)
    if not isinstance(values, dict):
        raise RunDirError(f"{path} holds a {type(values).__name__}, not a run's settings; {fix}")
    unknown = sorted(set(values) - {f.name for f in fields(RunConfig)})
    if unknown:
        raise RunDirError(f"{path} has settings this leanlstm does not know ({', '.join(unknown)}): was it written "
                          f"by another version? Use that version, or {fix}")
    try:
        return RunConfig(**values)
    except (ValueError, TypeError, RunDirError) as error:
        raise RunDirError(f"{path} asks for something this leanlstm cannot do ({error}); {fix}") from None


def read_metrics(run_dir: str | Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A finished run's ``metrics.json``, checked to hold ``keys``; a damaged file fails naming it."""
    path = Path(run_dir) / METRICS
    fix = (f"restore it from a backup (the model is still in {CHECKPOINT}: `leanlstm eval {run_dir}` measures it), "
           f"or delete it and finish the run again with --resume")
    metrics = _read_json(path, fix)
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path} holds a {type(metrics).__name__}, not a run's metrics; {fix}")
    missing = [key for key in keys if key not in metrics]
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}; {fix}")
    return metrics


def _read_json(path: Path, fix: str) -> Any:
    try:
        return read_json(path, fix)
    except FileProblem as error:
        raise RunDirError(str(error)) from None


def check_adoptable(run: RunConfig, payload: dict[str, Any], model: nn.Module, out: Path) -> None:
    """Refuse a checkpoint that another run wrote (copied in by hand, say) before resuming from it: the run it
    records must have made the same model as ``out``'s ``config.json`` asks for; a baseline's model must have
    the sizes the run's preset and options give."""
    path, written = out / CHECKPOINT, payload.get("run_info") or {}
    ours = asdict(run)
    differ = [f"{name} {written[name]!r} there, {ours[name]!r} here" for name in MODEL_FIELDS
              if name in written and written[name] != ours[name]]
    if not differ and run.method == "baseline" and payload.get("phase", "train") == "train":
        theirs, wanted = lstm_numbers(model)["hidden_sizes"], run.model_config()
        expected = getattr(wanted, "hidden_sizes", None)
        if expected is not None and isinstance(theirs, list) and list(expected) != theirs:
            differ = [f"hidden sizes {theirs} there, {list(expected)} here"]
    if differ:
        raise CheckpointError(f"{path} belongs to another run ({'; '.join(differ)}), not the one {out / CONFIG} "
                              f"describes; put back this run's checkpoint, or start a new run in another --out")


def source_preset(source: str | Path) -> str:
    """The preset a trained run directory was made with."""
    return read_config(source).preset


def source_task(source: str | Path) -> str:
    """The task a trained run directory was made for."""
    return read_config(source).task


def _model_from(task: type[Task], payload: dict[str, Any], source: Path) -> nn.Module:
    from .compress import restore_      # compress imports methods, which import this module

    try:
        model = task.model_from_config(payload["model_config"])
        for state in payload.get("callbacks") or []:   # a compression handle's structure: what the model config
            if isinstance(state, dict) and "structure" in state:     # may not record (a compressed head)
                restore_(model, state["structure"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source} has an unreadable model config ({type(error).__name__}: {error})") from error
    load_state(model, payload["model_state"], source)
    return model


def lstm_numbers(model: nn.Module) -> dict[str, Any]:
    """Sizes and parameter counts of the model's LSTM stacks (found in the module tree, any attribute names):
    ``hidden_sizes`` (the per-layer sizes of the only stack, or ``{name: sizes}`` for several), stored and dense
    LSTM parameters, and all stored parameters of the model (a ``FormLinear`` head's as its form stores them).
    Stored counts are float32 words, ``bytes / 4`` with indices and scales included, so an int8 form's count is
    about a quarter of its kept weights: the counts compare sizes across value widths, not numbers of weights."""
    stacks = find_lstms(model)
    heads = [head for _, head in find_heads(model) if isinstance(head, FormLinear)]    # compressed: count their form
    inside = {id(p) for part in [stack for _, stack in stacks] + heads for p in part.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    other += sum(math.ceil(head.nbytes() / FLOAT_BYTES) for head in heads)
    stored = sum(_stored_params(stack) for _, stack in stacks)
    sizes = {name: _hidden_sizes(stack) for name, stack in stacks}
    return {"hidden_sizes": next(iter(sizes.values())) if len(sizes) == 1 else sizes, "lstm_params": stored,
            "dense_lstm_params": sum(_dense_params(stack) for _, stack in stacks), "total_params": stored + other}


def _hidden_sizes(stack: nn.Module) -> list[int]:
    if isinstance(stack, nn.LSTM):
        return [stack.hidden_size] * stack.num_layers
    return list(stack.hidden_sizes)


def _stored_params(stack: nn.Module) -> int:
    if hasattr(stack, "stored_params"):
        return stack.stored_params()
    return sum(p.numel() for p in stack.parameters())


def _dense_params(stack: nn.Module) -> int:
    if hasattr(stack, "dense_params"):
        return stack.dense_params()
    return sum(p.numel() for p in stack.parameters())


def summarise(run: RunConfig, model: nn.Module, history: list[dict], valid: float, tests: dict[str, dict]
              ) -> dict[str, Any]:
    """``metrics.json``: the run, its model's LSTM numbers, ``val_<metric>`` and every ``<split>_<key>`` of the
    task's test splits (``test_<metric>``, ``test_loss``, ...), and the per-epoch history."""
    task = run.task_type()
    scores = {f"{split}_{key}": value for split, result in tests.items() for key, value in result.items()}
    return {
        "task": run.task, "preset": run.preset, "method": run.method, **lstm_numbers(model),
        "metric": task.metric, "higher_is_better": task.higher_is_better, f"val_{task.metric}": valid, **scores,
        "epochs": history[-1]["epoch"] if history else 0,
        "train_minutes": sum(h["seconds"] for h in history) / 60, "command": run.command,
        "history": history,
        **({"distilled_from": run.distill_from, "distill": asdict(run.distill_config())} if run.distill_from else {}),
    }


def load_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """The run's config, its model with the latest weights, and the checkpoint payload."""
    run_dir = Path(run_dir)
    run = read_config(run_dir)
    payload = load_checkpoint(run_dir / CHECKPOINT)
    return run, _model_from(run.task_type(), payload, run_dir / CHECKPOINT), payload


def run_progress(run_dir: str | Path) -> dict[str, Any]:
    """Where a run stands, from ``metrics.json`` when finished, else from its checkpoint: the task's metric names,
    the per-epoch history, and for an unfinished run the batches done inside the epoch in progress and the pid of
    the process training it now, if any (``training_paused``: that process is stopped by a signal)."""
    run_dir = Path(run_dir)
    task = read_config(run_dir).task_type()
    names = {"run": str(run_dir), "task": task.name, "metric": task.metric,
             "train_metric": task.train_metric_name}
    if (run_dir / METRICS).is_file():
        key = f"test_{task.metric}"
        metrics = read_metrics(run_dir, ("history", key, "hidden_sizes"))
        return names | {"finished": True, "history": metrics["history"], key: metrics[key],
                        "hidden_sizes": metrics["hidden_sizes"]}
    pid = training_pid(run_dir)
    unfinished = names | {"finished": False, "training_pid": pid,
                          "training_paused": pid is not None and _stopped(pid)}
    if not (run_dir / CHECKPOINT).is_file():
        return unfinished | {"history": [], "within_epoch": None}
    payload = load_checkpoint(run_dir / CHECKPOINT)
    within = payload.get("within_epoch")
    return unfinished | {"history": payload["history"], "phase": payload.get("phase"),
                         "within_epoch": {k: within[k] for k in ("epoch", "batches")} if within else None}


def finished_hidden_sizes(run_dir: str | Path) -> list[int]:
    """The per-layer LSTM sizes a finished run ended with (an ISS run's found sizes, say)."""
    metrics = Path(run_dir) / METRICS
    if not metrics.is_file():
        raise RunDirError(f"{run_dir} has not finished (no {METRICS}), so its sizes may still change; finish it "
                          f"first")
    sizes = read_metrics(run_dir, ("hidden_sizes",))["hidden_sizes"]
    if not isinstance(sizes, list):
        raise RunDirError(f"{run_dir}'s model has several LSTM stacks ({', '.join(sizes)}): give --hidden-sizes")
    return list(sizes)


def evaluate_run(run_dir: str | Path, splits: tuple[str, ...] | list[str] | None = None,
                 data_dir: str | None = None) -> dict[str, Any]:
    """The run's latest model on ``splits`` (default: ``valid`` and the task's test splits)."""
    run, model, _ = load_run(run_dir)
    run = replace(run, data_dir=data_dir or run.data_dir)
    task_type = run.task_type()
    splits = list(splits) if splits else ["valid", *task_type.test_splits]
    unknown = [split for split in splits if split not in task_type.splits]
    if unknown:
        raise RunDirError(f"task {run.task!r} has no split {', '.join(map(repr, unknown))}; its splits: "
                          f"{', '.join(task_type.splits)}")
    task = build_task(run, run.train_config())
    started = time.perf_counter()
    result = {split: task.evaluate(model, split) for split in splits}
    result["seconds"] = time.perf_counter() - started
    return result
