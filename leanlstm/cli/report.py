"""``leanlstm report``: one page comparing runs: tables, Pareto plots, training curves, commands."""
from __future__ import annotations

from pathlib import Path

import click

from .bench import DEFAULT_BACKENDS


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for index.html, report.md, report.json and the plots (created; files an earlier report "
                   "did not write are never replaced).")
@click.option("--no-latency", is_flag=True,
              help="Do not time the models: show the latencies the runs recorded (compress records them), each "
                   "on the machine it names.")
@click.option("--backend", "backends", multiple=True, default=DEFAULT_BACKENDS, show_default=True,
              help="Backend to time (repeat the option for several); leanlstm is the one the speed-ups are of.")
@click.option("--repeats", type=click.IntRange(1, 10**5), default=5, show_default=True,
              help="Timed sequences per model, part and backend (few: a quick comparison; bench for more).")
@click.option("--seq-len", type=click.IntRange(1, 10**5), default=35, show_default=True,
              help="Time steps per timed sequence.")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Threads for every backend.")
@click.option("--part", type=click.Choice(["lstm", "model"]), default="lstm", show_default=True,
              help="Latency of the LSTM stacks alone, or of the whole model (embedding and heads too).")
def command(inputs, out, no_latency, backends, repeats, seq_len, threads, part):
    """Compare runs on one page: INPUTS are run directories and results files (results/*.json).

    Per task: a table of every run (sizes, test metric and its change from the dense baseline, the machines its
    latencies were measured on), per machine a table of batch-1 latency per backend with speed-ups (only within
    one measurement, never across machines) and a Pareto plot of the metric against that latency, a plot against
    bytes, training curves and the command behind each run. Results files without runs are skipped, each with a
    note.

    \b
    Example:  leanlstm report runs/ptb-small runs/ptb-small-prune --out report/
              leanlstm report results/*.json --no-latency --out docs/report
    """
    from ..report import build_report

    report = build_report(list(inputs), out, measure=not no_latency, backends=tuple(backends), repeats=repeats,
                          seq_len=seq_len, threads=threads, part=part)
    for entry in report["tasks"]:
        timed = "; ".join(f"{len(s['rows'])} timed on {s['machine']}" for s in entry["latency"]) or "none timed"
        click.echo(f"{entry['task']}: {len(entry['rows'])} run(s), {len(entry['figures'])} plot(s) ({timed})")
    if report["skipped"]:           # each was logged with its reason; report.md lists them too
        click.echo(f"skipped {len(report['skipped'])} input(s) without runs", err=True)
    click.echo(f"wrote {Path(out) / 'index.html'} and {Path(out) / 'report.md'}")
