"""``leanlstm eval``: evaluate a run directory's latest checkpoint."""
from __future__ import annotations

import json

import click

from ..runs import evaluate_run


@click.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", "splits", multiple=True, default=("valid", "test"), show_default=True,
              type=click.Choice(["train", "valid", "test"]))
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder, if not the run's own.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(run_dir, splits, data_dir, as_json):
    """Perplexity of RUN_DIR's model on the given splits."""
    result = evaluate_run(run_dir, splits, data_dir)
    if as_json:
        click.echo(json.dumps(result))
        return
    for split in splits:
        click.echo(f"{split:6s} loss {result[split]['loss']:.4f}  ppl {result[split]['ppl']:.2f}")
