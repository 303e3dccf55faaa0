"""``leanlstm compress``: apply a compression method to a trained run (or from scratch), then fine-tune."""
from __future__ import annotations

import json
import shlex
import sys

import click

from .. import methods
from ..files import check_writable
from ..budget_search import DEFAULT_METHODS, BudgetSearch, budget_field, search
from ..methods.base import parse_settings
from ..runs import RunConfig, compress_run, read_config
from ..train import ConfigError
from . import options
from .options import make_tensorboard  # the command's own `options` is a local


@click.command("compress")
@click.option("--method", "method_name",
              help="Compression method (see `leanlstm methods`); without it, --latency-budget-us searches them all.")
@click.option("--from", "source", type=click.Path(exists=True, file_okay=False),
              help="Trained run directory to start from; without it the model is trained from scratch.")
@click.option("--task", help="Task (default: the --from run's, else ptb).")
@click.option("--preset", help="One of the task's presets (default: the --from run's, else the task's own).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--strength", type=str, help="Shorthand for --set strength=VALUE (e.g. the ISS lambda).")
@click.option("--set", "settings", multiple=True, help="Method option KEY=VALUE (repeatable).")
@click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Dropout rate instead of the preset's or the --from run's (ISS as published lowers it).")
@options.dropout_mode
@click.option("--epochs", type=int, help="Epochs of the compression phase (default: the preset's).")
@click.option("--lr", type=float, help="Learning rate of the compression phase.")
@options.lr_decay(" of the compression phase")
@click.option("--finetune-epochs", type=click.IntRange(min=0),
              help="Epochs of fine-tuning (default 3; 0: apply the method's final step and stop).")
@click.option("--finetune-lr", type=float, help="Fine-tuning lr (default: the compression phase's last lr).")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Data folder (default: the --from run's, else $LEANLSTM_DATA).")
@click.option("--max-batches", type=int, help="Stop each epoch after this many batches (smoke runs).")
@click.option("--max-items", "--max-tokens", "max_tokens", type=int,
              help="Use only the first N items (tokens, utterances) of every split (smoke runs).")
@click.option("--no-verify-data", is_flag=True,
              help="Skip the checksums of the data files (for slices; default: as the --from run did).")
@click.option("--latency-repeats", type=click.IntRange(min=0), default=20, show_default=True,
              help="Batch-1 latency samples of the result and its dense baseline at the end (0: skip).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--latency-budget-us", type=click.FloatRange(0, min_open=True),
              help="Per-step latency (us, batch 1) of the LSTM stacks to compress to. With --method: that method's "
                   "own budget (symbiotic, ISS). Without: size every applicable method to it, train each on a short "
                   "schedule, measure them, and pick the most accurate within it (needs --from).")
@click.option("--backend", help="Search: the backend the budget holds on (default leanlstm).")
@click.option("--methods", "method_names", help="Search: comma-separated candidates (default: "
              + ",".join(DEFAULT_METHODS) + ").")
@options.seed
@options.distillation
@options.precision
@options.device
@options.tensorboard
def command(method_name, source, task, preset, out, strength, settings, dropout, dropout_mode, epochs, lr,
            decay_after, lr_decay, finetune_epochs, finetune_lr, resume, data_dir, max_batches, max_tokens,
            no_verify_data, latency_repeats, no_progress, latency_budget_us, backend, method_names, seed,
            distill_from, distill_weight, distill_temperature, precision, device, tensorboard):
    """Compress a model with a method, with checkpoints in OUT.

    \b
    Example:  leanlstm compress --method iss --from runs/ptb-small --strength 0.002 --out runs/ptb-small-iss
    """
    check_writable(out, "--out")
    if method_name is None:
        if latency_budget_us is None:
            raise click.UsageError("give --method NAME (see `leanlstm methods`), or --latency-budget-us N with --from "
                                   "RUN to try every applicable method and keep the most accurate within the budget")
        given = [name for name, value in (("--set", settings), ("--strength", strength), ("--task", task),
                                          ("--preset", preset), ("--distill-from", distill_from),
                                          ("--dropout", dropout), ("--dropout-mode", dropout_mode))
                 if value not in (None, ())]
        if given:
            raise click.UsageError(f"{', '.join(given)} configure one method's run; the search sizes and trains each "
                                   f"method itself from the --from run: give --method to use them")
        _search(source, out, latency_budget_us, backend, method_names, epochs, finetune_epochs, latency_repeats,
                resume, no_progress, dict(lr=lr, decay_after=decay_after, lr_decay=lr_decay, max_batches=max_batches,
                                          seed=seed, precision=precision, device=device),
                data_dir, max_tokens, no_verify_data)
        return
    if backend or method_names:
        raise click.UsageError("--backend and --methods belong to the search (no --method); a method's own backend "
                               "is a --set option (e.g. --set backend=onnxruntime)")
    method = methods.get_method(method_name)
    try:
        options = parse_settings(settings) | ({"strength": strength} if strength is not None else {})
        if latency_budget_us is not None:
            options |= {_budget_field(method, method_name): str(latency_budget_us)}
        config = method.Config.from_strings(options)
    except ValueError as error:     # ConfigError included: it names the method's option
        named = isinstance(error, ConfigError) and error.name.endswith("strength")
        given = "--strength" if named and strength is not None else "--set"
        raise click.BadParameter(str(error), param_hint=given) from error
    if source:      # what is not given comes from the --from run: its task, preset and data
        origin = read_config(source)
        task, preset = task or origin.task, preset or origin.preset
        data_dir = data_dir or origin.data_dir
        verify_data = origin.verify_data and not no_verify_data
    else:
        task, verify_data = task or "ptb", not no_verify_data
    overrides = {k: v for k, v in dict(epochs=epochs, lr=lr, decay_after=decay_after, lr_decay=lr_decay,
                                         max_batches=max_batches, seed=seed, precision=precision,
                                         device=device).items() if v is not None}
    finetune = {k: v for k, v in dict(epochs=finetune_epochs, lr=finetune_lr).items() if v is not None}
    run = RunConfig(task=task, preset=preset, method=method_name, data_dir=data_dir, max_tokens=max_tokens,
                    verify_data=verify_data, overrides=overrides, method_config=config.to_dict(),
                    source=source, finetune_overrides=finetune, latency_repeats=latency_repeats, dropout=dropout,
                    dropout_mode=dropout_mode,
                    distill_from=distill_from, distill_weight=distill_weight,
                    distill_temperature=distill_temperature,
                    command=shlex.join(["leanlstm"] + sys.argv[1:]))
    callbacks = make_tensorboard(tensorboard)
    try:
        metrics = compress_run(run, out, resume=resume, progress=not no_progress, callbacks=callbacks)
    finally:
        for callback in callbacks:
            callback.close()
    if metrics is not None:
        metric = metrics["metric"]
        keys = ("hidden_sizes", "lstm_params", "lstm_compression", f"val_{metric}", f"test_{metric}",
                "train_minutes", "lstm_speedup", "model_speedup")
        click.echo(json.dumps({k: metrics[k] for k in keys if k in metrics}))


def _budget_field(method, name: str) -> str:
    """The config field a method takes a latency budget in."""
    field_name = budget_field(method)
    if field_name is None:
        raise click.BadParameter(f"method {name} takes no latency budget; omit --method to search every method for "
                                 f"the most accurate model within the budget", param_hint="--latency-budget-us")
    return field_name


def _search(source, out, budget, backend, method_names, epochs, finetune_epochs, repeats, resume, no_progress,
            training, data_dir, max_tokens, no_verify_data) -> None:
    if not source:
        raise click.UsageError("the search compresses a trained model: give --from RUN")
    values = {"latency_budget_us": budget, "backend": backend or "leanlstm"}
    if method_names:
        values["methods"] = [name.strip() for name in method_names.split(",") if name.strip()]
    values |= {k: v for k, v in (("epochs", epochs), ("finetune_epochs", finetune_epochs)) if v is not None}
    values["repeats"] = repeats
    try:
        config = BudgetSearch(**values)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    origin = read_config(source)
    options = {"overrides": {k: v for k, v in training.items() if v is not None},
               "data_dir": data_dir or origin.data_dir, "max_tokens": max_tokens,
               "verify_data": origin.verify_data and not no_verify_data}
    state = search(source, out, config, resume=resume, progress=not no_progress, run_options=options)
    click.echo(json.dumps({k: state[k] for k in ("picked", "picked_run", "dense_stack_us")}
                          | {"front": [{k: row[k] for k in row if k not in ("settings", "run")} for row in
                                       state["front"]]}))


@click.command("methods")
def list_methods():
    """List the compression methods and their options."""
    for name, method in sorted(methods.METHODS.items()):
        options = ", ".join(f"{k}={v}" for k, v in method.Config().to_dict().items())
        click.echo(f"{name:12s} {options}")
