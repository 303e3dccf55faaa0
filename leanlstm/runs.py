"""Run directories: what ``leanlstm train`` writes and ``leanlstm eval`` / ``bench`` read.

A run directory holds ``config.json`` (what was asked), ``checkpoint.pt`` (latest epoch, atomic),
``log.txt`` and, once finished, ``metrics.json``. Nothing in it is ever overwritten by a new run.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, load_state, write_json
from .presets import get_preset
from .tasks import TASKS
from .tasks.lm import WordLM
from .train import CHECKPOINT, Trainer, TrainConfig

log = logging.getLogger(__name__)
CONFIG, METRICS, LOG = "config.json", "metrics.json", "log.txt"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


@dataclass
class RunConfig:
    task: str = "ptb"
    preset: str = "small"
    method: str = "baseline"
    data_dir: str | None = None
    max_tokens: int | None = None           # truncate every split (smoke runs)
    verify_data: bool = True                # md5 check of the data files
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields changed on the command line
    command: str = ""

    def train_config(self) -> TrainConfig:
        return replace(get_preset(self.preset).train, **self.overrides)


def prepare(out: Path, resume: bool) -> None:
    """Refuse to clobber: a finished run stays finished; an unfinished one needs ``--resume``."""
    if (out / METRICS).exists():
        raise RunDirError(f"{out} already holds a finished run ({METRICS}); choose another --out, or read it "
                          f"with `leanlstm eval {out}`")
    if resume and not (out / CHECKPOINT).exists():
        raise RunDirError(f"--resume given but {out} has no {CHECKPOINT}; drop --resume to start a new run")
    if not resume and out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} is not empty; pass --resume to continue the run there, or choose another --out")


def attach_log(out: Path) -> None:
    handler = logging.FileHandler(out / LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("leanlstm").addHandler(handler)
    logging.getLogger("leanlstm").setLevel(logging.INFO)


def build_task(run: RunConfig, train: TrainConfig, rank: int = 0, world_size: int = 1):
    builder = TASKS.get(run.task)
    if builder is None:
        raise RunDirError(f"unknown task {run.task!r}; known tasks: {', '.join(TASKS)}")
    return builder(run.data_dir, train.batch_size, train.bptt, rank, world_size, run.max_tokens, run.verify_data)


def train_run(run: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
              callbacks=()) -> dict[str, Any]:
    """Train (or resume) the run in ``out`` and write its ``metrics.json``; returns the metrics."""
    out = Path(out)
    rank, world_size = distributed.init_from_env()
    if rank == 0:
        prepare(out, resume)
        out.mkdir(parents=True, exist_ok=True)
        attach_log(out)
        if resume:
            run = _check_same_run(out, run)
        else:
            write_json(out / CONFIG, asdict(run))
    distributed.barrier()
    train = run.train_config()
    torch.manual_seed(train.seed)
    task = build_task(run, train, rank, world_size)
    model = WordLM(get_preset(run.preset).lm)
    trainer = Trainer(model, task, train, out, callbacks, progress, run_info=asdict(run))
    if resume:
        trainer.resume()
    trainer.fit()
    metrics = None
    if rank == 0:
        metrics = summarise(run, model, trainer.history, task.evaluate(model, "test"))
        write_json(out / METRICS, metrics)
        log.info("finished: valid %s %.2f, test %s %.2f", task.metric, metrics["val_ppl"], task.metric,
                 metrics["test_ppl"])
    distributed.barrier()
    return metrics


def _check_same_run(out: Path, run: RunConfig) -> RunConfig:
    saved = RunConfig(**json.loads((out / CONFIG).read_text()))
    if (saved.task, saved.preset, saved.method) != (run.task, run.preset, run.method):
        raise RunDirError(f"{out} holds a {saved.task}/{saved.preset}/{saved.method} run; resume it with the "
                          f"same --task/--preset/--method")
    return replace(saved, data_dir=run.data_dir or saved.data_dir)


def summarise(run: RunConfig, model: WordLM, history: list[dict], test: dict) -> dict[str, Any]:
    lstm = model.lstm
    other = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("lstm."))
    last = history[-1]
    return {
        "task": run.task, "preset": run.preset, "method": run.method,
        "hidden_sizes": list(lstm.hidden_sizes), "lstm_params": lstm.stored_params(),
        "dense_lstm_params": lstm.dense_params(), "total_params": lstm.stored_params() + other,
        "val_ppl": last["val_ppl"], "test_ppl": test["ppl"], "epochs": last["epoch"],
        "train_minutes": sum(h["seconds"] for h in history) / 60, "command": run.command,
        "history": history,
    }


def load_run(run_dir: str | Path) -> tuple[RunConfig, WordLM, dict[str, Any]]:
    """The run's config, its model with the latest weights, and the checkpoint payload."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"{run_dir} is not a leanlstm run directory (no {CONFIG})")
    run = RunConfig(**json.loads((run_dir / CONFIG).read_text()))
    payload = load_checkpoint(run_dir / CHECKPOINT)
    try:
        model = WordLM.from_model_config(payload["model_config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{run_dir / CHECKPOINT} has an unreadable model config ({error})") from error
    load_state(model, payload["model_state"], run_dir / CHECKPOINT)
    return run, model, payload


def evaluate_run(run_dir: str | Path, splits=("valid", "test"), data_dir: str | None = None) -> dict[str, Any]:
    run, model, _ = load_run(run_dir)
    run = replace(run, data_dir=data_dir or run.data_dir)
    task = build_task(run, run.train_config())
    started = time.perf_counter()
    result = {split: task.evaluate(model, split) for split in splits}
    result["seconds"] = time.perf_counter() - started
    return result
