"""``leanlstm eval``: evaluate a run directory's latest checkpoint on its task."""
from __future__ import annotations

import json

import click

from ..runs import evaluate_run
from . import options


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "splits", multiple=True,
              help="Split to evaluate (repeatable; default: valid and the task's test splits).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder, if not the run's own.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options.task
def command(run_dir, splits, data_dir, as_json, task_name):
    """The task's loss and metrics of RUN_DIR's model on the given splits.

    \b
    Example:  leanlstm eval runs/ptb-small --split test
    """
    options.check_task([run_dir], task_name)
    result = evaluate_run(run_dir, splits or None, data_dir)
    if as_json:
        click.echo(json.dumps(result))
        return
    for split, numbers in result.items():
        if split != "seconds":
            click.echo(f"{split:6s} " + "  ".join(_number(key, value) for key, value in numbers.items()))


def _number(key: str, value: float) -> str:
    """Counts as integers, rates below 1 (a WER of 0.0053) to four significant digits, the rest to two decimals."""
    if isinstance(value, int):
        return f"{key} {value}"
    if key == "loss":
        return f"{key} {value:.4f}"
    return f"{key} {value:.4g}" if abs(value) < 1 else f"{key} {value:.2f}"
