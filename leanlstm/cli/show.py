"""``leanlstm show``: where runs stand, epoch by epoch, finished or not (it reads files only; no data)."""
from __future__ import annotations

import json

import click

from ..runs import run_progress
from . import options


@click.command("show")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options.task
def command(run_dirs, as_json, task_name):
    """Per-epoch history of each RUN_DIR (lr, the task's training and validation metrics, ISS sizes, time), and
    whether an unfinished run is training now, paused (SIGSTOP) or stopped (to resume with --resume).

    \b
    Example:  leanlstm show runs/ptb-medium-cpu runs/ptb-medium-cpu-iss-scratch-0.0065
    """
    options.check_task(run_dirs, task_name)
    progress = [run_progress(run_dir) for run_dir in run_dirs]
    if as_json:
        click.echo(json.dumps(progress, indent=2))
        return
    for run in progress:
        metric, train = run["metric"], run["train_metric"]
        if run["finished"]:
            status = f"finished: test {metric} {run[f'test_{metric}']:.2f}, sizes {run['hidden_sizes']}"
        elif run.get("within_epoch"):
            within = run["within_epoch"]
            status = f"unfinished: {run['phase']} epoch {within['epoch']} in progress, {within['batches']} batches done"
        else:
            status = "unfinished" + (" (no checkpoint yet)" if not run["history"] else "")
        if not run["finished"]:
            pid = run["training_pid"]
            if pid is None:
                status += "; stopped"
            elif run["training_paused"]:
                status += f"; paused (pid {pid}, SIGSTOP; `kill -CONT {pid}` resumes it)"
            else:
                status += f"; training now (pid {pid})"
        click.echo(f"{run['run']}  {status}")
        for entry in run["history"]:
            sizes = f"  sizes {tuple(entry['iss_components'])}" if "iss_components" in entry else ""
            click.echo(f"  {entry['phase']:9s}{entry['epoch']:>3d}  lr {entry['lr']:<8.4g} train {train} "
                       f"{entry[f'train_{train}']:8.2f}  valid {metric} {entry[f'val_{metric}']:8.2f}{sizes}  "
                       f"{entry['seconds'] / 60:5.1f} min")
