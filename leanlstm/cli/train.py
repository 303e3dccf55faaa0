"""``leanlstm train``: train a task's model from one of its presets into a run directory."""
from __future__ import annotations

import json
import shlex
import sys

import click

from ..files import check_writable
from ..runs import RunConfig, finished_hidden_sizes, train_run
from . import options


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(size) for size in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 120,95, got {text!r}",
                                 param_hint="--hidden-sizes") from None


@click.command("train")
@click.option("--task", default="ptb", show_default=True, help="Task to train on (see `leanlstm tasks`).")
@click.option("--preset", help="One of the task's presets (default: the task's own, e.g. small for ptb).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out from its last checkpoint.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder (default: $LEANLSTM_DATA, "
              "else ~/.cache/leanlstm; missing files are downloaded there).")
@click.option("--dropout", type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Dropout rate instead of the preset's.")
@options.dropout_mode
@click.option("--epochs", type=int, help="Override the preset's number of epochs.")
@click.option("--lr", type=float, help="Override the preset's learning rate.")
@options.lr_decay()
@click.option("--clip", type=float, help="Override the preset's gradient-norm clip.")
@options.seed
@click.option("--hidden-sizes", help="Per-layer LSTM sizes instead of the preset's, e.g. 120,95 (a direct design).")
@click.option("--hidden-sizes-from", type=click.Path(exists=True, file_okay=False),
              help="The per-layer sizes a finished run ended with (e.g. an ISS result): its direct design.")
@click.option("--vocab-size", type=click.IntRange(min=2),
              help="Vocabulary cap of the text task: the most frequent training words plus <unk> (default: the "
                   "preset's 10000, or the corpus's own vocabulary when smaller).")
@click.option("--max-batches", type=int, help="Stop each epoch after this many batches (smoke runs).")
@click.option("--max-items", "--max-tokens", "max_tokens", type=int,
              help="Use only the first N items (tokens, utterances) of every split (smoke runs).")
@click.option("--no-verify-data", is_flag=True, help="Skip the checksums of the data files (for slices).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@options.distillation
@options.precision
@options.device
@options.tensorboard
def command(task, preset, out, resume, data_dir, dropout, dropout_mode, epochs, lr, decay_after, lr_decay, clip, seed,
            hidden_sizes, hidden_sizes_from, vocab_size, max_batches, max_tokens, no_verify_data, no_progress,
            distill_from, distill_weight, distill_temperature, precision, device, tensorboard):
    """Train a task's model from a preset.

    \b
    Example:  leanlstm train --task ptb --preset small --out runs/ptb-small
    """
    check_writable(out, "--out")
    sizes = _sizes(hidden_sizes)
    if hidden_sizes_from is not None:
        if sizes is not None:
            raise click.UsageError("give --hidden-sizes or --hidden-sizes-from, not both")
        sizes = finished_hidden_sizes(hidden_sizes_from)
    overrides = {k: v for k, v in dict(epochs=epochs, lr=lr, decay_after=decay_after, lr_decay=lr_decay, clip=clip,
                                       seed=seed, max_batches=max_batches, precision=precision,
                                       device=device).items() if v is not None}
    run = RunConfig(task=task, preset=preset, data_dir=data_dir, max_tokens=max_tokens,
                    verify_data=not no_verify_data, overrides=overrides, hidden_sizes=sizes, dropout=dropout,
                    dropout_mode=dropout_mode,
                    vocab_size=vocab_size, distill_from=distill_from, distill_weight=distill_weight,
                    distill_temperature=distill_temperature,
                    command=shlex.join(["leanlstm"] + sys.argv[1:]))
    callbacks = options.make_tensorboard(tensorboard)
    try:
        metrics = train_run(run, out, resume=resume, progress=not no_progress, callbacks=callbacks)
    finally:
        for callback in callbacks:
            callback.close()
    if metrics is not None:
        metric = metrics["metric"]
        keys = ("hidden_sizes", "lstm_params", f"val_{metric}", f"test_{metric}", "train_minutes")
        click.echo(json.dumps({k: metrics[k] for k in keys}))
