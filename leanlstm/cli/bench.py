"""``leanlstm bench``: batch-1 latency of run directories' models, side by side, measured in one run."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import options

DEFAULT_BACKENDS = ("leanlstm", "torch", "onnxruntime", "torch-int8")


@click.command("bench")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--backend", "backends", multiple=True, default=DEFAULT_BACKENDS, show_default=True,
              help="Backend to time (repeat the option for several): leanlstm, torch, torch-int8, "
                   "onnxruntime, onnxruntime-forms.")
@click.option("--seq-len", type=click.IntRange(1, 10**5), default=35, show_default=True,
              help="Time steps per timed sequence.")
@click.option("--repeats", type=click.IntRange(1, 10**5), default=30, show_default=True,
              help="Timed sequences per model and backend.")
@click.option("--threads", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Threads for every backend.")
@click.option("--warm", is_flag=True, help="Time each sequence right after an untimed one of the same run and "
              "backend: steady-state latency with the model's weights in cache (default: taking turns, each "
              "sequence starts with the other runs' weights in cache).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@options.task
def command(run_dirs, backends, seq_len, repeats, threads, warm, as_json, task_name):
    """Per-step latency (microseconds, batch 1) of each RUN_DIR's model on each backend.

    Every (run, backend) pair takes turns in each repeat, so the ratios compare like with like.

    \b
    Example:  leanlstm bench runs/ptb-medium runs/ptb-medium-sparse10
    """
    from ..runs import load_run
    from ..runtime.latency import measure, model_size

    options.check_task(run_dirs, task_name)
    labels = [str(Path(d)) for d in run_dirs]
    if len(set(labels)) != len(labels):
        raise click.BadParameter("each run directory may be given once", param_hint="RUN_DIRS")
    models = {label: load_run(label)[1] for label in labels}
    result = measure(models, backends, seq_len=seq_len, repeats=repeats, threads=threads, warm=warm)
    report = _report(result, {label: model_size(model) for label, model in models.items()}, list(backends))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _report(result: dict, sizes: dict, backends: list[str]) -> dict:
    settings = {k: v for k, v in result.items() if k != "models"}
    runs, first = [], None
    for label, measured in result["models"].items():
        medians = {name: stats["median"] for name, stats in measured["backends"].items()}
        first = medians if first is None else first      # the first run's, even where it failed: no ratio then
        ratios = {name: medians[name] / first[name] for name in medians if name in first}
        runs.append({"run": label, **sizes[label], "latency_us": measured["backends"], "errors": measured["errors"],
                     "ratio_to_first": ratios})
    return {"settings": settings, "backends": backends, "runs": runs}


def _print_table(report: dict) -> None:
    backends = report["backends"]
    reference = "leanlstm" if "leanlstm" in backends else backends[0]
    width = max(len(run["run"]) for run in report["runs"]) + 2
    header = f"{'run':<{width}}{'params':>10}{'bytes':>10}" + "".join(f"{b:>19}" for b in backends)
    click.echo(f"us per time step, batch 1, seq_len {report['settings']['seq_len']}, "
               f"{report['settings']['threads']} thread(s); median (IQR); last column: the {reference} latency "
               f"ratio to the first run, as faster or slower")
    click.echo(header + f"  {'vs first':<14}")
    for run in report["runs"]:
        cells = []
        for name in backends:
            stats = run["latency_us"].get(name)
            cells.append(f"{stats['median']:>11.1f} ({stats['iqr']:>4.1f})" if stats else f"{'failed':>19}")
        ratio = run["ratio_to_first"].get(reference)
        click.echo(f"{run['run']:<{width}}{_si(run['params']):>10}{_si(run['bytes'], 'B'):>10}" + "".join(cells)
                   + f"  {speed(ratio) if run is not report['runs'][0] else '1.00x (first)'}")
    for run in report["runs"]:
        for name, message in run["errors"].items():
            click.echo(f"{run['run']}: {name} failed: {message}", err=True)


def speed(ratio: float | None) -> str:
    """A latency ratio (this run's over the first's) in words: ``1.34`` -> ``"1.34x slower"``.

    >>> speed(1.34), speed(0.5), speed(1.0), speed(None)
    ('1.34x slower', '2.00x faster', 'same speed', '-')
    """
    if ratio is None or not ratio > 0:
        return "-"
    if round(ratio, 2) == 1.0:
        return "same speed"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


def _si(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}"
